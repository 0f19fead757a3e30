"""The slice of the tokenizer contract that rollout engines use.

Engines need: ``pad_id``, ``stop_ids`` (generation stops on any of them),
``vocab_size``, ``encode_prompt(text) -> ids`` (BOS / specials as the format
needs) and ``decode(ids) -> text`` (response ids without the final stop token;
other special tokens rendered literally so a verifier scores them as wrong).

A tokenizer that has ``encode_prompt`` and ``stop_ids`` is used as is, except
the character tokenizer, which is always wrapped: its ``decode`` defaults to
dropping specials, so the adapter decodes with ``skip_special=False,
on_unknown="replace"`` (specials literal, unknown ids from padded embedding
rows as U+FFFD). Before it has the contract methods, the adapter encodes with
``encode(text, add_bos=True)`` and stops on ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

__all__ = ["EngineTokenizer", "engine_tokenizer"]


@runtime_checkable
class EngineTokenizer(Protocol):
    @property
    def pad_id(self) -> int: ...

    @property
    def stop_ids(self) -> frozenset[int]: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class _CharTokenizerAdapter:
    """``CharTokenizer`` (``encode(text, add_bos=True)``, ``eos_id``) under the engine contract."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    @property
    def pad_id(self) -> int:
        return int(self._tok.pad_id)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_id)

    @property
    def stop_ids(self) -> frozenset[int]:
        if hasattr(self._tok, "stop_ids"):
            return frozenset(int(i) for i in self._tok.stop_ids)
        return frozenset({int(self._tok.eos_id)})

    @property
    def vocab_size(self) -> int:
        return int(self._tok.vocab_size)

    def encode_prompt(self, text: str) -> list[int]:
        if hasattr(self._tok, "encode_prompt"):
            return list(self._tok.encode_prompt(text))
        return list(self._tok.encode(text, add_bos=True))

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(ids, skip_special=False, on_unknown="replace")

    def __repr__(self) -> str:
        return f"engine_tokenizer({self._tok!r})"


def engine_tokenizer(tok: Any) -> EngineTokenizer:
    """``tok`` itself if it implements the contract, else the character-tokenizer adapter."""
    from nemo_gdro.data.tokenizer import CharTokenizer

    if isinstance(tok, _CharTokenizerAdapter):
        return tok
    if isinstance(tok, CharTokenizer):
        return _CharTokenizerAdapter(tok)
    if hasattr(tok, "encode_prompt") and hasattr(tok, "stop_ids") and hasattr(tok, "decode"):
        if not tok.stop_ids:
            raise ValueError(f"tokenizer {tok!r} has no stop_ids: generation could never stop on a token")
        return tok  # type: ignore[return-value]
    raise TypeError(
        f"{type(tok).__name__} is not a rollout tokenizer: it needs encode_prompt/stop_ids/decode/pad_id/vocab_size "
        "(see nemo_gdro/rollout/tokenizer.py)"
    )
