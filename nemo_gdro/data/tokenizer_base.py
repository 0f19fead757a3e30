"""The tokenizer contract that rollout engines, the actor and the loop rely on.

Two implementations: ``CharTokenizer`` (``data/tokenizer.py``, the synthetic
arithmetic task) and ``HFTokenizer`` (``data/hf_tokenizer.py``, a Hugging Face
tokenizer read offline from a checkpoint directory).

The contract, in ids of the tokenizer's own vocabulary:

* ``pad_id``: what batches are padded with (never a real target);
* ``eos_id``: what a supervised target ends with (``encode_target`` appends it);
* ``stop_ids``: generation stops at the first of any of these (``eos_id`` is one);
* ``vocab_size``: number of ids the tokenizer can produce (added tokens
  included); a model's embedding table may be larger (padded), never smaller;
* ``encode_prompt(text)``: the *final* prompt text (already formatted, e.g. by
  the chat template) -> ids, with the BOS / special tokens that tokenizer's
  format needs;
* ``encode_target(text)``: a supervised completion -> ids ending with ``eos_id``;
* ``decode(ids)``: response ids *without* the final stop token -> text, every
  other special token rendered literally (``"<|endoftext|>"``, ``"<pad>"``) and
  ids outside ``[0, vocab_size)`` (padded embedding rows) as U+FFFD, so that a
  verifier scores such a response as wrong instead of seeing a silently
  cleaned answer.

``CharTokenizer.decode`` predates the contract and keeps its defaults (drop
specials, raise on unknown ids) for its existing callers; it is called with
``skip_special=False, on_unknown="replace"`` by the rollout adapter
(``rollout/tokenizer.py: engine_tokenizer``), which every engine applies.
Both tokenizers also have ``decode_response(ids)``: the contract's decode
whatever the type, for code that holds a tokenizer without the adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What engines and the loop may use of a tokenizer (see the module docstring)."""

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def stop_ids(self) -> frozenset[int]: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_target(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def check_model_vocab(tokenizer: Tokenizer, model_vocab_size: int, *, what: str = "the model") -> None:
    """Raise ``ValueError`` unless ``model_vocab_size >= tokenizer.vocab_size``.

    A larger (padded) embedding table is fine: the extra rows are never produced
    by the tokenizer, and a sampled one decodes to U+FFFD. A smaller one would
    index out of the table for the tokenizer's highest ids.
    """
    n_model, n_tok = int(model_vocab_size), int(tokenizer.vocab_size)
    if n_model < n_tok:
        raise ValueError(
            f"{what} has a vocabulary of {n_model} ids but the tokenizer ({type(tokenizer).__name__}) "
            f"produces {n_tok}: the model vocabulary must be >= the tokenizer's (a padded one is fine)"
        )
