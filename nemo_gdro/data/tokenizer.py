"""Character-level tokenizer for the synthetic arithmetic task.

The vocabulary is fixed and ordered (not learned from data), so the same ids
mean the same characters in every run, checkpoint and process:

    0 <pad>, 1 <bos>, 2 <eos>, then the characters of ``DEFAULT_CHARS`` in order.

One id per character keeps the tiny training model, the Megatron <-> HF weight
export and the rollout engine trivially consistent: there is no merge table,
no normalisation and no ambiguity in how a string is split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Literal

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Digits and operators of the task, the prompt template's punctuation and
# letters (upper and lower case so templates can change without a new vocab),
# space and newline. Order is part of the format: appending is safe, reordering
# changes every id.
DEFAULT_CHARS: str = (
    "0123456789"
    "+-*=?:"
    " \n"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "abcdefghijklmnopqrstuvwxyz"
    ".,()"
)

_FORMAT = "nemo_gdro.char_tokenizer/v1"


class CharTokenizer:
    """Deterministic character vocabulary with ``<pad>``=0, ``<bos>``=1, ``<eos>``=2.

    Args:
        chars: the characters of the vocabulary, in id order (ids start after the
            special tokens). Must be single characters without repetition.
    """

    def __init__(self, chars: str = DEFAULT_CHARS) -> None:
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"CharTokenizer chars must be unique, repeated: {dup!r}")
        self._chars = chars
        self._itos: list[str] = [*SPECIAL_TOKENS, *chars]
        self._stoi: dict[str, int] = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}

    # ----------------------------------------------------------------- ids
    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(SPECIAL_TOKENS)))

    @property
    def vocab_size(self) -> int:
        """Number of real token ids (specials + characters), before any padding."""
        return len(self._itos)

    @property
    def chars(self) -> str:
        return self._chars

    def padded_vocab_size(self, multiple: int = 8) -> int:
        """``vocab_size`` rounded up to a multiple of ``multiple`` (embedding-table size).

        Ids in ``[vocab_size, padded_vocab_size)`` are never produced by
        ``encode``; a model may still sample them, and ``decode`` treats them
        as unknown.
        """
        if multiple < 1:
            raise ValueError(f"padded_vocab_size multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation stops at ``<eos>`` (tokenizer contract, ``tokenizer_base.py``)."""
        return frozenset((self.eos_id,))

    # ------------------------------------------------------------ encoding
    def encode_prompt(self, text: str) -> list[int]:
        """Contract: ``<bos>`` + the characters of ``text`` (what the HF engine and SFT use)."""
        return self.encode(text, add_bos=True)

    def encode_target(self, text: str) -> list[int]:
        """Contract: the characters of ``text`` + ``<eos>``."""
        return self.encode(text, add_eos=True)

    def decode_response(self, ids: Iterable[int]) -> str:
        """Contract: specials rendered literally (``"<pad>"``), unknown ids as U+FFFD."""
        return self.decode(ids, skip_special=False, on_unknown="replace")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Map each character of ``text`` to its id; raises ``ValueError`` on an unknown one."""
        ids: list[int] = [self.bos_id] if add_bos else []
        stoi = self._stoi
        for pos, ch in enumerate(text):
            i = stoi.get(ch)
            if i is None:
                raise ValueError(
                    f"CharTokenizer cannot encode character {ch!r} (U+{ord(ch):04X}) at position {pos} "
                    f"of {text!r}; the vocabulary is {self._chars!r} plus special tokens"
                )
            ids.append(i)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(
        self,
        ids: Iterable[int],
        skip_special: bool = True,
        on_unknown: Literal["raise", "replace"] = "raise",
    ) -> str:
        """Inverse of ``encode``.

        Args:
            ids: token ids (ints, or anything ``int()`` accepts such as 0-d tensors).
            skip_special: drop ``<pad>``/``<bos>``/``<eos>``; otherwise they are
                rendered as their literal names (``"<eos>"``).
            on_unknown: ids outside ``[0, vocab_size)`` (e.g. sampled from a padded
                embedding table) raise, or become U+FFFD with ``"replace"``.
        """
        out: list[str] = []
        n_special = len(SPECIAL_TOKENS)
        for raw in ids:
            i = int(raw)
            if 0 <= i < n_special:
                if not skip_special:
                    out.append(self._itos[i])
            elif n_special <= i < len(self._itos):
                out.append(self._itos[i])
            elif on_unknown == "replace":
                out.append("\ufffd")
            else:
                raise ValueError(f"CharTokenizer cannot decode id {i}: vocab_size is {self.vocab_size}")
        return "".join(out)

    def batch_decode(self, batch: Sequence[Iterable[int]], skip_special: bool = True) -> list[str]:
        return [self.decode(ids, skip_special=skip_special) for ids in batch]

    def id_to_token(self, i: int) -> str:
        return self._itos[i]

    # ---------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary as JSON (format tag, specials, characters)."""
        payload = {"format": _FORMAT, "special_tokens": list(SPECIAL_TOKENS), "chars": self._chars}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=True, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a CharTokenizer file (format={payload.get('format')!r})")
        if list(payload.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise ValueError(
                f"{path}: special tokens {payload.get('special_tokens')!r} differ from {list(SPECIAL_TOKENS)!r}"
            )
        return cls(payload["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other._chars == self._chars

    def __hash__(self) -> int:
        return hash(self._chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
