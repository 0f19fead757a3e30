"""Reading prompt rows out of JSONL and Parquet files, by layout.

A *layout* says where a row's prompt text and answer are:

* ``dapo`` (BytedTsinghua-SIA/DAPO-Math-17k and verl-style files): ``prompt`` is
  a list of chat messages holding exactly one ``{"role": "user", "content": ...}``,
  the answer is ``reward_model.ground_truth``; ``data_source``, ``ability``,
  ``extra_info`` (``extra_info.index``) go to ``meta``;
* ``dapo_processed`` (open-r1/DAPO-Math-17k-Processed): ``prompt`` is the bare
  problem string, the answer is ``solution``; the copies of the original row
  (``source_prompt``, ``reward_model``) are not kept;
* ``plain``: ``prompt`` string, ``answer``; any other column (``id``...) goes to ``meta``;

and the benchmark layouts built by ``benchmarks.py`` with the same fields.
``detect_layout`` picks one of the first three from a file's columns.

Files are read in chunks of ``CHUNK_ROWS`` rows: Parquet through pyarrow with
vectorised extraction of nested fields, JSONL line by line. Answers may be
strings, integers or floats in the file (integral floats such as ``27.0``
become ``"27"``); list answers (``list`` answer kind) are joined with ``", "``.

Row numbers in messages: JSONL ``line n`` is 1-based (blank lines count and are
skipped), Parquet and CSV ``row n`` is the 0-based data row (CSV: the header is
not a row, and a quoted field may span lines). CSV is read with every column as
text (GPQA ships as ``gpqa_diamond.csv``). Text files must be UTF-8 (a leading
byte-order mark is allowed): a byte that is not names its line and character.
Every error is a ``DatasetError`` whose message starts with the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nemo_gdro.data.errors import DatasetError

CHUNK_ROWS = 262_144
JSONL_FAST_ROWS = 65_536  # the JSON reader's batches are combined up to this many rows (memory vs. dedup work)
JSONL_BLOCK_BYTES = 1 << 23  # pyarrow JSON reader block (one record batch per block)
_MAX_ERRORS = 10
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)


@dataclass(frozen=True)
class Layout:
    """Where a row's text and answer live (``text`` / ``answer`` are paths into nested objects)."""

    name: str
    text: tuple[str, ...]
    answer: tuple[str, ...]
    text_kind: Literal["string", "messages"] = "string"
    answer_kind: Literal["scalar", "list"] = "scalar"
    drop: tuple[str, ...] = ()  # root columns not copied to meta (besides the text and answer roots)

    @property
    def text_name(self) -> str:
        return ".".join(self.text)

    @property
    def answer_name(self) -> str:
        return ".".join(self.answer)

    @property
    def skipped_roots(self) -> frozenset[str]:
        return frozenset((self.text[0], self.answer[0], *self.drop))


DAPO = Layout("dapo", ("prompt",), ("reward_model", "ground_truth"), text_kind="messages")
DAPO_PROCESSED = Layout("dapo_processed", ("prompt",), ("solution",), drop=("source_prompt", "reward_model"))
PLAIN = Layout("plain", ("prompt",), ("answer",))
TRAIN_LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (DAPO, DAPO_PROCESSED, PLAIN)}


@dataclass
class Chunk:
    """Up to ``CHUNK_ROWS`` rows of one file, folded by exact text.

    ``texts`` are the chunk's distinct prompt texts; ``rows[k]`` is the first row
    holding ``texts[k]``, ``answers[k]`` its answer (whitespace-stripped) and
    ``counts[k]`` how many rows of the chunk hold that text. ``conflicts`` lists
    ``(row_a, answer_a, row_b, answer_b)`` for texts that appear in the chunk
    with two different answers. ``meta(positions)`` returns the other columns of
    the first rows of those distinct texts (called only for texts new to the
    loader).
    """

    num_rows: int
    rows: list[int]
    texts: list[str]
    answers: list[str]
    counts: list[int]
    conflicts: list[tuple[int, str, int, str]]
    meta: Callable[[list[int]], list[dict[str, Any]]] = field(repr=False)


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a data file (missing, a directory, an unknown type), or ``None``."""
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"{path} is a directory, not a data file"
    try:
        file_format(path)
    except DatasetError as e:
        return str(e)
    return None


def file_format(path: Path) -> Literal["jsonl", "parquet", "csv"]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in CSV_SUFFIXES:
        return "csv"
    raise DatasetError(
        f"{path}: unknown data file type {suffix!r}; expected JSON lines ({', '.join(JSONL_SUFFIXES)}), "
        f"Parquet ({', '.join(PARQUET_SUFFIXES)}) or CSV ({', '.join(CSV_SUFFIXES)})"
    )


def row_label(fmt: str, row: int) -> str:
    """``line n`` (1-based) for JSONL; ``row n`` (0-based data row) for Parquet and CSV."""
    return f"line {row}" if fmt == "jsonl" else f"row {row}"


class _Errors:
    """Collects per-row schema errors of one file; ``raise_if_any`` names the file."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.items: list[str] = []
        self.count = 0

    def add(self, row: int | None, column: str, what: str) -> None:
        self.count += 1
        if len(self.items) < _MAX_ERRORS:
            where = "every row" if row is None else row_label(self.fmt, row)
            self.items.append(f"{where}, column {column!r}: {what}")

    def raise_if_any(self) -> None:
        if self.count:
            more = self.count - len(self.items)
            tail = f" (and {more} more)" if more > 0 else ""
            raise DatasetError(f"{self.path}: " + "; ".join(self.items) + tail)


def coerce_answer(value: Any, kind: str) -> str | None:
    """The answer as a string, or ``None`` when its type is not accepted."""
    if kind == "list":
        if not isinstance(value, list | tuple) or not value:
            return None
        parts = [coerce_answer(v, "scalar") for v in value]
        return None if any(p is None for p in parts) else ", ".join(parts)  # type: ignore[arg-type]
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ------------------------------------------------------------------ text
def _utf8_error(path: Path, lineno: int, raw: bytes, err: UnicodeDecodeError) -> DatasetError:
    """Where a line stops being UTF-8: the 1-based line, the character and the byte."""
    char = len(raw[: err.start].decode("utf-8", errors="replace")) + 1
    return DatasetError(
        f"{path}: line {lineno}, character {char}: byte 0x{raw[err.start]:02x} is not UTF-8 "
        "(data files must be UTF-8 encoded; re-save the file as UTF-8)"
    )


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` of a UTF-8 text file; a leading byte-order mark is dropped.

    Lines end at ``\n`` only (as ``_count_lines`` counts them); a byte that is not
    UTF-8, or a file that cannot be opened, is a ``DatasetError`` naming the file
    (and the line).
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"{path}: cannot open the file ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, lineno, raw, e) from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield lineno, line


def _not_json_lines_hint(line: str) -> str:
    """A hint for a whole-file JSON array given where JSON lines are expected."""
    return "; the file looks like one JSON array: give JSON lines (one object per line)" if line.lstrip().startswith("[") else ""


# ------------------------------------------------------------------ JSONL
def _walk(row: Mapping[str, Any], path: Sequence[str]) -> tuple[Any, str | None]:
    """Value at ``path`` or ``(None, name of the missing part)``."""
    cur: Any = row
    for k, key in enumerate(path):
        if not isinstance(cur, Mapping) or key not in cur:
            return None, ".".join(path[: k + 1])
        cur = cur[key]
    return cur, None


def _message_text(value: Any) -> tuple[str | None, str]:
    if not isinstance(value, list):
        return None, f"expected a list of chat messages, got {_type_name(value)}"
    if len(value) != 1:
        roles = [m.get("role") if isinstance(m, Mapping) else _type_name(m) for m in value]
        return None, f"expected exactly one user message, got {len(value)} messages (roles {roles})"
    msg = value[0]
    if not isinstance(msg, Mapping) or msg.get("role") != "user":
        role = msg.get("role") if isinstance(msg, Mapping) else _type_name(msg)
        return None, f"expected one message with role 'user', got role {role!r}"
    content = msg.get("content")
    if not isinstance(content, str):
        return None, f"message 'content' must be a string, got {_type_name(content)}"
    return content, ""


def first_jsonl_line(path: Path) -> tuple[int, dict[str, Any]]:
    """The first non-blank line's number and object (for layout detection)."""
    for lineno, line in text_lines(path):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"{path}: line {lineno}, character {e.colno}: invalid JSON ({e.msg}){_not_json_lines_hint(line)}"
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(
                    f"{path}: line {lineno}: expected a JSON object, got {_type_name(row)}{_not_json_lines_hint(line)}"
                )
            return lineno, row
    raise DatasetError(f"{path}: the file has no rows (it is empty or holds only blank lines)")


def first_jsonl_row(path: Path) -> dict[str, Any]:
    """The first non-blank line's object (for layout detection)."""
    return first_jsonl_line(path)[1]


def first_row_where(path: Path) -> str:
    """`` of its first row (line n)`` for JSON lines, whose columns come from that row; ``""`` otherwise."""
    return f" of its first row (line {first_jsonl_line(path)[0]})" if file_format(path) == "jsonl" else ""


def _jsonl_chunks(path: Path, layout: Layout) -> Iterator[Chunk]:
    fast = _jsonl_arrow_chunks(path, layout)
    if fast is not None:
        yield from fast
        return
    yield from _jsonl_python_chunks(path, layout)


def _jsonl_python_chunks(path: Path, layout: Layout) -> Iterator[Chunk]:
    """Line-by-line JSONL reader: exact 1-based line numbers in every error."""
    errors = _Errors(path, "jsonl")
    skip = layout.skipped_roots

    class _Acc:
        def __init__(self) -> None:
            self.num_rows = 0
            self.pos: dict[str, int] = {}
            self.rows: list[int] = []
            self.texts: list[str] = []
            self.answers: list[str] = []
            self.counts: list[int] = []
            self.conflicts: list[tuple[int, str, int, str]] = []
            self.objs: list[dict[str, Any]] = []

        def add(self, lineno: int, text: str, answer: str, obj: dict[str, Any]) -> None:
            self.num_rows += 1
            k = self.pos.get(text)
            if k is None:
                self.pos[text] = len(self.texts)
                self.rows.append(lineno)
                self.texts.append(text)
                self.answers.append(answer)
                self.counts.append(1)
                self.objs.append(obj)
                return
            self.counts[k] += 1
            if answer != self.answers[k]:
                self.conflicts.append((self.rows[k], self.answers[k], lineno, answer))

        def chunk(self) -> Chunk:
            objs = self.objs

            def meta(pos: list[int]) -> list[dict[str, Any]]:
                return [{k: v for k, v in objs[p].items() if k not in skip} for p in pos]

            return Chunk(self.num_rows, self.rows, self.texts, self.answers, self.counts, self.conflicts, meta)

    acc = _Acc()
    with closing(text_lines(path)) as lines:  # closes the file when a caller stops early
        for lineno, line in lines:
            if not line or line.isspace():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.add(lineno, "-", f"invalid JSON at character {e.colno} ({e.msg}){_not_json_lines_hint(line)}")
                continue
            if not isinstance(obj, dict):
                errors.add(lineno, "-", f"expected a JSON object, got {_type_name(obj)}{_not_json_lines_hint(line)}")
                continue
            raw_text, missing = _walk(obj, layout.text)
            if missing is not None:
                errors.add(lineno, missing, "missing")
                continue
            if layout.text_kind == "messages":
                text, why = _message_text(raw_text)
                if text is None:
                    errors.add(lineno, layout.text_name, why)
                    continue
            elif isinstance(raw_text, str):
                text = raw_text
            else:
                errors.add(lineno, layout.text_name, f"must be a string, got {_type_name(raw_text)}")
                continue
            raw_answer, missing = _walk(obj, layout.answer)
            if missing is not None:
                errors.add(lineno, missing, "missing")
                continue
            answer = coerce_answer(raw_answer, layout.answer_kind)
            if answer is None:
                want = "a non-empty list of strings/numbers" if layout.answer_kind == "list" else "a string or a number"
                errors.add(lineno, layout.answer_name, f"must be {want}, got {_type_name(raw_answer)}")
                continue
            acc.add(lineno, text, answer.strip(), obj)
            if acc.num_rows >= CHUNK_ROWS:
                errors.raise_if_any()
                yield acc.chunk()
                acc = _Acc()
    errors.raise_if_any()
    if acc.num_rows:
        yield acc.chunk()


# ---------------------------------------------------------------- Parquet
def _pyarrow() -> tuple[Any, Any, Any]:
    # pyarrow is a core dependency; imported here so that importing this module stays cheap.
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return pa, pc, pq


def parquet_columns(path: Path) -> dict[str, Any]:
    """Root column name -> pyarrow type of a Parquet file."""
    _, _, pq = _pyarrow()
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DatasetError(f"{path}: cannot read as Parquet ({e})") from None
    return {f.name: f.type for f in schema}


def _field_type(path: Path, columns: Mapping[str, Any], fpath: Sequence[str], what: str = "Parquet") -> Any:
    import pyarrow as pa

    if fpath[0] not in columns:
        raise DatasetError(f"{path}: every row, column {fpath[0]!r}: missing (columns: {sorted(columns)})")
    t = columns[fpath[0]]
    for k, key in enumerate(fpath[1:], start=1):
        if not pa.types.is_struct(t) or t.get_field_index(key) < 0:
            raise DatasetError(f"{path}: every row, column {'.'.join(fpath[: k + 1])!r}: missing ({what} type of "
                               f"{'.'.join(fpath[:k])!r} is {t})")
        t = t.field(key).type
    return t


def _is_text(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_scalar_answer(t: Any) -> bool:
    import pyarrow as pa

    return bool(_is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t))


def _check_parquet_types(path: Path, columns: Mapping[str, Any], layout: Layout, what: str = "Parquet") -> None:
    """Column types of ``layout`` in an Arrow schema (``what``: the file kind named in messages)."""
    import pyarrow as pa

    t = _field_type(path, columns, layout.text, what)
    if layout.text_kind == "messages":
        ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)
        vt = t.value_type if ok else None
        if not ok or vt.get_field_index("role") < 0 or vt.get_field_index("content") < 0:
            raise DatasetError(
                f"{path}: every row, column {layout.text_name!r}: {what} type {t}, expected a list of "
                "struct<role, content> chat messages"
            )
        for key in ("role", "content"):
            if not _is_text(vt.field(key).type):
                raise DatasetError(f"{path}: every row, column '{layout.text_name}.{key}': {what} type "
                                   f"{vt.field(key).type}, expected a string")
    elif not _is_text(t):
        raise DatasetError(f"{path}: every row, column {layout.text_name!r}: {what} type {t}, expected a string")
    t = _field_type(path, columns, layout.answer, what)
    if layout.answer_kind == "list":
        ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_scalar_answer(t.value_type)
    else:
        ok = _is_scalar_answer(t)
    if not ok:
        want = "a list of strings/numbers" if layout.answer_kind == "list" else "a string or a number"
        raise DatasetError(f"{path}: every row, column {layout.answer_name!r}: {what} type {t}, expected {want}")


def _leaf(pc: Any, batch: Any, fpath: Sequence[str]) -> Any:
    arr = batch.column(fpath[0])
    for key in fpath[1:]:
        arr = pc.struct_field(arr, key)  # a null parent gives a null child
    return arr


def _null_rows(pc: Any, arr: Any) -> list[int]:
    if arr.null_count == 0:
        return []
    return np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False)).tolist()


def _leaf_path(pf: Any, layout: Layout) -> str | None:
    """Parquet leaf path of the prompt text (``prompt.list.element.content`` for messages)."""
    want = layout.text[0]
    for i in range(len(pf.schema)):
        parts = pf.schema.column(i).path.split(".")
        if layout.text_kind == "string" and parts == list(layout.text):
            return ".".join(parts)
        if layout.text_kind == "messages" and parts[0] == want and parts[-1] == "content" and len(parts) == 4:
            return ".".join(parts)
    return None


def _fold(pc: Any, pa: Any, text_arr: Any, answers: Any) -> tuple[Any, Any, Any, Any, list[tuple[int, int]]]:
    """Per-chunk dedup in Arrow/numpy: distinct text ids, their first rows and counts,
    and pairs of rows (a, b) where one text has two different answers."""
    enc = text_arr if pa.types.is_dictionary(text_arr.type) else pc.dictionary_encode(text_arr)
    idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniq, first, counts = np.unique(idx, return_index=True, return_counts=True)
    aenc = pc.dictionary_encode(answers)
    aidx = aenc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    pair_ids, pair_first = np.unique(idx * max(len(aenc.dictionary), 1) + aidx, return_index=True)
    conflicts: list[tuple[int, int]] = []
    if len(pair_ids) > len(uniq):
        first_of = dict(zip(uniq.tolist(), first.tolist(), strict=True))
        for pos in pair_first.tolist():
            a = first_of[int(idx[pos])]
            if a != pos and aidx[a] != aidx[pos]:
                conflicts.append((a, pos))
    return enc.dictionary, uniq, first, counts, conflicts


def _batch_chunk(
    batch: Any, layout: Layout, path: Path, fmt: str, first_row: int, meta_cols: Sequence[str], eager_meta: bool
) -> Chunk:
    """One Arrow record batch -> ``Chunk`` (vectorised checks and per-chunk dedup).

    ``first_row`` is the file row number of the batch's first row (0-based Parquet
    row, or 1-based JSONL line). ``eager_meta`` extracts the distinct texts' other
    columns now, so the chunk does not keep the batch alive.
    """
    pa, pc, _ = _pyarrow()
    errors = _Errors(path, fmt)
    text_arr = _leaf(pc, batch, layout.text)
    bad = False
    for i in _null_rows(pc, text_arr):
        errors.add(first_row + i, layout.text_name, "null")
        bad = True
    if layout.text_kind == "messages":
        lens = pc.fill_null(pc.list_value_length(text_arr), -1).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero((lens != 1) & (lens >= 0)).tolist():
            errors.add(first_row + i, layout.text_name, f"expected exactly one user message, got {int(lens[i])}")
            bad = True
        if not bad:
            flat = pc.list_flatten(text_arr)
            roles = pc.struct_field(flat, "role")
            not_user = pc.fill_null(pc.not_equal(roles, "user"), True).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(not_user).tolist():
                errors.add(first_row + i, layout.text_name, f"expected role 'user', got {roles[i].as_py()!r}")
            text_arr = pc.struct_field(flat, "content")
            for i in _null_rows(pc, text_arr):
                errors.add(first_row + i, f"{layout.text_name}.content", "null")
    answer_arr = _leaf(pc, batch, layout.answer)
    for i in _null_rows(pc, answer_arr):
        errors.add(first_row + i, layout.answer_name, "null")
    errors.raise_if_any()
    if not _is_text(answer_arr.type):  # numbers or lists: coerce in Python (benchmarks, small)
        coerced = []
        for i, v in enumerate(answer_arr.to_pylist()):
            a = coerce_answer(v, layout.answer_kind)
            if a is None:
                errors.add(first_row + i, layout.answer_name, f"not an accepted answer value: {v!r}")
            coerced.append(a)
        errors.raise_if_any()
        answer_arr = pa.array(coerced, type=pa.string())
    answer_arr = pc.utf8_trim_whitespace(answer_arr)
    dictionary, uniq, first, counts, pairs = _fold(pc, pa, text_arr, answer_arr)
    texts = dictionary.take(pa.array(uniq)).to_pylist()
    answers = answer_arr.take(pa.array(first)).to_pylist()
    conflicts = [(first_row + a, answer_arr[a].as_py(), first_row + b, answer_arr[b].as_py()) for a, b in pairs]
    first_rows = first.tolist()

    def take_meta(pos: list[int]) -> list[dict[str, Any]]:
        if not meta_cols or not pos:
            return [{} for _ in pos]
        take = pa.array([first_rows[p] for p in pos], type=pa.int64())
        return batch.select(list(meta_cols)).take(take).to_pylist()

    if eager_meta:
        all_meta = take_meta(list(range(len(first_rows))))

        def meta(pos: list[int]) -> list[dict[str, Any]]:
            return [all_meta[p] for p in pos]
    else:
        meta = take_meta
    return Chunk(batch.num_rows, [first_row + r for r in first_rows], texts, answers, counts.tolist(), conflicts, meta)


def _parquet_chunks(path: Path, layout: Layout) -> Iterator[Chunk]:
    pa, _, pq = _pyarrow()
    columns = parquet_columns(path)
    _check_parquet_types(path, columns, layout)
    meta_cols = [c for c in columns if c not in layout.skipped_roots]
    wanted = list(dict.fromkeys([layout.text[0], layout.answer[0], *meta_cols]))
    leaf = _leaf_path(pq.ParquetFile(path), layout)
    # Reading the prompt text as a dictionary column makes the reader hash the
    # (~100x repeated) texts in C++ instead of materialising every copy;
    # pre_buffer=False reads pages as they are decoded, not whole row groups (GBs at 1M rows).
    pf = pq.ParquetFile(path, read_dictionary=[leaf] if leaf else None, pre_buffer=False, buffer_size=1 << 22)
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=wanted):
            yield _batch_chunk(batch, layout, path, "parquet", start, meta_cols, eager_meta=False)
            start += batch.num_rows
    except (OSError, pa.ArrowException) as e:  # a damaged page or row group (DatasetError is neither)
        raise DatasetError(f"{path}: cannot read the Parquet rows from row {start} on ({e})") from None


def csv_columns(path: Path) -> list[str]:
    """Header names of a CSV file."""
    import pyarrow.csv as pcsv

    try:
        with pcsv.open_csv(path) as reader:
            return list(reader.schema.names)
    except Exception as e:  # ArrowInvalid for an empty or malformed file
        where = _csv_locate(path)
        raise DatasetError(f"{path}: {where}" if where else f"{path}: cannot read as CSV ({e})") from None


def _csv_locate(path: Path) -> str | None:
    """Where a CSV file goes wrong, found again with Python's csv module (pyarrow's
    errors name neither the line nor the row): a byte that is not UTF-8 (line,
    character, data row, column) or a row whose field count differs from the
    header's. ``None`` when neither is found. Reads the whole file: error path only."""
    import csv
    import io

    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    bad_byte = None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        char = len(data[max(line_start, bom) : e.start].decode("utf-8", errors="replace")) + 1
        bad_byte = (data.count(b"\n", 0, e.start) + 1, char, data[e.start])
    reader = csv.reader(io.StringIO(data[bom:].decode("utf-8", errors="surrogateescape"), newline=""))
    header: list[str] | None = None
    row, next_line = -1, 1
    try:
        for record in reader:
            line, next_line = next_line, reader.line_num + 1
            if not record:  # a blank line: pyarrow skips it too
                continue
            what = "the header" if header is None else f"data row {row + 1}"
            for k, value in enumerate(record):
                if bad_byte is not None and any("\udc80" <= ch <= "\udcff" for ch in value):
                    name = "" if header is None or k >= len(header) else f", column {header[k]!r}"
                    lineno, char, byte = bad_byte
                    return (f"line {lineno}, character {char} ({what}{name}): byte 0x{byte:02x} is not UTF-8 "
                            "(data files must be UTF-8 encoded; re-save the file as UTF-8)")
            if header is None:
                header = record
                continue
            row += 1
            if len(record) != len(header):
                return f"line {line} (data row {row}): {len(record)} fields, but the header has {len(header)}"
    except csv.Error as e:
        return f"line {reader.line_num}: invalid CSV ({e})"
    if bad_byte is not None:
        lineno, char, byte = bad_byte
        return f"line {lineno}, character {char}: byte 0x{byte:02x} is not UTF-8 (data files must be UTF-8 encoded)"
    return None


def _csv_chunks(path: Path, layout: Layout) -> Iterator[Chunk]:
    """CSV (a header row, then data rows; quoted fields may span lines, so rows are
    numbered 0-based like Parquet, not by line). Every column is read as text:
    type inference would turn date-like answers into timestamps."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = csv_columns(path)
    columns = {n: pa.string() for n in names}
    _check_parquet_types(path, columns, layout, "CSV")
    meta_cols = [c for c in names if c not in layout.skipped_roots]
    convert = pcsv.ConvertOptions(column_types=columns, strings_can_be_null=False, quoted_strings_can_be_null=False)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    start = 0
    try:
        reader = pcsv.open_csv(path, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield _batch_chunk(batch, layout, path, "csv", start, meta_cols, eager_meta=False)
            start += batch.num_rows
    except pa.ArrowInvalid as e:
        where = _csv_locate(path)
        raise DatasetError(f"{path}: {where}" if where else f"{path}: invalid CSV at or after data row {start} ({e})") from None


def _count_lines(path: Path) -> tuple[int, bool]:
    """Number of lines and whether any is empty or whitespace-only (then rows != lines - 1)."""
    lines, blank, prev_end = 0, False, True
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            lines += block.count(b"\n")
            if not blank and (b"\n\n" in block or b"\n\r\n" in block or (prev_end and block[:1] in (b"\n", b"\r"))):
                blank = True
            prev_end = block.endswith(b"\n")
    if not prev_end:
        lines += 1
    return lines, blank


def _jsonl_arrow_chunks(path: Path, layout: Layout) -> list[Chunk] | None:
    """The whole file through pyarrow's JSON reader (~4x faster than ``json.loads`` per
    line), or ``None`` when anything is unusual (blank lines, inconsistent types,
    schema or row errors): the line-by-line reader then gives the exact answer or
    the exact error. Chunks are returned only once the whole file has parsed."""
    pa, _, _ = _pyarrow()
    import pyarrow.json as pj

    lines, blank = _count_lines(path)
    if blank:
        return None
    chunks: list[Chunk] = []
    rows = 0
    try:
        reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=JSONL_BLOCK_BYTES, use_threads=True))
        columns = {f.name: f.type for f in reader.schema}
        _check_parquet_types(path, columns, layout)
        meta_cols = [c for c in columns if c not in layout.skipped_roots]
        pending: list[Any] = []
        pending_rows = 0

        def flush() -> None:
            nonlocal pending, pending_rows
            if pending:
                batch = pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
                chunks.append(_batch_chunk(batch, layout, path, "jsonl", rows - pending_rows + 1, meta_cols, True))
            pending, pending_rows = [], 0

        for batch in reader:
            if batch.schema != reader.schema:
                return None
            pending.append(batch)
            pending_rows += batch.num_rows
            rows += batch.num_rows
            if pending_rows >= JSONL_FAST_ROWS:
                flush()
        flush()
    except (pa.ArrowException, DatasetError, ValueError, TypeError):
        return None
    return chunks if rows == lines else None


# ------------------------------------------------------------------ public
def columns_of(path: Path) -> dict[str, str]:
    """Root column -> coarse kind (``string``, ``list``, ``struct``, ``number``, ``other``) for layout detection."""
    if file_format(path) == "csv":
        return {name: "string" for name in csv_columns(path)}
    if file_format(path) == "jsonl":
        row = first_jsonl_row(path)

        def kind(v: Any) -> str:
            if isinstance(v, str):
                return "string"
            if isinstance(v, list):
                return "list"
            if isinstance(v, dict):
                return "struct"
            if isinstance(v, int | float) and not isinstance(v, bool):
                return "number"
            return "other"

        return {k: kind(v) for k, v in row.items()}
    import pyarrow as pa

    def pkind(t: Any) -> str:
        if _is_text(t):
            return "string"
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return "list"
        if pa.types.is_struct(t):
            return "struct"
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return "number"
        return "other"

    return {k: pkind(t) for k, t in parquet_columns(path).items()}


def detect_layout(path: Path) -> Layout:
    """``dapo`` / ``dapo_processed`` / ``plain`` from the file's columns (see the module docstring)."""
    cols = columns_of(path)
    if cols.get("prompt") == "list" and "reward_model" in cols:
        return DAPO
    if cols.get("prompt") == "string" and "solution" in cols:
        return DAPO_PROCESSED
    if cols.get("prompt") == "string" and "answer" in cols:
        return PLAIN
    raise DatasetError(
        f"{path}: cannot tell the data layout from the columns{first_row_where(path)} {cols}; expected 'dapo' (prompt: list of chat "
        "messages, reward_model.ground_truth), 'dapo_processed' (prompt: string, solution) or 'plain' "
        "(prompt: string, answer); set data.layout to force one"
    )


def read_chunks(path: str | os.PathLike[str], layout: Layout) -> Iterator[Chunk]:
    """The rows of ``path`` in ``layout``, in file order, in chunks; schema errors raise ``DatasetError``."""
    p = Path(path)
    problem = file_problem(p)
    if problem is not None:
        raise DatasetError(problem)
    fmt = file_format(p)
    if fmt == "jsonl":
        return _jsonl_chunks(p, layout)
    if fmt == "csv":
        return _csv_chunks(p, layout)
    return _parquet_chunks(p, layout)
