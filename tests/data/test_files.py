"""Reading rows by layout: detection and schema errors naming file, row and column."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_gdro.data import files
from nemo_gdro.data.dataset import DatasetError
from nemo_gdro.data.files import DAPO, DAPO_PROCESSED, PLAIN, coerce_answer, detect_layout, read_chunks
from nemo_gdro.data.prompt_format import DAPO_PREFIX, DAPO_SUFFIX
from tests.data.fixtures import dapo_row, write_dapo_math, write_dapo_processed, write_plain, write_rows


def _read(path, layout):
    """(first row, text, answer, meta, count) per distinct text of each chunk."""
    out = []
    for c in read_chunks(path, layout):
        assert sum(c.counts) == c.num_rows
        out += list(zip(c.rows, c.texts, c.answers, c.meta(list(range(len(c.rows)))), c.counts, strict=True))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_layout_detection(tmp_path, fmt):
    assert detect_layout(write_dapo_math(tmp_path / f"a.{fmt}", 3, 2, fmt).path) is DAPO
    assert detect_layout(write_dapo_processed(tmp_path / f"b.{fmt}", 3, fmt).path) is DAPO_PROCESSED
    assert detect_layout(write_plain(tmp_path / f"c.{fmt}", 3, fmt).path) is PLAIN
    write_rows(tmp_path / f"d.{fmt}", [{"question": "q", "answer": "1"}], fmt)
    with pytest.raises(DatasetError, match=r"d\.\w+: cannot tell the data layout .*'question'.*set data.layout"):
        detect_layout(tmp_path / f"d.{fmt}")


def test_dapo_fixture_has_the_public_schema(tmp_path):
    path = write_dapo_math(tmp_path / "d.parquet", 3, 2, "parquet").path
    schema = pq.read_schema(path)
    assert schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert schema.field("prompt").type == pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    assert schema.field("reward_model").type == pa.struct([("ground_truth", pa.string()), ("style", pa.string())])
    assert schema.field("extra_info").type == pa.struct([("index", pa.string())])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_dapo_rows_and_meta(tmp_path, fmt):
    info = write_dapo_math(tmp_path / f"d.{fmt}", 2, 2, fmt, cjk_prompts=0, variant=False, shuffle_seed=None)
    rows = sorted(_read(info.path, DAPO))
    first = 1 if fmt == "jsonl" else 0
    # grouped rows: prompt 0 on rows 0-1, prompt 1 on rows 2-3; one entry per distinct text
    assert [(r[0], r[4]) for r in rows] == [(first, 2), (first + 2, 2)]
    assert rows[0][1] == DAPO_PREFIX + info.problems[0][0] + DAPO_SUFFIX and rows[0][2] == info.problems[0][1]
    meta = rows[0][3]
    assert set(meta) == {"data_source", "ability", "extra_info"} and set(meta["extra_info"]) == {"index"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_conflicts_inside_one_chunk_are_reported(tmp_path, fmt):
    rows = [dapo_row("p", "1", "a"), dapo_row("q", "2", "b"), dapo_row("p", " 1 ", "c"), dapo_row("p", "7", "d")]
    path = write_rows(tmp_path / f"c.{fmt}", rows, fmt)
    [chunk] = list(read_chunks(path, DAPO))
    first = 1 if fmt == "jsonl" else 0
    assert chunk.conflicts == [(first, "1", first + 3, "7")]  # " 1 " is the same answer
    assert sorted(chunk.counts) == [1, 3] and chunk.num_rows == 4


def _dapo_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.mark.parametrize(
    "bad,where",
    [
        (lambda r: r.pop("reward_model"), "line 3, column 'reward_model': missing"),
        (lambda r: r["reward_model"].pop("ground_truth"), "line 3, column 'reward_model.ground_truth': missing"),
        (lambda r: r["reward_model"].update(ground_truth=None), "line 3, column 'reward_model.ground_truth': must be a string or a number, got null"),
        (lambda r: r["reward_model"].update(ground_truth=True), "column 'reward_model.ground_truth': must be a string or a number, got bool"),
        (lambda r: r.update(prompt="bare text"), "line 3, column 'prompt': expected a list of chat messages, got str"),
        (lambda r: r["prompt"].append({"role": "assistant", "content": "x"}), "line 3, column 'prompt': expected exactly one user message, got 2"),
        (lambda r: r["prompt"][0].update(role="system"), "line 3, column 'prompt': expected one message with role 'user', got role 'system'"),
        (lambda r: r["prompt"][0].update(content=5), "line 3, column 'prompt': message 'content' must be a string, got int"),
    ],
)
def test_jsonl_schema_errors_name_file_line_and_column(tmp_path, bad, where):
    rows = [dapo_row(f"p{k}", str(k), f"i{k}") for k in range(4)]
    bad(rows[1])
    path = _dapo_jsonl(tmp_path / "bad.jsonl", [rows[0], "", rows[1], rows[2]])  # line 2 blank: rows[1] is line 3
    with pytest.raises(DatasetError) as e:
        _read(path, DAPO)
    assert str(e.value).startswith(f"{path}: ") and where in str(e.value)


def test_jsonl_invalid_json_and_non_object(tmp_path):
    path = _dapo_jsonl(tmp_path / "x.jsonl", [dapo_row("a", "1", "i"), "{oops", "[1, 2]"])
    with pytest.raises(DatasetError, match=r"line 2, column '-': invalid JSON.*line 3, column '-': expected a JSON object, got list"):
        _read(path, DAPO)


def _parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_parquet_schema_errors_name_file_row_and_column(tmp_path):
    rows = [dapo_row(f"p{k}", str(k), f"i{k}") for k in range(4)]
    # a null answer on row 2 (0-based)
    r = [dict(x) for x in rows]
    r[2] = {**r[2], "reward_model": {"ground_truth": None, "style": "s"}}
    with pytest.raises(DatasetError, match=r"null\.parquet: row 2, column 'reward_model.ground_truth': null"):
        _read(_parquet(tmp_path / "null.parquet", r), DAPO)
    # two messages on row 1
    r = [dict(x) for x in rows]
    r[1] = {**r[1], "prompt": r[1]["prompt"] * 2}
    with pytest.raises(DatasetError, match=r"row 1, column 'prompt': expected exactly one user message, got 2"):
        _read(_parquet(tmp_path / "two.parquet", r), DAPO)
    # a system role on row 3
    r = [dict(x) for x in rows]
    r[3] = {**r[3], "prompt": [{"content": "c", "role": "system"}]}
    with pytest.raises(DatasetError, match=r"row 3, column 'prompt': expected role 'user', got 'system'"):
        _read(_parquet(tmp_path / "role.parquet", r), DAPO)
    # missing column / nested field, wrong column type: the whole column
    r = [{k: v for k, v in x.items() if k != "reward_model"} for x in rows]
    with pytest.raises(DatasetError, match=r"nocol\.parquet: every row, column 'reward_model': missing"):
        _read(_parquet(tmp_path / "nocol.parquet", r), DAPO)
    r = [{**x, "reward_model": {"style": "s"}} for x in rows]
    with pytest.raises(DatasetError, match=r"every row, column 'reward_model.ground_truth': missing"):
        _read(_parquet(tmp_path / "nofield.parquet", r), DAPO)
    r = [{**x, "prompt": "bare"} for x in rows]
    with pytest.raises(DatasetError, match=r"every row, column 'prompt': Parquet type string, expected a list of"):
        _read(_parquet(tmp_path / "type.parquet", r), DAPO)
    r = [{"prompt": f"p{k}", "answer": [1.5]} for k in range(3)]
    with pytest.raises(DatasetError, match=r"every row, column 'answer': Parquet type list<\w+: double>, expected a string or a number"):
        _read(_parquet(tmp_path / "ans.parquet", r), PLAIN)


def test_damaged_parquet_and_unknown_suffix(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"broken\.parquet: cannot read as Parquet"):
        _read(tmp_path / "broken.parquet", DAPO)
    (tmp_path / "data.tsv").write_text("prompt\tanswer\n")
    with pytest.raises(DatasetError, match=r"data\.tsv: unknown data file type '.tsv'.* or CSV \(.csv\)"):
        _read(tmp_path / "data.tsv", PLAIN)
    with pytest.raises(DatasetError, match="does not exist"):
        _read(tmp_path / "absent.jsonl", PLAIN)


@pytest.mark.parametrize(
    "value,kind,expected",
    [("7", "scalar", "7"), (7, "scalar", "7"), (27.0, "scalar", "27"), (0.5, "scalar", "0.5"), (True, "scalar", None),
     (float("nan"), "scalar", None), (None, "scalar", None), (["$3$", 4], "list", "$3$, 4"), ([], "list", None),
     ("x", "list", None)],
)
def test_coerce_answer(value, kind, expected):
    assert coerce_answer(value, kind) == expected


def test_parquet_int_and_float_answers(tmp_path):
    path = _parquet(tmp_path / "n.parquet", [{"prompt": "a", "answer": 3}, {"prompt": "b", "answer": 4}])
    assert [r[2] for r in _read(path, PLAIN)] == ["3", "4"]
    path = _parquet(tmp_path / "f.parquet", [{"prompt": "a", "answer": 27.0}, {"prompt": "b", "answer": 0.25}])
    assert [r[2] for r in _read(path, PLAIN)] == ["27", "0.25"]


# ------------------------------------------------------------ JSONL fast path
def _chunks(path, layout):
    """Everything a chunk carries, chunk boundaries aside (rows are file rows, so comparable)."""
    entries, conflicts, num_rows = [], [], 0
    for c in read_chunks(path, layout):
        num_rows += c.num_rows
        conflicts += c.conflicts
        entries += list(zip(c.rows, c.texts, c.answers, c.counts, c.meta(list(range(len(c.rows)))), strict=True))
    return sorted(entries), sorted(conflicts), num_rows


def _python_only(monkeypatch):
    monkeypatch.setattr(files, "_jsonl_arrow_chunks", lambda path, layout: None)


def _arrow_only(monkeypatch):
    def refuse(path, layout):
        raise AssertionError(f"{path}: fell back to the line-by-line reader")

    monkeypatch.setattr(files, "_jsonl_python_chunks", refuse)


@pytest.mark.parametrize("small_chunks", [False, True])
def test_jsonl_fast_path_equals_line_by_line(tmp_path, monkeypatch, small_chunks):
    rows = [dapo_row(f"Problem {k % 5}", str(k % 5), f"i{k}") for k in range(23)]
    rows[7]["reward_model"]["ground_truth"] = " 2 "  # same answer as the other copies of problem 2
    rows[11] = dapo_row("Problem 1", "99", "conflict")  # conflicts with line 2
    path = write_rows(tmp_path / "d.jsonl", rows, "jsonl")
    if small_chunks:  # several record batches / chunks: exact copies fold across them in the loader
        monkeypatch.setattr(files, "JSONL_BLOCK_BYTES", 2048)
        monkeypatch.setattr(files, "JSONL_FAST_ROWS", 4)
        monkeypatch.setattr(files, "CHUNK_ROWS", 4)
    with monkeypatch.context() as m:
        _arrow_only(m)
        fast = _chunks(path, DAPO)
        if small_chunks:
            assert len(list(read_chunks(path, DAPO))) > 2
    with monkeypatch.context() as m:
        _python_only(m)
        slow = _chunks(path, DAPO)
    assert fast == slow and fast[2] == 23
    if not small_chunks:
        assert fast[1] == [(2, "1", 12, "99")]  # 1-based lines


@pytest.mark.parametrize(
    "lines",
    [
        ['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": "x"}'],  # int and string answers
        ['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", "answer": "2"}'],  # a blank line
        ['{"prompt": "a", "answer": "2024-01-05"}', '{"prompt": "b", "answer": "2"}'],  # a date-like string
        ['{"prompt": "a", "answer": "1"} {"prompt": "b", "answer": "2"}', '{"prompt": "c", "answer": "3"}'],
    ],
)
def test_jsonl_unusual_files_give_the_line_by_line_answer(tmp_path, monkeypatch, lines):
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with monkeypatch.context() as m:
        _python_only(m)
        try:
            want = _chunks(path, PLAIN)
        except DatasetError as e:
            want = str(e)
    try:
        got = _chunks(path, PLAIN)
    except DatasetError as e:
        got = str(e)
    assert got == want


def test_parquet_small_batches_keep_file_row_numbers(tmp_path, monkeypatch):
    rows = [dapo_row(f"Problem {k % 3}", str(k % 3), f"i{k}") for k in range(10)]
    rows[8] = dapo_row("Problem 0", "5", "c")
    path = write_rows(tmp_path / "d.parquet", rows, "parquet")
    monkeypatch.setattr(files, "CHUNK_ROWS", 3)
    assert [c.num_rows for c in read_chunks(path, DAPO)] == [3, 3, 3, 1]
    entries, conflicts, _ = _chunks(path, DAPO)
    assert conflicts == [(6, "0", 8, "5")]  # rows 6 and 8 share the third chunk; 0-based file rows
    assert sorted((e[0], e[3]) for e in entries if e[1].endswith("Problem 0" + DAPO_SUFFIX)) == [(0, 1), (3, 1), (6, 2), (9, 1)]


# ------------------------------------------------------------ encodings, damaged files (issue 21, item 7)
def _latin1(text: str) -> bytes:
    """``text`` as Latin-1 bytes: 'é' becomes the single byte 0xe9, which is not UTF-8."""
    return text.encode("latin-1")


@pytest.mark.parametrize("blank_line", [False, True])  # the fast reader, and the line-by-line one after a blank line
def test_non_utf8_byte_in_jsonl_names_file_line_and_character(tmp_path, blank_line):
    lines = [json.dumps({"prompt": f"p{k}", "answer": "1"}) for k in range(4)]
    lines[2] = '{"prompt": "café", "answer": "1"}'
    if blank_line:
        lines.insert(1, "")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_latin1("\n".join(lines) + "\n"))
    with pytest.raises(DatasetError) as e:
        _read(path, PLAIN)
    line = 4 if blank_line else 3
    assert str(e.value).startswith(f"{path}: line {line}, character 16: byte 0xe9 is not UTF-8"), str(e.value)


def test_non_utf8_byte_in_the_first_jsonl_row_names_the_line_in_layout_detection(tmp_path):
    path = tmp_path / "first.jsonl"
    path.write_bytes(b"\n" + _latin1('{"prompt": "é", "answer": "1"}\n'))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: line 2, character 13: byte 0xe9 is not UTF-8"):
        detect_layout(path)


def test_non_utf8_byte_in_csv_names_line_row_and_column(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(_latin1('prompt,answer\np0,1\n"two\nlines",2\np2,caf\xe9\n'))
    with pytest.raises(DatasetError) as e:
        _read(path, PLAIN)
    assert str(e.value) == (f"{path}: line 5, character 7 (data row 2, column 'answer'): byte 0xe9 is not UTF-8 "
                            "(data files must be UTF-8 encoded; re-save the file as UTF-8)")
    header = tmp_path / "header.csv"
    header.write_bytes(_latin1("pr\xe9mpt,answer\np,1\n"))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(header))}: line 1, character 3 \(the header\): byte 0xe9 is not UTF-8"):
        _read(header, PLAIN)


def test_csv_row_with_a_wrong_field_count_names_line_and_row(tmp_path):
    path = tmp_path / "fields.csv"
    path.write_text('prompt,answer\np0,1\np1,2,extra\n')
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: line 3 \(data row 1\): 3 fields, but the header has 2$"):
        _read(path, PLAIN)


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "p", "answer": "1"}\n{"prompt": "q", "answer": "2"}\n')
    assert detect_layout(path) is PLAIN
    assert [(r[0], r[1], r[2]) for r in _read(path, PLAIN)] == [(1, "p", "1"), (2, "q", "2")]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_is_named_as_such(tmp_path, indent):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"prompt": "p", "answer": "1"}], indent=indent))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: line 1.*the file looks like one JSON array: give JSON lines"):
        detect_layout(path)
    with pytest.raises(DatasetError, match=r"line 1, column '-': .*the file looks like one JSON array"):
        _read(path, PLAIN)


def test_a_directory_is_not_called_missing(tmp_path):
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path))} is a directory, not a data file$"):
        _read(tmp_path, PLAIN)


def test_layout_detection_of_jsonl_names_the_row_it_read(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('\n{"question": "q", "answer": "1"}\n')
    with pytest.raises(DatasetError, match=r"cannot tell the data layout from the columns of its first row \(line 2\)"):
        detect_layout(path)


def test_damaged_parquet_data_pages_name_the_file_and_row(tmp_path):
    path = write_plain(tmp_path / "p.parquet", 2000, "parquet").path
    data = bytearray(path.read_bytes())
    for offset in range(200, 1200, 7):  # inside the first data page; the footer stays readable
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: cannot read the Parquet rows from row 0 on \("):
        _read(path, PLAIN)
