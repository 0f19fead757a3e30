"""What an HF checkpoint directory written by nemo_gdro looks like, without torch.

An export (``nemo-gdro export``, ``checkpoint.save_hf``) carries
``nemo_gdro_export.json``: where its weights came from, and the tokenizer
(``tokenizer.name``) and task (``data.task``) the model was trained with, so
``nemo-gdro eval`` picks them and ``nemo-gdro export --overwrite`` knows it
replaces an export. A directory is *replaceable* when it is an HF checkpoint
and nothing else: only the files an HF checkpoint holds, ``config.json`` among them.

A training checkpoint's ``hf_assets/`` copy of the model's tokenizer and config
files (:mod:`nemo_gdro.trainer.hf_assets`) carries ``nemo_gdro_assets.json``
instead: an HF directory *without weights* (the checkpoint's actor state has them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_MARKER", "ASSETS_MARKER", "is_assets_dir", "TOKENIZER_FILES", "HF_CHECKPOINT_FILES", "read_marker", "replaceable_hf_dir", "foreign_entries"]

EXPORT_MARKER = "nemo_gdro_export.json"
#: Written into a checkpoint's ``hf_assets/``: what the copy is, and that the weights are not here.
ASSETS_MARKER = "nemo_gdro_assets.json"
#: Tokenizer files copied when present (fast and slow BPE, sentencepiece, chat templates).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
#: Every non-shard file name an HF checkpoint directory of ours may hold.
HF_CHECKPOINT_FILES = frozenset(
    ("config.json", "generation_config.json", "model.safetensors.index.json", EXPORT_MARKER, *TOKENIZER_FILES)
)


def is_assets_dir(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint's ``hf_assets`` copy (tokenizer and config files, no weights)."""
    return (Path(path) / ASSETS_MARKER).is_file()


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The export marker of ``directory`` (``None`` when absent or unreadable)."""
    try:
        data = json.loads((Path(directory) / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def foreign_entries(directory: str | Path) -> list[str]:
    """Names in ``directory`` that an HF checkpoint does not hold (sub-directories, other files), sorted."""
    out = []
    for entry in Path(directory).iterdir():
        hf_file = entry.is_file() and not entry.is_symlink() and (
            entry.name in HF_CHECKPOINT_FILES or entry.name.endswith(".safetensors")
        )
        if not hf_file:
            out.append(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(out)


def replaceable_hf_dir(directory: str | Path) -> bool:
    """``directory`` is an HF checkpoint (``config.json``) holding nothing but HF checkpoint files."""
    directory = Path(directory)
    return directory.is_dir() and (directory / "config.json").is_file() and not foreign_entries(directory)
