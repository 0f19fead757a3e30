"""The Hugging Face model's small files, kept with every checkpoint: export and eval without the original folder.

A checkpoint holds the weights but, for ``model.source=hf`` / ``tokenizer.name=hf``,
its config only names the folder the architecture (``config.json``), the
generation config and the tokenizer came from. Once that folder is moved or
deleted, ``nemo-gdro export`` and ``eval`` could not rebuild the tokenizer.
So each checkpoint also holds ``hf_assets/`` (written inside the atomic
checkpoint write and listed in its manifest, :func:`asset_files`):

- the tokenizer files (:data:`~nemo_gdro.models.hf_save.TOKENIZER_FILES`:
  ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``vocab.json`` / ``merges.txt``, ... when present),
- ``generation_config.json`` and the model's ``config.json`` (``model.source=hf``),
- :data:`MARKER` saying where they came from and that the weights are not here
  (the checkpoint's ``actor`` holds them: :class:`~nemo_gdro.models.sources.HFSource`
  loads no weights from such a directory).

:func:`with_assets` points a checkpoint's stored config at that copy for each
folder that is gone. No weights (a few MB for Qwen3's tokenizer).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_gdro.models.hf_export_marker import ASSETS_MARKER, is_assets_dir

__all__ = ["ASSETS_DIR", "MARKER", "asset_files", "with_assets", "is_assets_dir", "stands_for"]

ASSETS_DIR = "hf_assets"
MARKER = ASSETS_MARKER
_MODEL_FILES = ("config.json", "generation_config.json")


def stands_for(copy: Any, original: Any) -> bool:
    """Whether ``copy`` is a checkpoint's ``hf_assets`` copy of folder ``original`` (``None``: the
    default ``tokenizer.path``), as :func:`with_assets` substitutes it."""
    if not isinstance(copy, str) or not is_assets_dir(copy):
        return False
    try:
        marker = json.loads((Path(copy) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return original is None or original in (marker.get("model_path"), marker.get("tokenizer_path"))


def asset_files(model_section: Any, tokenizer: Any) -> dict[str, Path | bytes]:
    """Checkpoint-relative name -> source file (or content) of ``hf_assets/``; ``{}`` without HF files.

    ``tokenizer``: the run's tokenizer (an HF tokenizer has ``.path``, its directory).
    """
    from nemo_gdro.models.hf_save import TOKENIZER_FILES

    sources: dict[str, Path] = {}
    tokenizer_dir = getattr(tokenizer, "path", None)
    if tokenizer_dir is not None:
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (Path(tokenizer_dir) / name).is_file():
                sources[name] = Path(tokenizer_dir) / name
    model_dir = getattr(model_section, "path", None) if getattr(model_section, "source", None) == "hf" else None
    if model_dir:
        for name in _MODEL_FILES:  # the model's generation config wins (as in hf_out.hf_metadata)
            if (Path(model_dir) / name).is_file():
                sources[name] = Path(model_dir) / name
    if not sources:
        return {}
    marker = {
        "what": "the tokenizer / config files of the model this checkpoint was trained from; no weights "
        "(the checkpoint's actor holds them)",
        "model_path": str(model_dir) if model_dir else None,
        "tokenizer_path": str(tokenizer_dir) if tokenizer_dir is not None else None,
    }
    out: dict[str, Path | bytes] = {f"{ASSETS_DIR}/{name}": src for name, src in sorted(sources.items())}
    out[f"{ASSETS_DIR}/{MARKER}"] = (json.dumps(marker, indent=1) + "\n").encode("utf-8")
    return out


def _has(path: Any, name: str) -> bool:
    return bool(path) and (Path(path) / name).is_file()


def with_assets(tree: DictConfig, step_dir: str | Path) -> DictConfig:
    """``tree`` (a checkpoint's stored config) with ``model.path`` / ``tokenizer.path`` pointing at
    ``step_dir/hf_assets`` where the original folder is gone; unchanged when nothing is missing
    or the checkpoint has no copy (the loaders then name the missing folder). Warns naming each."""
    assets = Path(step_dir) / ASSETS_DIR
    if not is_assets_dir(assets):
        return tree
    data = OmegaConf.to_container(tree, resolve=True)
    assert isinstance(data, dict)
    model, tok = data.get("model") or {}, data.get("tokenizer") or {}
    moved = []
    if tok.get("name") == "hf":
        original = tok.get("path") or model.get("path")
        if not (_has(original, "tokenizer_config.json") or _has(original, "tokenizer.json")):
            tok["path"] = str(assets)
            moved.append(f"tokenizer.path={original}")
    if model.get("source") == "hf" and not _has(model.get("path"), "config.json") and _has(assets, "config.json"):
        moved.append(f"model.path={model.get('path')}")
        model["path"] = str(assets)
    if not moved:
        return tree
    warnings.warn(
        f"the model folder this checkpoint was trained from is gone ({', '.join(moved)}): using the copy of its "
        f"tokenizer and config files kept with the checkpoint ({assets})",
        stacklevel=2,
    )
    return OmegaConf.create(data)
