"""The config's input paths, made absolute once, when the config is loaded.

A checkpoint stores the run's config; export and eval read it later, often
from another working directory. A relative ``model.path`` or data file stored
verbatim then points nowhere (or somewhere else), so :func:`resolve_input_paths`
turns every input path of the config into an absolute one, relative to the
working directory at launch, before the typed config is built
(:func:`~nemo_gdro.trainer.run_config.build_run_config` is the one caller).

Input paths: ``model.path``, ``tokenizer.path``, ``data.train_files`` (a
path or a list), ``data.eval_files.<suite>`` (a path or a list) and
``run.resume`` (unless ``auto`` / ``null``). ``~`` is expanded; symlinks are
kept as spelled (``os.path.abspath``). Torch-free: it runs before anything is
imported or built.

:func:`same_path_value` tells a resume check whether two spellings of such a
key name the same files (``data/x.jsonl`` and ``/home/me/data/x.jsonl``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["PATH_KEYS", "is_path_key", "resolve_input_paths", "resolve_value", "same_path_value"]

#: Leaf keys (or ``prefix.`` for every key under it) whose values are input paths.
PATH_KEYS: tuple[str, ...] = ("model.path", "tokenizer.path", "data.train_files", "data.eval_files.", "run.resume")

_RESUME_WORDS = frozenset({"auto", "none", "null", ""})


def is_path_key(key: str) -> bool:
    """Whether config leaf ``key`` holds input paths (see :data:`PATH_KEYS`)."""
    return any(key.startswith(k) if k.endswith(".") else key == k for k in PATH_KEYS)


def _absolute(path: str, cwd: Path) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def resolve_value(value: Any, cwd: str | os.PathLike[str] | None = None, *, key: str = "") -> Any:
    """``value`` (a path or a list of paths) with every non-empty relative path made absolute.

    Anything else (``None``, numbers, ``auto`` for ``run.resume``) is returned as is.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if isinstance(value, str):
        # "???": a mandatory value not given; the typed config names the key.
        if not value.strip() or value == "???" or (key == "run.resume" and value.strip().lower() in _RESUME_WORDS):
            return value
        return _absolute(value, base)
    if isinstance(value, (list, tuple)):
        return [resolve_value(v, base, key=key) for v in value]
    return value


def resolve_input_paths(tree: DictConfig, cwd: str | os.PathLike[str] | None = None) -> DictConfig:
    """A copy of ``tree`` whose input paths (:data:`PATH_KEYS`) are absolute (relative to ``cwd``, default the cwd)."""
    data = OmegaConf.to_container(tree, resolve=True)
    assert isinstance(data, dict)
    for section, name in (("model", "path"), ("tokenizer", "path"), ("run", "resume"), ("data", "train_files")):
        part = data.get(section)
        if isinstance(part, dict) and name in part:
            part[name] = resolve_value(part[name], cwd, key=f"{section}.{name}")
    evals = data.get("data", {}).get("eval_files") if isinstance(data.get("data"), dict) else None
    if isinstance(evals, dict):
        for suite, files in evals.items():
            evals[suite] = resolve_value(files, cwd)
    return OmegaConf.create(data)


def _real(paths: Iterable[Any]) -> list[str] | None:
    out = []
    for p in paths:
        if not isinstance(p, str) or not p.strip():
            return None
        out.append(os.path.realpath(os.path.expanduser(p)))
    return out


def same_path_value(before: Any, after: Any, key: str) -> bool:
    """Whether two values of path key ``key`` name the same files (relative ones taken from the cwd, symlinks followed)."""
    if key == "run.resume":
        return False
    if isinstance(before, str) and isinstance(after, str):
        before, after = [before], [after]
    if not isinstance(before, (list, tuple)) or not isinstance(after, (list, tuple)) or len(before) != len(after):
        return False
    a, b = _real(before), _real(after)
    return a is not None and a == b
