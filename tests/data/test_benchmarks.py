"""Benchmark loaders on fixture files in each public layout."""

import pytest

from nemo_gdro.data.benchmarks import (
    BENCHMARKS,
    CHOICE_LETTERS,
    choice_order,
    load_benchmark,
    load_benchmarks,
    read_benchmark,
)
from nemo_gdro.data.dataset import DatasetError
from nemo_gdro.data.prompt_format import PromptFormat, dapo_wrap
from nemo_gdro.registry import UnknownNameError
from tests.data.fixtures import _benchmark_row as benchmark_row
from tests.data.fixtures import math_problem, write_benchmark, write_rows

MATH = [n for n, s in BENCHMARKS.items() if s.answer_type == "math"]


def test_registry_names():
    assert set(BENCHMARKS) == {"aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "gpqa_diamond"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("name", MATH)
def test_math_benchmark_native_layout(tmp_path, name, fmt):
    info = write_benchmark(name, tmp_path / f"{name}.{fmt}", num=5, fmt=fmt)
    ds = load_benchmark(name, info.path, log=None)
    assert len(ds) == 5
    want = dict(info.problems)
    for r in ds:
        assert r.meta["benchmark"] == name and r.meta["answer_type"] == "math"
        assert r.prompt == r.meta["problem"] and r.meta["problem"] in want
        expected = want[r.meta["problem"]]
        assert r.answer == (f"${expected}$" if name == "olympiadbench" else expected)  # amc23 27.0 -> "27"
    if name == "math500":
        assert {"subject", "level", "unique_id"} <= set(ds[0].meta)
    dapo = load_benchmark(name, info.path, prompt_format=PromptFormat(instruction="dapo"), log=None)
    assert [r.prompt for r in dapo] == [dapo_wrap(r.prompt) for r in ds]


def test_aime24_dapo_layout_960_rows_dedup_to_30(tmp_path):
    info = write_benchmark("aime24", tmp_path / "aime-2024.parquet", num=30, fmt="parquet", layout="dapo", repeats=32)
    assert info.rows == 960
    ds, rep = read_benchmark("aime24", info.path, log=None)
    assert (rep.rows_read, rep.duplicate_rows, len(ds)) == (960, 930, 30)
    native = load_benchmark("aime24", write_benchmark("aime24", tmp_path / "h4.jsonl", num=30).path, log=None)
    # the same problems get the same uids and ids from either layout
    assert [r.meta["uid"] for r in ds] == [r.meta["uid"] for r in native]
    assert all(r.prompt == dapo_wrap(r.meta["problem"]) for r in ds)  # already wrapped, kept as is


def test_aime25_from_two_halves_and_int_answers(tmp_path):
    a = write_benchmark("aime25", tmp_path / "I.jsonl", num=3, start=0)
    b = write_rows(tmp_path / "II.parquet", [{"problem_idx": 16, "problem": "Find $7 \\cdot 6$.", "answer": 42}], "parquet")
    ds = load_benchmark("aime25", [a.path, b], log=None)
    assert len(ds) == 4 and "42" in ds.answers


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_gpqa_multiple_choice(tmp_path, fmt):
    info = write_benchmark("gpqa_diamond", tmp_path / f"gpqa.{fmt}", num=8, fmt=fmt)
    ds = load_benchmark("gpqa_diamond", info.path, seed=0, log=None)
    correct = {p: a for p, a in info.problems}
    letters = set()
    for r in ds:
        assert r.meta["answer_type"] == "choice" and r.answer in CHOICE_LETTERS
        choices = r.meta["choices"]
        assert choices[CHOICE_LETTERS.index(r.answer)] == correct[r.meta["problem"]] == r.meta["correct_choice"]
        assert len(set(choices)) == 4 and all(c == c.strip() for c in choices)
        for k, c in enumerate(choices):
            assert f"\n{CHOICE_LETTERS[k]}) {c}" in r.prompt
        assert r.prompt.startswith("Answer the following multiple-choice question.") and r.meta["problem"] in r.prompt
        letters.add(r.answer)
    assert len(letters) > 1  # shuffled, not always A
    again = load_benchmark("gpqa_diamond", info.path, seed=0, log=None)
    assert [r.prompt for r in again] == [r.prompt for r in ds]
    other = load_benchmark("gpqa_diamond", info.path, seed=1, log=None)
    assert [r.answer for r in other] != [r.answer for r in ds]
    # the letter instruction is kept under the dapo instruction setting (never a math wrap)
    dapo = load_benchmark("gpqa_diamond", info.path, prompt_format=PromptFormat(instruction="dapo"), log=None)
    assert [r.prompt for r in dapo] == [r.prompt for r in ds]


def test_choice_order_is_a_fixed_permutation():
    assert choice_order(0, 12345) == choice_order(0, 12345)
    assert sorted(choice_order(3, 99)) == [0, 1, 2, 3]
    assert len({tuple(choice_order(0, u)) for u in range(200)}) == 24


def test_wrong_files_are_clear_errors(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", [{"question": "q", "solution": "s"}], "jsonl")
    with pytest.raises(DatasetError, match=r"m\.jsonl: not a math500 file: expected a problem column \(one of \['problem'\]\)"):
        load_benchmark("math500", path, log=None)
    rows = [{"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b", "Incorrect Answer 2": "c"}]
    with pytest.raises(DatasetError, match=r"column 'Incorrect Answer 3': missing"):
        load_benchmark("gpqa_diamond", write_rows(tmp_path / "g.jsonl", rows, "jsonl"), log=None)
    rows[0]["Incorrect Answer 3"] = "  "
    with pytest.raises(DatasetError, match=r"g2\.jsonl line 1, column 'Incorrect Answer 3': must be a non-empty string"):
        load_benchmark("gpqa_diamond", write_rows(tmp_path / "g2.jsonl", rows, "jsonl"), log=None)
    with pytest.raises(UnknownNameError, match="benchmark 'aime2024' is not known; valid names: aime24, aime25,"):
        load_benchmark("aime2024", path, log=None)
    with pytest.raises(DatasetError, match="does not exist"):
        load_benchmark("aime24", tmp_path / "none.parquet", log=None)
    rows = [{"question": "same problem", "final_answer": ["1"]}, {"question": "same \n problem", "final_answer": ["2"]}]
    with pytest.raises(DatasetError, match="conflicting answers"):
        load_benchmark("olympiadbench", write_rows(tmp_path / "o.jsonl", rows, "jsonl"), log=None)


def test_load_benchmarks_mapping(tmp_path):
    paths = {n: write_benchmark(n, tmp_path / f"{n}.jsonl", num=3).path for n in ("math500", "gpqa_diamond")}
    out = load_benchmarks(paths, log=None)
    assert list(out) == ["math500", "gpqa_diamond"] and all(len(d) == 3 for d in out.values())


def test_csv_files(tmp_path):
    info = write_benchmark("math500", tmp_path / "math500.csv", num=4, fmt="csv")
    ds = load_benchmark("math500", info.path, log=None)
    assert sorted((r.meta["problem"], r.answer) for r in ds) == sorted(info.problems)
    assert ds[0].meta["row"].startswith("row ") and ds[0].meta["level"] in {"1", "2", "3", "4", "5"}  # CSV: text
    # rows are data rows (0-based, header excluded), not lines: a quoted field spans two lines
    path = tmp_path / "g.csv"
    path.write_text('Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n'
                    '"two\nlines, quoted",1,2,3,4\n"q",a,b,c,""\n')
    with pytest.raises(DatasetError, match=r"g\.csv row 1, column 'Incorrect Answer 3': must be a non-empty string"):
        load_benchmark("gpqa_diamond", path, log=None)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DatasetError, match=r"e\.csv: cannot read as CSV"):
        load_benchmark("math500", tmp_path / "e.csv", log=None)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
@pytest.mark.parametrize(
    "column, same_as",
    [("Incorrect Answer 2", "Incorrect Answer 1"), ("Incorrect Answer 3", "Correct Answer")],
)
def test_gpqa_row_whose_choices_repeat_is_refused_naming_file_row_and_columns(tmp_path, fmt, column, same_as):
    """Issue 21, item 7: two identical options make the letter answer ambiguous; stray whitespace does not hide it."""
    rows = [benchmark_row("gpqa_diamond", k, *math_problem(k)) for k in range(4)]
    rows[2][column] = f"  {rows[2][same_as].strip()}\n"
    path = write_rows(tmp_path / f"dup.{fmt}", rows, fmt)
    with pytest.raises(DatasetError) as e:
        load_benchmark("gpqa_diamond", path, log=None)
    where = "line 3" if fmt == "jsonl" else "row 2"
    value = rows[2][same_as].strip()
    assert str(e.value) == (f"{path} {where}, column {column!r}: the same choice as column {same_as!r} ({value!r}); "
                            "the choices must differ"), str(e.value)
