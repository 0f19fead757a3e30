"""load_prompt_files: dedup, stable ids, conflicts, filters, formatting, token limits."""

import json
import random

import pytest

from nemo_gdro.data.dataset import DatasetError
from nemo_gdro.data.hf_tokenizer import HFTokenizer
from nemo_gdro.data.prompt_files import load_prompt_files
from nemo_gdro.data.prompt_format import PromptFormat, dapo_wrap
from nemo_gdro.data.text import normalize_prompt, prompt_uid
from nemo_gdro.data.tokenizer import CharTokenizer
from tests.data.fixtures import (
    dapo_row,
    write_dapo_math,
    write_dapo_processed,
    write_plain,
    write_qwen3_tokenizer,
    write_rows,
)


def _load(files, **kw):
    return load_prompt_files(files, log=None, **kw)


def _ids(ds):
    return [(r.prompt_id, r.meta["uid"], r.prompt, r.answer) for r in ds]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_dedup_counts_and_english_filter(tmp_path, fmt, capsys):
    info = write_dapo_math(tmp_path / f"d.{fmt}", num_prompts=12, repeats=5, fmt=fmt, cjk_prompts=2)
    assert info.rows == 14 * 5 + 1  # + one whitespace variant of prompt 0
    ds, rep = load_prompt_files(info.path)
    assert (rep.rows_read, rep.unique_prompts, rep.duplicate_rows, rep.num_prompts) == (71, 14, 57, 14)
    assert "71 rows" in capsys.readouterr().out
    assert sorted(r.meta["num_rows"] for r in ds) == [5] * 13 + [6]
    en, rep = _load(info.path, english_only=True, exclude_uids=[ds[0].meta["uid"]])
    assert (rep.non_english_dropped, rep.excluded, rep.too_long_dropped, rep.num_prompts) == (2, 1, 0, 11)
    assert rep.rows_read == rep.unique_prompts + rep.duplicate_rows
    assert rep.num_prompts == rep.unique_prompts - rep.non_english_dropped - rep.excluded - rep.too_long_dropped
    en, rep = _load(info.path, english_only=True)
    assert (rep.non_english_dropped, rep.num_prompts) == (2, 12)
    assert {r.meta["problem"] for r in en} == {p for p, _ in info.problems[:12]}
    # the kept spelling of prompt 0 is its common one, not the variant
    assert info.problems[0][0] in {r.meta["problem"] for r in en}


def test_ids_are_sorted_uids_and_records_carry_meta(tmp_path):
    info = write_dapo_math(tmp_path / "d.parquet", 6, 2)
    ds, _ = _load(info.path)
    uids = [r.meta["uid"] for r in ds]
    assert uids == sorted(uids) and [r.prompt_id for r in ds] == list(range(len(ds)))
    for r in ds:
        assert r.meta["uid"] == prompt_uid(normalize_prompt(r.meta["problem"]))
        assert r.prompt == dapo_wrap(r.meta["problem"])  # instruction none: as in the file (already wrapped)
        assert r.meta["layout"] == "dapo" and r.meta["source"] == str(info.path) and r.meta["row"].startswith("row ")
        assert r.meta["data_source"] == "math_dapo" and "index" in r.meta["extra_info"]


def test_ids_do_not_depend_on_row_order_file_split_or_format(tmp_path):
    a = write_dapo_math(tmp_path / "a.parquet", 10, 3, shuffle_seed=1)
    b = write_dapo_math(tmp_path / "b.jsonl", 10, 3, "jsonl", shuffle_seed=2)
    ref, _ = _load(a.path)
    assert _ids(_load(b.path)[0]) == _ids(ref)
    assert _load(b.path)[0].fingerprint() == ref.fingerprint()
    # the same rows split over three files, in another order
    rows = [json.loads(line) for line in b.path.read_text().splitlines()]
    random.Random(3).shuffle(rows)
    parts = [write_rows(tmp_path / f"part{k}.{'jsonl' if k % 2 else 'parquet'}", rows[k::3], "jsonl" if k % 2 else "parquet") for k in range(3)]
    split, rep = _load(parts[::-1])
    assert _ids(split) == _ids(ref) and split.fingerprint().sha256 == ref.fingerprint().sha256
    assert rep.rows_read == len(rows) and len(rep.files) == 3
    # a superset keeps each prompt's uid; dense ids stay in uid order
    more, _ = _load([a.path, write_dapo_math(tmp_path / "c.parquet", 4, 2, start=50, cjk_prompts=0, variant=False).path])
    assert {r.meta["uid"] for r in ref} < {r.meta["uid"] for r in more}


def test_same_problem_same_uid_across_layouts(tmp_path):
    dapo = write_dapo_math(tmp_path / "a.parquet", 8, 2)
    proc = write_dapo_processed(tmp_path / "b.parquet", 8)
    plain = write_plain(tmp_path / "c.jsonl", 8)
    fmt = PromptFormat(instruction="dapo")
    a, b, c = (_load(p.path, prompt_format=fmt)[0] for p in (dapo, proc, plain))
    assert _ids(a) == _ids(b)  # wrapped once, the same final prompts
    assert [r.meta["uid"] for r in c] == [r.meta["uid"] for r in a if r.meta["problem"] in {p for p, _ in plain.problems}]
    # instruction none: the text as each file has it
    raw_b, _ = _load(proc.path)
    assert [r.meta["uid"] for r in raw_b] == [r.meta["uid"] for r in a]
    assert all(r.prompt == r.meta["problem"] for r in raw_b)
    # both layouts at once fold into one prompt per problem
    both, rep = _load([dapo.path, proc.path], prompt_format=fmt)
    assert _ids(both) == _ids(a) and rep.duplicate_rows == dapo.rows + proc.rows - len(a)
    assert rep.layouts == ("dapo", "dapo_processed")


def test_conflicting_answers_name_both_rows(tmp_path):
    info = write_dapo_math(tmp_path / "c.jsonl", 4, 2, "jsonl", conflict=True, shuffle_seed=None)
    # rows of prompt 1 are lines 3, 4; the conflicting copy is the last line
    with pytest.raises(DatasetError, match=r"1 prompt\(s\) appear with conflicting answers") as e:
        _load(info.path)
    msg = str(e.value)
    p1, a1 = info.problems[1]
    assert f"c.jsonl line 3 answer '{a1}'" in msg and f"c.jsonl line {info.rows} answer '{int(a1) + 1}'" in msg
    # across files, and through normalisation (a whitespace variant)
    write_rows(tmp_path / "x.parquet", [dapo_row(p1.replace(" ", "\n") + "  ", "0", "i")], "parquet")
    good = write_dapo_math(tmp_path / "g.jsonl", 4, 2, "jsonl", shuffle_seed=None)
    with pytest.raises(DatasetError, match=r"g\.jsonl line 3 answer '\d+' vs .*x\.parquet row 0 answer '0'"):
        _load([good.path, tmp_path / "x.parquet"])
    # whitespace around an answer is not a conflict
    write_rows(tmp_path / "ws.jsonl", [dapo_row(p1, a1, "i"), dapo_row(p1, f" {a1}\n", "j")], "jsonl")
    assert _load(tmp_path / "ws.jsonl")[0][0].answer == a1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_empty_and_oversized_texts_name_the_rows(tmp_path, fmt):
    label = "line 2" if fmt == "jsonl" else "row 1"
    cases = [
        ({"prompt": "   \n", "answer": "1"}, "empty or whitespace-only prompt"),
        ({"prompt": "", "answer": "1"}, "empty or whitespace-only prompt"),
        ({"prompt": "q", "answer": " "}, "empty or whitespace-only answer"),
        ({"prompt": "x" * (1 << 20), "answer": "1"}, "prompt of 1048576 chars > max_prompt_chars=65536"),
    ]
    for k, (row, what) in enumerate(cases):
        path = write_rows(tmp_path / f"e{k}.{fmt}", [{"prompt": "ok", "answer": "2"}, row], fmt)
        with pytest.raises(DatasetError, match=rf"e{k}\.{fmt}: {label}: {what}"):
            _load(path)
    big = write_rows(tmp_path / f"big.{fmt}", [{"prompt": "x" * 70_000, "answer": "1"}], fmt)
    assert len(_load(big, max_prompt_chars=None)[0]) == 1
    with pytest.raises(DatasetError, match="max_prompt_chars=100"):
        _load(write_rows(tmp_path / f"s.{fmt}", [{"prompt": "y" * 101, "answer": "1"}], fmt), max_prompt_chars=100)


def test_overlong_prompts_drop_or_error(tmp_path):
    tok = CharTokenizer()
    rows = [{"id": k, "prompt": "Q:" + "1" * n + "=A:", "answer": "1"} for k, n in enumerate([2, 5, 10, 20])]
    path = write_rows(tmp_path / "p.jsonl", rows, "jsonl")
    # encode_prompt adds <bos>: lengths 8, 11, 16, 26
    ds, rep = _load(path, tokenizer=tok, max_prompt_tokens=11)
    assert rep.too_long_dropped == 2 and sorted(len(r.prompt) for r in ds) == [7, 10]
    assert [r.prompt_id for r in ds] == [0, 1]
    with pytest.raises(DatasetError, match=r"2 prompt\(s\) longer than data.max_prompt_tokens=11.*p\.jsonl line 3 \(16 tokens\)"):
        _load(path, tokenizer=tok, max_prompt_tokens=11, overlong_prompts="error")
    with pytest.raises(ValueError, match="data.overlong_prompts must be one of"):
        _load(path, tokenizer=tok, max_prompt_tokens=10, overlong_prompts="truncate")
    with pytest.raises(ValueError, match="data.max_prompt_tokens must be a positive integer"):
        _load(path, tokenizer=tok, max_prompt_tokens=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _load(path, max_prompt_tokens=10)
    with pytest.raises(DatasetError, match="no prompts left after filtering"):
        _load(path, tokenizer=tok, max_prompt_tokens=3)
    # a prompt the tokenizer cannot encode names its row
    bad = write_rows(tmp_path / "b.jsonl", [*rows, {"id": 9, "prompt": "Q:1$=A:", "answer": "1"}], "jsonl")
    with pytest.raises(DatasetError, match=r"b\.jsonl line 5: the tokenizer cannot encode the prompt \(CharTokenizer cannot"):
        _load(bad, tokenizer=tok, max_prompt_tokens=11)


def test_exclude_uids_and_argument_errors(tmp_path):
    info = write_dapo_math(tmp_path / "d.parquet", 6, 2)
    ds, _ = _load(info.path)
    drop = [ds[0].meta["uid"], ds[3].meta["uid"]]
    kept, rep = _load(info.path, exclude_uids=drop)
    assert rep.excluded == 2 and len(kept) == len(ds) - 2 and not set(drop) & {r.meta["uid"] for r in kept}
    with pytest.raises(DatasetError, match="data.eval_files is empty"):
        _load([], name="data.eval_files")
    with pytest.raises(DatasetError, match=r"data.train_files: data file .*absent.parquet does not exist"):
        _load(tmp_path / "absent.parquet")
    with pytest.raises(ValueError, match="data.layout must be 'auto' or one of"):
        _load(info.path, layout="verl")
    # a forced layout that does not fit names the column
    with pytest.raises(DatasetError, match="column 'prompt': Parquet type list<.*expected a string"):
        _load(info.path, layout="plain")


@pytest.mark.slow
def test_chat_template_and_token_limit_with_qwen3(tmp_path):
    tok = HFTokenizer(write_qwen3_tokenizer(tmp_path / "tok"))
    info = write_dapo_processed(tmp_path / "p.parquet", 6, cjk_prompts=0)
    fmt = PromptFormat(style="chat_template", instruction="dapo")
    ds, _ = _load(info.path, prompt_format=fmt, tokenizer=tok)
    for r in ds:
        assert r.prompt == f"<|im_start|>user\n{dapo_wrap(r.meta['problem'])}<|im_end|>\n<|im_start|>assistant\n"
    lengths = sorted(len(tok.encode_prompt(r.prompt)) for r in ds)
    cut = lengths[2]
    short, rep = _load(info.path, prompt_format=fmt, tokenizer=tok, max_prompt_tokens=cut)
    assert rep.too_long_dropped == sum(n > cut for n in lengths) and len(short) == sum(n <= cut for n in lengths)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_many_chunks_give_the_same_dataset(tmp_path, monkeypatch, fmt):
    from nemo_gdro.data import files

    info = write_dapo_math(tmp_path / f"d.{fmt}", 9, 4, fmt)
    ref, ref_rep = _load(info.path)
    monkeypatch.setattr(files, "CHUNK_ROWS", 5)
    monkeypatch.setattr(files, "JSONL_FAST_ROWS", 5)
    monkeypatch.setattr(files, "JSONL_BLOCK_BYTES", 4096)
    ds, rep = _load(info.path)
    assert [(r.prompt_id, r.prompt, r.answer, r.meta["row"], r.meta["num_rows"]) for r in ds] == [
        (r.prompt_id, r.prompt, r.answer, r.meta["row"], r.meta["num_rows"]) for r in ref
    ]
    assert rep == ref_rep
    # a conflicting copy far from the first copy (another chunk) names both rows
    bad = write_dapo_math(tmp_path / f"c.{fmt}", 9, 4, fmt, conflict=True, shuffle_seed=None)
    first = 1 if fmt == "jsonl" else 0
    label = "line" if fmt == "jsonl" else "row"
    with pytest.raises(DatasetError, match=rf"c\.{fmt} {label} {first + 4} answer '\d+' vs .*c\.{fmt} {label} {first + bad.rows - 1} answer"):
        _load(bad.path)


def test_plain_csv(tmp_path):
    info = write_plain(tmp_path / "p.csv", 5, "csv", repeats=2)
    ds, rep = _load(info.path)
    assert (rep.rows_read, rep.num_prompts, rep.layouts) == (10, 5, ("plain",))
    assert sorted((r.prompt, r.answer) for r in ds) == sorted(info.problems)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt,answer\na,what is 1+1?,2\nb,,3\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: row 1: empty or whitespace-only prompt"):
        _load(bad)
