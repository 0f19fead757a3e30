"""Evaluation benchmarks read from local files in their common public layouts.

``BENCHMARKS`` is the registry: a name -> where a file of that benchmark keeps
the problem and the answer (the first listed column a file has is used);
``load_benchmark(name, path)`` is the one loader that reads any of them:

| name | public source | problem column | answer column |
|---|---|---|---|
| ``aime24`` | HuggingFaceH4/aime_2024 (30); BytedTsinghua-SIA/AIME-2024 (DAPO layout, 30 x 32 rows) | ``problem`` / ``question`` | ``answer`` |
| ``aime25`` | opencompass/AIME2025, math-ai/aime25, MathArena/aime_2025 | ``question`` / ``problem`` | ``answer`` (int or string) |
| ``amc23`` | math-ai/amc23 (40) | ``question`` / ``problem`` | ``answer`` (float in the public file) |
| ``math500`` | HuggingFaceH4/MATH-500 (500; ``subject``, ``level`` kept in meta) | ``problem`` | ``answer`` |
| ``minerva`` | math-ai/minervamath (272) | ``question`` / ``problem`` | ``answer`` |
| ``olympiadbench`` | math-ai/olympiadbench (674) | ``question`` | ``final_answer`` (a list, joined with ``", "``) |
| ``gpqa_diamond`` | Idavidrein/gpqa ``gpqa_diamond.csv`` (198; CSV or a Parquet/JSONL conversion) | ``Question`` | ``Correct Answer`` + ``Incorrect Answer 1..3`` |

Every math benchmark also accepts the verl / DAPO layout (``prompt`` = one user
message, ``reward_model.ground_truth``), which is how BytedTsinghua-SIA/AIME-2024
ships: its 960 rows deduplicate to 30 prompts. Rows are deduplicated, get uids
and dense ids exactly like training files (``prompt_files.py``).

Prompts follow the same ``PromptFormat`` as training (instruction, then raw or
chat template). GPQA is multiple choice: its four choices are shuffled per
question, deterministically from ``(seed, uid)``, listed as ``A)``..``D)`` under a
letter-answer instruction (always; the DAPO instruction asks for a math
answer), and the answer is the correct letter. ``meta["answer_type"]`` is
``"choice"`` for GPQA and ``"math"`` otherwise; ``meta["benchmark"]`` is the name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nemo_gdro.data.benchmark_specs import BENCHMARKS, GPQA_INCORRECT, BenchmarkSpec, benchmark_layout, benchmark_spec
from nemo_gdro.data.dataset import DEFAULT_MAX_PROMPT_CHARS, DatasetError, PromptDataset
from nemo_gdro.data.files import coerce_answer, file_problem
from nemo_gdro.data.prompt_files import Collector, LoadReport, PathLike, Prompt, as_paths, build_dataset
from nemo_gdro.data.prompt_format import PromptFormat, render_prompts

CHOICE_LETTERS = "ABCD"
CHOICE_INSTRUCTION = (
    "Answer the following multiple-choice question. The last line of your response should be of the form "
    "Answer: $LETTER (without quotes) where $LETTER is one of A, B, C or D.\n\n"
)
CHOICE_REMINDER = '\n\nRemember to put the letter of your answer on its own line after "Answer:".'


def choice_order(seed: int, uid: int, n: int = 4) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``(seed, uid)`` (hash-sorted: the same on every platform)."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{uid}:{i}".encode(), digest_size=8).digest()

    return sorted(range(n), key=key)


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The multiple-choice prompt: instruction, question, lettered choices, reminder."""
    lines = "\n".join(f"{CHOICE_LETTERS[k]}) {c}" for k, c in enumerate(choices))
    return f"{CHOICE_INSTRUCTION}{question.strip()}\n\n{lines}{CHOICE_REMINDER}"


def _repeated_choices(columns: Sequence[str], options: Sequence[str]) -> str | None:
    """``column 'b': the same choice as column 'a' ('text')`` for the first repeat, or ``None``.

    Choices that differ only in whitespace read the same to the model, so they count as one.
    """
    seen: dict[str, str] = {}
    for col, text in zip(columns, options, strict=True):
        key = " ".join(text.split())
        if not key:
            continue  # an empty choice is reported on its own
        if key in seen:
            return f"column {col!r}: the same choice as column {seen[key]!r} ({text!r}); the choices must differ"
        seen[key] = col
    return None


def _gpqa(
    collector: Collector, prompts: list[Prompt], seed: int, answer_column: str
) -> tuple[list[str], dict[int, dict[str, Any]]]:
    """Prompt texts and the answer / meta changes for multiple-choice prompts (``answer_column``: the correct one's)."""
    texts: list[str] = []
    extra: dict[int, dict[str, Any]] = {}
    bad: list[str] = []
    for p in prompts:
        wrong = []
        for col in GPQA_INCORRECT:
            v = coerce_answer(p.meta.get(col), "scalar")
            if v is None or not v.strip():
                bad.append(f"{collector.where(p.file, p.row)}, column {col!r}: must be a non-empty string")
            wrong.append((v or "").strip())
        options = [p.answer.strip(), *wrong]
        repeat = _repeated_choices([answer_column, *GPQA_INCORRECT], options)
        if repeat is not None:
            bad.append(f"{collector.where(p.file, p.row)}, {repeat}")
        order = choice_order(seed, p.uid)
        shown = [options[i] for i in order]
        letter = CHOICE_LETTERS[order.index(0)]
        texts.append(choice_prompt(p.text, shown))
        extra[p.uid] = {"choices": shown, "correct_choice": p.answer.strip(), "answer": letter}
    if bad:
        raise DatasetError("; ".join(bad[:10]) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""))
    return texts, extra


def read_benchmark(
    name: str,
    path: PathLike | Sequence[PathLike],
    *,
    prompt_format: PromptFormat | None = None,
    tokenizer: Any | None = None,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    overlong_prompts: str = "drop",
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
    log: Callable[[str], None] | None = print,
) -> tuple[PromptDataset, LoadReport]:
    """``load_benchmark`` that also returns the ``LoadReport``."""
    spec = benchmark_spec(name)
    fmt = prompt_format or PromptFormat()
    paths = as_paths(path, f"benchmark {name}")
    collector = Collector(max_prompt_chars)
    for p in paths:
        problem = file_problem(p)
        if problem is not None:
            raise DatasetError(f"benchmark {name}: file {problem}")
        collector.add_file(p, benchmark_layout(spec, p))
    prompts = collector.prompts()
    if spec.answer_type == "choice":
        bodies, extra = _gpqa(collector, prompts, seed, spec.answer[0])
        texts = render_prompts(bodies, fmt, tokenizer, instruct=False)
        answers = {uid: e.pop("answer") for uid, e in extra.items()}
        for p in prompts:
            p.answer = answers[p.uid]
    else:
        texts = render_prompts([p.text for p in prompts], fmt, tokenizer)
        extra = {}

    def meta(p: Prompt) -> dict[str, Any]:
        return {"benchmark": name, "answer_type": spec.answer_type, **extra.get(p.uid, {})}

    dataset, too_long = build_dataset(
        collector,
        prompts,
        texts,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        overlong_prompts=overlong_prompts,
        extra_meta=meta,
    )
    if len(dataset) == 0:
        raise DatasetError(f"benchmark {name}: no prompts left ({len(prompts)} read, {too_long} too long)")
    report = LoadReport(
        name=f"benchmark {name}",
        files=tuple(str(p) for p in paths),
        layouts=tuple(collector.layouts),
        rows_read=collector.rows_read,
        unique_prompts=len(prompts),
        duplicate_rows=collector.rows_read - len(prompts),
        non_english_dropped=0,
        excluded=0,
        too_long_dropped=too_long,
        num_prompts=len(dataset),
    )
    if log is not None:
        log(report.summary())
    return dataset, report


def load_benchmark(
    name: str,
    path: PathLike | Sequence[PathLike],
    *,
    prompt_format: PromptFormat | None = None,
    tokenizer: Any | None = None,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    overlong_prompts: str = "drop",
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
    log: Callable[[str], None] | None = print,
) -> PromptDataset:
    """The benchmark ``name`` (a key of ``BENCHMARKS``) from one or more local files.

    Args:
        path: file(s) of that benchmark (AIME25 ships as two halves: pass both).
        prompt_format / tokenizer: as for training files.
        seed: the GPQA choice-shuffle seed.
        max_prompt_tokens / overlong_prompts: as for training files (default: no limit).
        log: where the one-line load report goes.

    ``meta`` of each record: ``benchmark``, ``answer_type`` (``math`` / ``choice``),
    ``uid``, ``problem``, ``source``, ``row`` and the file's other columns; GPQA adds
    ``choices`` (in the shown order) and ``correct_choice`` (its text).
    """
    return read_benchmark(
        name,
        path,
        prompt_format=prompt_format,
        tokenizer=tokenizer,
        seed=seed,
        max_prompt_tokens=max_prompt_tokens,
        overlong_prompts=overlong_prompts,
        max_prompt_chars=max_prompt_chars,
        log=log,
    )[0]


def load_benchmarks(
    paths: Mapping[str, PathLike | Sequence[PathLike]], **kwargs: Any
) -> dict[str, PromptDataset]:
    """``{name: load_benchmark(name, path, **kwargs)}`` in the given order."""
    return {name: load_benchmark(name, p, **kwargs) for name, p in paths.items()}


__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "benchmark_spec",
    "choice_order",
    "choice_prompt",
    "load_benchmark",
    "load_benchmarks",
    "read_benchmark",
]
