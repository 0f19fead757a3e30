"""Hostile data files: every error is one line that names the file and, where a row is at fault, its line or row.

The table holds the bad training and benchmark files of the issue 21 probe (item 7) and their
neighbours. Each case writes a real file and reads it with the real loaders (``load_prompt_files``
for ``data.train_files``, ``load_benchmark`` for ``data.eval_files``). JSONL rows are named by
their 1-based line, Parquet and CSV rows by their 0-based data row (CSV also by line).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nemo_gdro.data.benchmarks import load_benchmark
from nemo_gdro.data.errors import DatasetError
from nemo_gdro.data.prompt_files import load_prompt_files
from tests.data.fixtures import _benchmark_row as benchmark_row
from tests.data.fixtures import dapo_row, math_problem, write_plain, write_rows


def _plain_lines(n: int = 4) -> list[str]:
    return [json.dumps({"id": f"q{k}", "prompt": f"Problem {k}: compute {k} + 1.", "answer": str(k + 1)}) for k in range(n)]


def _jsonl(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _gpqa_rows(n: int = 4) -> list[dict]:
    return [benchmark_row("gpqa_diamond", k, *math_problem(k)) for k in range(n)]


def _train(path: Path) -> None:
    load_prompt_files([path], log=None)


def _bench(name: str) -> Callable[[Path], None]:
    return lambda path: load_benchmark(name, [path], log=None)


def _with(lines: list[str], k: int, value: str) -> list[str]:
    lines = list(lines)
    lines[k] = value
    return lines


def _gpqa_with(k: int, **changes: str) -> list[dict]:
    rows = _gpqa_rows()
    rows[k].update(changes)
    return rows


def _damaged_parquet(path: Path) -> Path:
    write_plain(path, 2000, "parquet")
    data = bytearray(path.read_bytes())
    for offset in range(200, 1200, 7):  # inside the first data page; the footer stays readable
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


# case id -> (file name, writer, reader, where the error must point: "line n" / "row n" / None = the whole file, text)
CASES: list[tuple[str, str, Callable[[Path], Path], Callable[[Path], None], str | None, str]] = [
    ("non-utf8 byte, jsonl line 3", "t.jsonl",
     lambda p: _jsonl(p, _with(_plain_lines(), 2, '{"prompt": "café", "answer": "1"}'), "latin-1"),
     _train, "line 3", "byte 0xe9 is not UTF-8"),
    ("non-utf8 byte, first jsonl row", "t.jsonl",
     lambda p: _jsonl(p, _with(_plain_lines(), 0, '{"prompt": "naïve", "answer": "1"}'), "latin-1"),
     _train, "line 1", "byte 0xef is not UTF-8"),
    ("non-utf8 byte, csv", "t.csv",
     lambda p: p.write_bytes("id,prompt,answer\nq0,p0,1\nq1,Él,2\n".encode("latin-1")) and p,
     _train, "line 3", "(data row 1, column 'prompt'): byte 0xc9 is not UTF-8"),
    ("non-utf8 byte, benchmark jsonl", "m.jsonl",
     lambda p: _jsonl(p, [json.dumps({"problem": "p0", "answer": "1"}), '{"problem": "p\xff", "answer": "2"}'],
                      "latin-1"),
     _bench("math500"), "line 2", "byte 0xff is not UTF-8"),
    ("broken json line", "t.jsonl", lambda p: _jsonl(p, _with(_plain_lines(), 2, '{"prompt": "x", "answer": ')),
     _train, "line 3", "invalid JSON"),
    ("json line that is not an object", "t.jsonl", lambda p: _jsonl(p, _with(_plain_lines(), 1, '["x", 1]')),
     _train, "line 2", "expected a JSON object, got list"),
    ("missing answer field", "t.jsonl", lambda p: _jsonl(p, _with(_plain_lines(), 3, '{"prompt": "x"}')),
     _train, "line 4", "column 'answer': missing"),
    ("answer of the wrong type", "t.jsonl", lambda p: _jsonl(p, _with(_plain_lines(), 1, '{"prompt": "x", "answer": {"v": 1}}')),
     _train, "line 2", "column 'answer': must be a string or a number, got dict"),
    ("prompt of the wrong type", "t.jsonl", lambda p: _jsonl(p, _with(_plain_lines(), 1, '{"prompt": 5, "answer": "1"}')),
     _train, "line 2", "column 'prompt': must be a string, got int"),
    ("null answer, parquet", "t.parquet",
     lambda p: write_rows(p, [{"prompt": f"p{k}", "answer": None if k == 2 else "1"} for k in range(4)], "parquet"),
     _train, "row 2", "column 'answer': null"),
    ("empty prompt", "t.jsonl", lambda p: _jsonl(p, _with(_plain_lines(), 2, '{"prompt": "  ", "answer": "1"}')),
     _train, "line 3", "empty or whitespace-only prompt"),
    ("dapo row with two messages", "t.jsonl",
     lambda p: write_rows(p, [dapo_row("a", "1", "i0"), {**dapo_row("b", "2", "i1"), "prompt": dapo_row("b", "2", "i1")["prompt"] * 2}],
                          "jsonl"),
     _train, "line 2", "expected exactly one user message, got 2"),
    ("conflicting answers", "t.jsonl",
     lambda p: _jsonl(p, _plain_lines() + [json.dumps({"prompt": "Problem 1: compute 1 + 1.", "answer": "3"})]),
     _train, "line 5", "conflicting answers"),
    ("csv row with an extra field", "t.csv", lambda p: p.write_text("prompt,answer\np0,1\np1,2,3\n") and p,
     _train, "line 3", "(data row 1): 3 fields, but the header has 2"),
    ("gpqa choices repeat, csv", "g.csv",
     lambda p: write_rows(p, _gpqa_with(2, **{"Incorrect Answer 3": "  same", "Incorrect Answer 1": "same "}), "csv"),
     _bench("gpqa_diamond"), "row 2", "column 'Incorrect Answer 3': the same choice as column 'Incorrect Answer 1'"),
    ("gpqa wrong choice equals the correct one, jsonl", "g.jsonl",
     lambda p: write_rows(p, _gpqa_with(1, **{"Incorrect Answer 2": _gpqa_rows()[1]["Correct Answer"]}), "jsonl"),
     _bench("gpqa_diamond"), "line 2", "column 'Incorrect Answer 2': the same choice as column 'Correct Answer'"),
    ("gpqa empty choice", "g.csv", lambda p: write_rows(p, _gpqa_with(3, **{"Incorrect Answer 1": " "}), "csv"),
     _bench("gpqa_diamond"), "row 3", "column 'Incorrect Answer 1': must be a non-empty string"),
    ("benchmark file without its columns", "m.jsonl", lambda p: _jsonl(p, ["", json.dumps({"question": "q", "sol": "1"})]),
     _bench("math500"), "line 2", "not a math500 file"),
    ("undetectable layout", "t.jsonl", lambda p: _jsonl(p, [json.dumps({"question": "q", "answer": "1"})]),
     _train, "line 1", "cannot tell the data layout"),
    ("json array file", "t.json", lambda p: p.write_text(json.dumps([{"prompt": "p", "answer": "1"}], indent=1)) and p,
     _train, "line 1", "the file looks like one JSON array"),
    ("damaged parquet page", "t.parquet", _damaged_parquet, _train, "row 0", "cannot read the Parquet rows"),
    ("empty jsonl file", "t.jsonl", lambda p: p.write_text("") or p, _train, None, "the file has no rows"),
    ("blank-only jsonl file", "t.jsonl", lambda p: p.write_text("\n \n") or p, _train, None, "the file has no rows"),
    ("empty parquet file", "t.parquet", lambda p: p.write_bytes(b"") or p, _train, None, "cannot read as Parquet"),
    ("truncated parquet file", "t.parquet",
     lambda p: p.write_bytes(write_plain(p, 20, "parquet").path.read_bytes()[:300]) and p,
     _train, None, "cannot read as Parquet"),
    ("empty csv file", "t.csv", lambda p: p.write_text("") or p, _train, None, "cannot read as CSV"),
    ("unsupported extension", "t.txt", lambda p: p.write_text("prompt,answer\n") and p, _train, None,
     "unknown data file type '.txt'"),
    ("unsupported benchmark extension", "m.xlsx", lambda p: p.write_bytes(b"PK") and p, _bench("math500"), None,
     "unknown data file type '.xlsx'"),
    ("a directory", "dir.jsonl", lambda p: p.mkdir() or p, _train, None, "is a directory, not a data file"),
]


@pytest.mark.parametrize("name, writer, reader, where, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_data_file_is_one_error_naming_file_and_line(tmp_path, name, writer, reader, where, text):
    path = tmp_path / name
    writer(path)
    with pytest.raises(DatasetError) as info:
        reader(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message and text in message, message
    if where is not None:
        assert re.search(rf"\b{where}\b", message), message


def test_a_bad_row_through_train_is_one_line_naming_file_and_line(tmp_path):
    """End to end: ``nemo-gdro train`` on a training file with a Latin-1 byte: exit 2, one line, no traceback."""
    from nemo_gdro.testing.tiny_hf import build_tiny_hf
    from tests.data.fixtures import write_benchmark

    model = build_tiny_hf(tmp_path / "qwen3", arch="qwen3", seed=5)
    train = _jsonl(tmp_path / "train.jsonl", _with(_plain_lines(8), 5, '{"prompt": "déjà vu", "answer": "1"}'), "latin-1")
    math500 = write_benchmark("math500", tmp_path / "m.jsonl", num=2).path
    args = ["+recipe=qwen3_0p6b_dapo", f"model.path={model}", "model.dtype=float32", "rollout.engine=hf",
            f"data.train_files=[{train}]", f"++data.eval_files.math500=[{math500}]", "reward.num_workers=1",
            f"run.output_dir={tmp_path / 'run'}", "logging.tensorboard=false", "logging.progress=false"]
    done = subprocess.run([sys.executable, "-m", "nemo_gdro.cli", "train", *args], capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("[nemo-gdro] ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-3000:]
    assert f"{train}: line 6, character 14: byte 0xe9 is not UTF-8" in lines[0]
