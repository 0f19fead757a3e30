"""Tokenizer builders for ``tokenizer.name`` (see :data:`nemo_gdro.registries.TOKENIZERS`)."""

from __future__ import annotations

from typing import Any

from nemo_gdro.data.tokenizer import CharTokenizer


def build_char_tokenizer(section: Any, model: Any) -> CharTokenizer:
    """The fixed character vocabulary (pad 0, bos 1, eos 2, then the task's characters)."""
    return CharTokenizer()


def build_hf_tokenizer(section: Any, model: Any) -> Any:
    """The Hugging Face tokenizer of ``tokenizer.path`` (default: ``model.path``), offline.

    Stop ids are the tokenizer's eos, ``generation_config.json``'s eos ids and the
    chat template's end-of-turn token (Qwen3-Base: 151643 and 151645).
    """
    from nemo_gdro.data.hf_tokenizer import HFTokenizer

    path = section.path or getattr(model, "path", None)
    if not path:
        raise ValueError("tokenizer.name=hf needs tokenizer.path (or model=hf with model.path)")
    try:
        return HFTokenizer(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"tokenizer.path={path}: {err}") from None
