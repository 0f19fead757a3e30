"""Synthetic data files in the exact public layouts, written by code (never downloaded),
and the real Qwen3 tokenizer files as a checkpoint-like directory.

Reusable by any test (``from tests.data.fixtures import write_dapo_math``):

* ``write_dapo_math(path, num_prompts, repeats, fmt)``: DAPO-Math-17k rows
  (``data_source``, ``prompt`` = one user message with the DAPO instruction,
  ``ability``, ``reward_model``, ``extra_info.index``), each prompt repeated,
  plus optional CJK prompts, a whitespace variant and a conflicting answer;
* ``write_dapo_processed`` (open-r1 processed: bare ``prompt``, ``solution``, originals),
  ``write_plain`` (``id``, ``prompt``, ``answer``);
* ``write_benchmark(name, path, ...)`` for every name of ``nemo_gdro.data.benchmarks.BENCHMARKS``
  (``layout="dapo"`` writes the verl/DAPO layout, e.g. BytedTsinghua AIME-2024 with ``repeats=32``);
* ``write_qwen3_tokenizer(dest, variant)``: the real Qwen3 tokenizer files (located by
  ``nemo_gdro.testing.tiny_hf.qwen3_tokenizer_dir``) plus a ``generation_config.json``,
  configured like Qwen3-*-Base or like the post-trained Qwen3.

``fmt`` is ``"jsonl"`` or ``"parquet"`` (``"csv"`` for flat layouts: plain, the benchmarks). Each writer returns a ``FixtureInfo``
with the expected counts.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_gdro.data.prompt_format import DAPO_PREFIX, DAPO_SUFFIX
from nemo_gdro.testing.tiny_hf import QWEN3_TOKENIZER_FILES, qwen3_tokenizer_dir

QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, QWEN_THINK = 151643, 151644, 151645, 151667

_CJK_PROBLEMS = [
    ("计算 $12 + 30$ 的值。", "42"),
    ("一个正方形的边长是 $7$，求它的面积。", "49"),
    ("求满足 $x^2 = 81$ 的正整数 $x$。", "9"),
]


@dataclass
class FixtureInfo:
    """What a writer wrote: ``rows`` lines/rows, ``problems`` as (bare text, answer) per distinct
    prompt (English first, then CJK), and the counts a loader should report."""

    path: Path
    rows: int
    num_prompts: int  # distinct after normalisation, CJK included
    num_english: int
    problems: list[tuple[str, str]] = field(default_factory=list)


def math_problem(k: int) -> tuple[str, str]:
    """A distinct English problem (LaTeX, several sentences) with an integer answer."""
    a, b, c = 3 + 7 * k, 11 + 5 * k, 2 + k % 9
    kinds = [
        (f"Let $a = {a}$ and $b = {b}$. Compute $a \\cdot {c} + b$.", a * c + b),
        (f"A box holds {a} red and {b} blue marbles. After {c} red marbles are removed, how many marbles remain?", a + b - c),
        (f"Find the remainder when ${a}^{{{c}}}$ is divided by ${b}$.", pow(a, c, b)),
        (f"The sides of a rectangle are ${a}$ and ${b}$. What is its perimeter?", 2 * (a + b)),
    ]
    text, value = kinds[k % len(kinds)]
    return f"Problem {k}. {text}", str(value)


def _index(*parts: object) -> str:
    return str(uuid.UUID(bytes=hashlib.md5(":".join(map(str, parts)).encode()).digest()))


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]], fmt: str) -> Path:
    """Rows as JSON lines, a Parquet file (pyarrow infers the nested types) or a CSV file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), p)
    elif fmt == "csv":  # flat columns only (GPQA's public file is a CSV)
        import pyarrow as pa
        import pyarrow.csv as pcsv

        pcsv.write_csv(pa.Table.from_pylist(list(rows)), p)
    else:
        raise ValueError(f"fmt must be 'jsonl', 'parquet' or 'csv', got {fmt!r}")
    return p


def dapo_row(problem: str, answer: str, index: str) -> dict[str, Any]:
    """One DAPO-Math-17k row (column and key order as in the public file)."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def _distinct(num_prompts: int, cjk_prompts: int, start: int = 0) -> list[tuple[str, str]]:
    if cjk_prompts > len(_CJK_PROBLEMS):
        raise ValueError(f"at most {len(_CJK_PROBLEMS)} CJK prompts")
    return [math_problem(start + k) for k in range(num_prompts)] + _CJK_PROBLEMS[:cjk_prompts]


def write_dapo_math(
    path: str | Path,
    num_prompts: int = 12,
    repeats: int = 3,
    fmt: str = "parquet",
    *,
    cjk_prompts: int = 1,
    variant: bool = True,
    conflict: bool = False,
    shuffle_seed: int | None = 0,
    start: int = 0,
) -> FixtureInfo:
    """DAPO-Math-17k layout: ``num_prompts`` English + ``cjk_prompts`` CJK prompts, each
    ``repeats`` times (distinct ``extra_info.index`` per row, like the public file).

    ``variant``: one more row of prompt 0 differing only in whitespace
    (same prompt after normalisation). ``conflict``: one more row of prompt 1 with a
    different answer (a loader must reject it). ``shuffle_seed``: row order
    (``None``: grouped by prompt). ``start``: first problem number (disjoint sets).
    """
    problems = _distinct(num_prompts, cjk_prompts, start)
    rows = [dapo_row(p, a, _index(path, k, r)) for k, (p, a) in enumerate(problems) for r in range(repeats)]
    if variant and num_prompts > 0:
        p, a = problems[0]
        rows.append(dapo_row("  " + p.replace(" ", " \t ") + "\n", a, _index(path, "variant")))
    if conflict and num_prompts > 1:
        p, a = problems[1]
        rows.append(dapo_row(p, str(int(a) + 1), _index(path, "conflict")))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    write_rows(path, rows, fmt)
    return FixtureInfo(Path(path), len(rows), len(problems), num_prompts, problems)


def write_dapo_processed(
    path: str | Path, num_prompts: int = 12, fmt: str = "parquet", *, cjk_prompts: int = 1, start: int = 0
) -> FixtureInfo:
    """open-r1/DAPO-Math-17k-Processed layout: one row per prompt (already deduplicated)."""
    problems = _distinct(num_prompts, cjk_prompts, start)
    rows = []
    for k, (p, a) in enumerate(problems):
        orig = dapo_row(p, a, _index(path, k))
        rows.append(
            {
                "prompt": p,
                "solution": a,
                "data_source": orig["data_source"],
                "source_prompt": orig["prompt"],
                "ability": orig["ability"],
                "reward_model": orig["reward_model"],
                "extra_info": orig["extra_info"],
            }
        )
    write_rows(path, rows, fmt)
    return FixtureInfo(Path(path), len(rows), len(problems), num_prompts, problems)


def write_plain(path: str | Path, num_prompts: int = 12, fmt: str = "jsonl", *, repeats: int = 1, start: int = 0) -> FixtureInfo:
    """Plain layout: ``id``, ``prompt`` (bare problem), ``answer``."""
    problems = _distinct(num_prompts, 0, start)
    rows = [{"id": f"q{start + k}-{r}", "prompt": p, "answer": a} for k, (p, a) in enumerate(problems) for r in range(repeats)]
    write_rows(path, rows, fmt)
    return FixtureInfo(Path(path), len(rows), len(problems), num_prompts, problems)


# ------------------------------------------------------------ benchmarks
def _benchmark_row(name: str, k: int, problem: str, answer: str) -> dict[str, Any]:
    if name == "aime24":  # HuggingFaceH4/aime_2024
        return {"id": 60 + k, "problem": problem, "solution": f"Worked solution {k}.", "answer": answer,
                "url": f"https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_{k + 1}", "year": 2024}
    if name == "aime25":  # opencompass/AIME2025 ; MathArena uses problem_idx/problem/answer(int)
        return {"question": problem, "answer": answer}
    if name == "amc23":  # math-ai/amc23: float answers
        return {"id": k, "question": problem, "answer": float(answer), "url": f"https://example.org/amc23/{k}"}
    if name == "math500":  # HuggingFaceH4/MATH-500
        return {"problem": problem, "solution": f"So the answer is $\\boxed{{{answer}}}$.", "answer": answer,
                "subject": ["Algebra", "Number Theory", "Geometry"][k % 3], "level": 1 + k % 5,
                "unique_id": f"test/algebra/{100 + k}.json"}
    if name == "minerva":  # math-ai/minervamath
        return {"question": problem, "answer": answer}
    if name == "olympiadbench":  # math-ai/olympiadbench: final_answer is a list
        return {"id": 1600 + k, "question": problem, "solution": [f"Worked solution {k}."], "final_answer": [f"${answer}$"],
                "context": None, "image_1": None, "modality": "Text-only", "difficulty": "Competition",
                "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "error": None,
                "question_type": "Open-ended", "subfield": "Algebra", "subject": "Math", "language": "English"}
    if name == "gpqa_diamond":  # Idavidrein/gpqa gpqa_diamond (choices carry stray whitespace there)
        v = int(answer)
        return {"Pre-Revision Question": problem, "Question": problem, "Correct Answer": f"{v} ",
                "Incorrect Answer 1": f"{v + 1}", "Incorrect Answer 2": f" {v + 2}", "Incorrect Answer 3": f"{2 * v + 5}\n",
                "Record ID": f"rec{k:04d}", "Subdomain": "Arithmetic", "High-level domain": "Mathematics"}
    raise ValueError(f"no fixture writer for benchmark {name!r}")


def write_benchmark(
    name: str, path: str | Path, num: int = 6, fmt: str = "jsonl", *, layout: str = "native", repeats: int = 1, start: int = 100
) -> FixtureInfo:
    """``num`` problems of benchmark ``name`` in its public layout (``layout="native"``)
    or the verl/DAPO layout (``layout="dapo"``), each ``repeats`` times."""
    problems = [math_problem(start + k) for k in range(num)]
    if name == "gpqa_diamond":  # multi-line questions with quotes and commas, as in the public CSV
        problems = [(f'{p}\nGive the "exact" value, in lowest terms.', a) for p, a in problems]
    if layout == "native":
        rows = [_benchmark_row(name, k, p, a) for k, (p, a) in enumerate(problems) for _ in range(repeats)]
    elif layout == "dapo":
        rows = [dapo_row(p, a, _index(path, k, r)) for k, (p, a) in enumerate(problems) for r in range(repeats)]
        for r in rows:
            r["data_source"] = name
    else:
        raise ValueError(f"layout must be 'native' or 'dapo', got {layout!r}")
    write_rows(path, rows, fmt)
    return FixtureInfo(Path(path), len(rows), num, num, problems)


# ------------------------------------------------------------- tokenizer
def write_qwen3_tokenizer(dest: str | Path, *, variant: str = "base") -> Path:
    """Copy the Qwen3 tokenizer into ``dest`` with a ``generation_config.json``, as a checkpoint has it.

    ``variant="base"`` mimics Qwen3-*-Base: eos ``<|endoftext|>`` (151643) in
    ``tokenizer_config.json`` and ``generation_config.json`` (so the end-of-turn
    151645 comes only from the chat template). ``"instruct"`` keeps the shipped
    config (eos ``<|im_end|>``) with ``eos_token_id: [151645, 151643]``.
    """
    if variant not in ("base", "instruct"):
        raise ValueError(f"variant must be 'base' or 'instruct', got {variant!r}")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    src = qwen3_tokenizer_dir()
    for name in QWEN3_TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    if variant == "base":
        cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg["eos_token"] = "<|endoftext|>"
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        gen = {"bos_token_id": QWEN_ENDOFTEXT, "eos_token_id": QWEN_ENDOFTEXT, "max_new_tokens": 2048}
    else:
        gen = {"bos_token_id": QWEN_ENDOFTEXT, "eos_token_id": [QWEN_IM_END, QWEN_ENDOFTEXT], "do_sample": True}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return out
