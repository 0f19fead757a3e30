"""A Hugging Face tokenizer read offline from a checkpoint directory, behind the
tokenizer contract (``tokenizer_base.py``).

What the directory must hold: the tokenizer files ``transformers`` reads
(``tokenizer.json`` and/or ``vocab.json`` + ``merges.txt``, and
``tokenizer_config.json``). ``generation_config.json`` is optional. Nothing is
ever downloaded (``local_files_only=True``).

How the contract's ids are chosen:

* ``eos_id``: the ``eos_token`` argument if given (e.g. ``"<|im_end|>"`` to end
  chat-formatted SFT targets with the end-of-turn token), else the tokenizer's
  eos token, else the first ``eos_token_id`` of ``generation_config.json``.
* ``pad_id``: the tokenizer's pad token; if it has none, ``<|endoftext|>`` when
  the vocabulary has it (Qwen: 151643), else ``eos_id``.
* ``stop_ids``: the union of ``eos_id``, the tokenizer's eos token, every
  ``eos_token_id`` of ``generation_config.json`` (an int or a list), the chat
  template's end-of-turn token (the special token the template writes right
  after an assistant message; Qwen: ``<|im_end|>`` = 151645) and
  ``extra_stop_tokens``. Qwen3-Base's own files name only 151643 as eos, while a
  chat-formatted policy ends its turn with 151645: both must stop generation.
* ``vocab_size``: ``len(tokenizer)``, added tokens included (Qwen3: 151,669;
  the model's embedding table is padded to 151,936).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nemo_gdro._optional import import_optional
from nemo_gdro.models.hf_preflight import tokenizer_files_problem

ENDOFTEXT = "<|endoftext|>"
_SENTINEL = "nemo-gdro-end-of-turn-probe"
_REPLACEMENT = "\ufffd"


def _read_generation_eos(path: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (int or list of ints) or ``[]``."""
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    value = cfg.get("eos_token_id")
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in items):
        raise ValueError(f"{file}: 'eos_token_id' must be a non-negative int or a non-empty list of them, got {value!r}")
    return list(items)


class HFTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory (offline).

    Args:
        path: the directory (a checkpoint or a tokenizer-only directory).
        eos_token: token that ends supervised targets (default: the tokenizer's eos).
        extra_stop_tokens: more stop tokens, as token strings or ids.
        template_stop: add the chat template's end-of-turn token to ``stop_ids``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        eos_token: str | None = None,
        extra_stop_tokens: Sequence[str | int] = (),
        template_stop: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HFTokenizer: tokenizer directory {self.path} does not exist")
        missing = tokenizer_files_problem(self.path)
        if missing is not None:  # transformers would build an empty tokenizer (vocabulary [0, 1)) without a word
            raise ValueError(f"HFTokenizer: {missing}")
        gen_eos = _read_generation_eos(self.path)  # before the (slow) tokenizer load: fail fast
        transformers = import_optional("transformers", "hf", "HFTokenizer")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            files = sorted(p.name for p in self.path.iterdir())
            raise ValueError(
                f"HFTokenizer: cannot load a tokenizer from {self.path} (files: {files}): {e}"
            ) from None
        self._tok: Any = tok
        self._vocab_size = len(tok)
        for i in gen_eos:
            self._check_id(i, f"{self.path / 'generation_config.json'} eos_token_id")

        if eos_token is not None:
            self._eos_id = self.token_to_id(eos_token, what="eos_token")
        elif tok.eos_token_id is not None:
            self._eos_id = int(tok.eos_token_id)
        elif gen_eos:
            self._eos_id = gen_eos[0]
        else:
            raise ValueError(
                f"HFTokenizer: {self.path} defines no eos token (tokenizer_config.json eos_token and "
                "generation_config.json eos_token_id are both missing); pass eos_token="
            )

        if tok.pad_token_id is not None:
            self._pad_id = int(tok.pad_token_id)
        elif self._has_token(ENDOFTEXT):
            self._pad_id = self.token_to_id(ENDOFTEXT)
        else:
            self._pad_id = self._eos_id

        self._end_of_turn_id = self._detect_end_of_turn()
        stops = {self._eos_id, *gen_eos}
        if tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        if template_stop and self._end_of_turn_id is not None:
            stops.add(self._end_of_turn_id)
        for t in extra_stop_tokens:
            if isinstance(t, str):
                stops.add(self.token_to_id(t, what="extra_stop_tokens"))
            else:
                stops.add(self._check_id(int(t), "extra_stop_tokens"))
        self._stop_ids = frozenset(stops)

    # ------------------------------------------------------------ contract
    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``: base vocabulary plus added tokens."""
        return self._vocab_size

    @property
    def end_of_turn_id(self) -> int | None:
        """The chat template's end-of-turn token id (Qwen: 151645), ``None`` without a template."""
        return self._end_of_turn_id

    @property
    def bos_id(self) -> int | None:
        return None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``transformers`` tokenizer (for engines that take one)."""
        return self._tok

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """``vocab_size`` rounded up to a multiple of ``multiple`` (Qwen3: 151,680 for 128;
        Qwen3 checkpoints pad further, to 151,936)."""
        if multiple < 1:
            raise ValueError(f"padded_vocab_size multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    def encode_prompt(self, text: str) -> list[int]:
        """Final prompt text -> ids; special-token strings in ``text`` (chat markup) become their ids.

        The tokenizer's own prefix (a BOS for Llama-style tokenizers, nothing for
        Qwen) is added unless ``text`` already starts with the BOS token (as a
        chat template's output may), so it is never doubled.
        """
        return list(self._tok.encode(text, add_special_tokens=self._wants_prefix(text)))

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode_prompt`` for many texts in one batched call."""
        if not texts:
            return []
        plain = [t for t in texts if self._wants_prefix(t)]
        if len(plain) in (0, len(texts)):
            out = self._tok(list(texts), add_special_tokens=bool(plain))["input_ids"]
            return [list(ids) for ids in out]
        return [self.encode_prompt(t) for t in texts]

    def encode_target(self, text: str) -> list[int]:
        """Supervised completion -> ids + ``eos_id`` (no BOS)."""
        return [*self._tok.encode(text, add_special_tokens=False), self._eos_id]

    def decode_response(self, ids: Iterable[int]) -> str:
        """Contract decode: special tokens literal, ids outside the vocabulary as U+FFFD."""
        return self.decode(ids, skip_special=False)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text; ids outside ``[0, vocab_size)`` become U+FFFD (a tokenizer would drop them silently)."""
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if 0 <= i < self._vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self._decode_run(run, skip_special))
                run = []
            out.append(_REPLACEMENT)
        if run:
            out.append(self._decode_run(run, skip_special))
        return "".join(out)

    # ---------------------------------------------------------- formatting
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, user_text: str, *, enable_thinking: bool | None = None) -> str:
        """One user turn, no system turn, with the generation prompt (Qwen3:
        ``<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``).

        ``enable_thinking`` is passed to the template only when set (``None``:
        the template's default; Qwen3 with ``False`` appends an empty think block).
        """
        if not self.has_chat_template:
            raise ValueError(
                f"data.prompt_format=chat_template but the tokenizer in {self.path} has no chat template "
                "(tokenizer_config.json 'chat_template' or chat_template.jinja); use data.prompt_format=raw"
            )
        kwargs: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
        text = self._tok.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True, **kwargs
        )
        return str(text)

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> None:
        """Write the tokenizer files into ``out_dir`` (an HF export's tokenizer)."""
        self._tok.save_pretrained(str(out_dir))

    # ------------------------------------------------------------- helpers
    def token_to_id(self, token: str, *, what: str = "token") -> int:
        """Id of a token string that is one token of the vocabulary; ``ValueError`` otherwise."""
        if not self._has_token(token):
            raise ValueError(f"HFTokenizer: {what} {token!r} is not a single token of the tokenizer in {self.path}")
        return int(self._tok.convert_tokens_to_ids(token))

    def _has_token(self, token: str) -> bool:
        i = self._tok.convert_tokens_to_ids(token)
        return isinstance(i, int) and 0 <= i < self._vocab_size and self._tok.convert_ids_to_tokens(i) == token

    def _check_id(self, i: int, what: str) -> int:
        if not 0 <= i < self._vocab_size:
            raise ValueError(f"{what}: id {i} is outside the tokenizer's vocabulary [0, {self._vocab_size})")
        return i

    def _wants_prefix(self, text: str) -> bool:
        bos = self._tok.bos_token
        return not (bos and text.startswith(bos))

    def _decode_run(self, ids: list[int], skip_special: bool) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False))

    def _detect_end_of_turn(self) -> int | None:
        """The special token a chat template writes right after an assistant message, if any."""
        if not self.has_chat_template:
            return None
        try:
            text = self._tok.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
            )
        except Exception:  # a template that cannot render this probe simply has no detectable end of turn
            return None
        at = str(text).rfind(_SENTINEL)
        if at < 0:
            return None
        tail = self._tok.encode(str(text)[at + len(_SENTINEL) :], add_special_tokens=False)
        if not tail or int(tail[0]) not in set(self._tok.all_special_ids):
            return None
        return int(tail[0])

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, stop_ids={sorted(self.stop_ids)})"
        )
