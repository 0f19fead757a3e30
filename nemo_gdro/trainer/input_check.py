"""The run's input files, checked before anything is built (no torch; headers only, so seconds).

:func:`input_problems` lists every problem at once, each naming its config key
and the path as this process resolves it (relative paths are taken from the
working directory, the one the training processes run in):

* every ``data.train_files`` entry exists, is a file of a supported type
  (JSON lines, Parquet, CSV) and its header (first JSON row, Parquet schema,
  CSV header) is readable in a known layout;
* every ``data.eval_files`` benchmark is a known name and each of its files
  passes the same checks in that benchmark's layout;
* ``model.path`` (``model.source=hf``) and the HF tokenizer's directory pass the
  model's own header-level check (:func:`hf_problem`: config, index, safetensors
  headers against the architecture, tokenizer files).

Rows are not read here: a bad row further down is named, with its file and
line, when the data is loaded (before the model is built).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_gdro.typed_config import ConfigError

__all__ = ["check_inputs", "input_problems", "data_file_problem", "hf_problem", "describe_inputs"]

def _shown(value: str) -> str:
    """``value``, with the absolute path it resolves to when it is relative."""
    path = Path(value).expanduser()
    return value if path.is_absolute() else f"{value} (= {Path.cwd() / path})"


def _as_list(files: Any) -> list[str]:
    return [files] if isinstance(files, str) else [str(f) for f in files]


def data_file_problem(key: str, value: str, benchmark: str | None = None, layout: str = "auto") -> str | None:
    """Why ``value`` (given as config ``key``) cannot be read as a training file, or as a
    file of ``benchmark``; ``None`` when its header is fine."""
    from nemo_gdro.data.errors import DatasetError
    from nemo_gdro.data.files import TRAIN_LAYOUTS, columns_of, detect_layout, file_problem

    path = Path(value).expanduser()
    problem = file_problem(path)
    if problem is None:
        try:
            if benchmark is not None:
                from nemo_gdro.data.benchmark_specs import benchmark_layout, benchmark_spec

                benchmark_layout(benchmark_spec(benchmark), path)
            elif layout == "auto" or layout not in TRAIN_LAYOUTS:
                detect_layout(path)
            else:
                columns_of(path)  # a forced layout: the header must still be readable
        except (DatasetError, OSError, ValueError) as e:
            problem = str(e)
    if problem is None:
        return None
    # The data errors start with the path: name the key instead, and where a relative path points.
    problem = problem.removeprefix(f"{path}: ").removeprefix(f"{path} ")
    return f"{key}={_shown(value)}: {problem}"


def hf_problem(cfg: Any) -> str | None:
    """Why the HF checkpoint / tokenizer directories of ``cfg`` cannot be used, or ``None``: the
    model's own header-level check (:func:`~nemo_gdro.models.hf_preflight.check_hf_inputs`),
    its first problem as one line."""
    from nemo_gdro.models.hf_preflight import check_hf_inputs

    if cfg.model.source == "hf" and not cfg.model.path:
        return "model.path is not set (a Hugging Face checkpoint directory)"
    try:
        check_hf_inputs(cfg)
    except ConfigError as err:
        return str(err)
    return None


def input_problems(cfg: Any) -> list[str]:
    """Every problem with the input files of ``cfg`` (a typed ``RunConfig``), in config order."""
    problems: list[str] = []
    problem = hf_problem(cfg)
    if problem:
        problems.append(problem)
    data = cfg.data
    train_files: Sequence[str] = getattr(data, "train_files", ()) or ()
    for k, value in enumerate(train_files):
        problem = data_file_problem(f"data.train_files[{k}]", value, layout=getattr(data, "layout", "auto"))
        if problem:
            problems.append(problem)
    for name, files in (getattr(data, "eval_files", None) or {}).items():
        from nemo_gdro.data.benchmark_specs import BENCHMARKS

        if name not in BENCHMARKS:
            problems.append(f"data.eval_files.{name}: unknown benchmark; valid names: {', '.join(BENCHMARKS)}")
            continue
        for k, value in enumerate(_as_list(files)):
            problem = data_file_problem(f"data.eval_files.{name}[{k}]", value, benchmark=name)
            if problem:
                problems.append(problem)
    return problems


def check_inputs(cfg: Any) -> None:
    """:func:`input_problems` as one :class:`ConfigError` listing them all (one line)."""
    problems = input_problems(cfg)
    if problems:
        head = "the input file problem" if len(problems) == 1 else f"{len(problems)} input file problems"
        raise ConfigError(f"{head}: " + " | ".join(problems))


def describe_inputs(cfg: Any) -> str:
    """What the checks looked at, for the one ``OK`` line of ``nemo-gdro train --validate-only``."""
    parts = []
    if cfg.model.source == "hf":
        parts.append(f"model.path={cfg.model.path}")
    train_files = getattr(cfg.data, "train_files", ()) or ()
    if train_files:
        parts.append(f"{len(train_files)} training file(s)")
    suites = list(getattr(cfg.data, "eval_files", None) or {})
    if suites:
        parts.append(f"eval suites {', '.join(suites)}")
    parts.append(f"data.task={cfg.data.task}")
    parts.append(f"working directory {os.getcwd()}")
    return "; ".join(parts)
