"""Where ``nemo-gdro export`` may write: checked before anything is loaded, without torch.

An export replaces its target, so the target must be new, an empty
directory, or (with ``--overwrite``) an earlier HF checkpoint holding nothing
else. It may never be, lie inside, or contain a training run (its checkpoints,
metrics, lock), the checkpoint being exported, or the weights the run started
from; and its parent must be writable. Each refusal is one
:class:`~nemo_gdro.typed_config.ConfigError` naming the path and what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from nemo_gdro.models.hf_export_marker import foreign_entries, read_marker, replaceable_hf_dir
from nemo_gdro.typed_config import ConfigError

__all__ = ["run_content", "check_export_target"]

# What the trainer writes into a run directory (run_lock.LOCK_NAME, metrics.METRICS_FILE / EVAL_FILE,
# checkpoint.MANIFEST_NAME / CONFIG_NAME), named here so this check imports no torch.
_RUN_MARKERS = (".nemo_gdro.lock", "metrics.jsonl", "eval.jsonl")


def _is_run_or_checkpoint(path: Path) -> bool:
    if any((path / name).exists() for name in _RUN_MARKERS):
        return True
    if (path / "manifest.json").is_file() and (path / "config.yaml").is_file():
        return True  # one checkpoints/step_XXXXXXXX directory
    checkpoints = path / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.glob("step_*/manifest.json"))


def run_content(path: str | os.PathLike) -> Path | None:
    """The training run or checkpoint directory ``path`` is, or lies inside (``None``: neither)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if candidate.is_dir() and _is_run_or_checkpoint(candidate):
            return candidate
    return None


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _check_writable(out: Path) -> None:
    """The export's temp sibling can be created: the nearest existing ancestor is a writable directory.

    Probed by creating (and removing) a directory there: ``os.access`` says yes to root on a
    read-only or virtual filesystem.
    """
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create the export directory {out}: {existing} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".nemo_gdro_probe_", dir=existing)
    except OSError as err:
        raise ConfigError(
            f"cannot write the export directory {out}: {existing} is not writable ({err.strerror or err}); "
            "choose a directory you can write"
        ) from None
    os.rmdir(probe)


def check_export_target(
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    sources: Iterable[tuple[str, str | os.PathLike | None]] = (),
    overwrite: bool = False,
) -> Path:
    """Refuse an export target that would destroy data; returns it as a ``Path``.

    Args:
        out_dir: the target directory.
        checkpoint: the checkpoint being exported (a run dir or a step dir).
        sources: ``(config key, path)`` of what the export reads besides the
            checkpoint (``model.path``, ``tokenizer.path``): never overwritten.
        overwrite: replace an existing HF checkpoint directory.
    Raises:
        ConfigError: one line naming the target and what to do instead.
    """
    out = Path(out_dir).expanduser()
    target = out.resolve()
    ckpt = Path(checkpoint).expanduser().resolve()
    run = run_content(target)
    if run is not None:
        where = "is" if run == target else f"lies inside {run}, which is"
        raise ConfigError(
            f"export target {out} {where} a training run or checkpoint directory (checkpoints, metrics, lock): "
            "choose a new directory outside the run; nothing was written"
        )
    if _inside(ckpt, target):
        what = "is the checkpoint being exported" if target == ckpt else f"holds the checkpoint being exported ({ckpt})"
        raise ConfigError(f"export target {out} {what}: choose a new directory outside it; nothing was written")
    for key, source in sources:
        if not source:
            continue
        src = Path(source).expanduser().resolve()
        if _inside(src, target) or _inside(target, src):
            raise ConfigError(
                f"export target {out} overlaps {key}={source}, which the export reads: choose another directory; "
                "nothing was written"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"export target {out} is an existing file, not a directory: choose a directory path")
        if any(out.iterdir()):
            if not replaceable_hf_dir(out):
                found = foreign_entries(out) or ["no config.json"]
                listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
                raise ConfigError(
                    f"export target {out} is not empty and is not an HF checkpoint ({listed}): choose a new or "
                    "empty directory; nothing was written"
                )
            if not overwrite:
                kind = "a previous nemo-gdro export" if read_marker(out) is not None else "an HF checkpoint"
                raise ConfigError(
                    f"export target {out} already holds {kind}: pass --overwrite to replace it, or choose another "
                    "directory"
                )
    _check_writable(out)
    return out
