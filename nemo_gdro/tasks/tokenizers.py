"""Tokenizer builders for ``tokenizer.name`` (see :data:`nemo_gdro.registries.TOKENIZERS`)."""

from __future__ import annotations

from typing import Any

from nemo_gdro.data.tokenizer import CharTokenizer


def build_char_tokenizer(section: Any, model: Any) -> CharTokenizer:
    """The fixed character vocabulary (pad 0, bos 1, eos 2, then the task's characters)."""
    return CharTokenizer()
