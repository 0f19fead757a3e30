"""The benchmark registry: which columns a file of each benchmark keeps its problem and answer in.

Kept apart from the loader (``benchmarks.py``, which documents every entry)
without heavy imports, so that the configuration and the launch checks can
name an unknown benchmark or a file that is not one before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nemo_gdro.data.errors import DatasetError
from nemo_gdro.data.files import DAPO, Layout, columns_of, first_row_where
from nemo_gdro.registry import UnknownNameError

__all__ = ["BENCHMARKS", "BenchmarkSpec", "GPQA_INCORRECT", "benchmark_layout", "benchmark_spec"]

GPQA_INCORRECT = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Column candidates of one benchmark (the first present wins)."""

    name: str
    question: tuple[str, ...]
    answer: tuple[str, ...]
    answer_kind: Literal["scalar", "list"] = "scalar"
    answer_type: Literal["math", "choice"] = "math"
    dapo_layout: bool = True  # also accept the verl / DAPO layout


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec("aime24", ("problem", "question", "Problem", "Question"), ("answer", "Answer")),
        BenchmarkSpec("aime25", ("question", "problem", "Problem", "Question"), ("answer", "Answer")),
        BenchmarkSpec("amc23", ("question", "problem"), ("answer",)),
        BenchmarkSpec("math500", ("problem",), ("answer",)),
        BenchmarkSpec("minerva", ("question", "problem"), ("answer",)),
        BenchmarkSpec("olympiadbench", ("question",), ("final_answer",), answer_kind="list"),
        BenchmarkSpec("gpqa_diamond", ("Question",), ("Correct Answer",), answer_type="choice", dapo_layout=False),
    )
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The registry entry ``name``; an unknown name is an ``UnknownNameError`` (a ``ValueError``) listing the valid ones."""
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise UnknownNameError(f"benchmark {name!r} is not known; valid names: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def benchmark_layout(spec: BenchmarkSpec, path: Path) -> Layout:
    """The layout of one file of ``spec`` (DAPO layout or the benchmark's own columns)."""
    cols = columns_of(path)
    if spec.dapo_layout and cols.get("prompt") == "list" and "reward_model" in cols:
        return DAPO
    q = next((c for c in spec.question if c in cols), None)
    a = next((c for c in spec.answer if c in cols), None)
    if q is None or a is None:
        dapo = " or the DAPO layout (prompt: chat messages, reward_model.ground_truth)" if spec.dapo_layout else ""
        raise DatasetError(
            f"{path}: not a {spec.name} file: expected a problem column (one of {list(spec.question)}) and an "
            f"answer column (one of {list(spec.answer)}){dapo}; the file has columns{first_row_where(path)} {sorted(cols)}"
        )
    if spec.answer_type == "choice":
        missing = [c for c in GPQA_INCORRECT if c not in cols]
        if missing:
            raise DatasetError(
                f"{path}: every row, column {missing[0]!r}: missing ({spec.name} needs {list(GPQA_INCORRECT)}; "
                f"the columns{first_row_where(path)} are {sorted(cols)})"
            )
    return Layout(f"{spec.name}", (q,), (a,), answer_kind=spec.answer_kind)
