import json
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.data.dataset import DatasetError, PromptDataset, PromptRecord


def rows(n, **extra):
    return [{"prompt": f"Q:{i}+1=A:", "answer": str(i + 1), **{k: v[i] for k, v in extra.items()}} for i in range(n)]


def write_jsonl(path, items, blank_after=None):
    with open(path, "w") as f:
        for k, item in enumerate(items):
            f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
            if blank_after is not None and k == blank_after:
                f.write("\n")


def test_row_index_ids():
    ds = PromptDataset.from_rows(rows(4, level=[1, 2, 3, 4]))
    assert len(ds) == 4
    assert [r.prompt_id for r in ds] == [0, 1, 2, 3]
    assert ds[2] == PromptRecord(2, "Q:2+1=A:", "3", {"level": 3})


def test_explicit_dense_uid_is_used_as_is():
    ds = PromptDataset.from_rows(rows(3, uid=[2, 0, 1]))
    assert ds[2].prompt == "Q:0+1=A:" and ds[0].prompt == "Q:1+1=A:"
    assert ds[2].meta["orig_id"] == 2


def test_index_column_when_no_uid():
    ds = PromptDataset.from_rows(rows(3, index=[1, 2, 0]))
    assert ds[0].prompt == "Q:2+1=A:"


def test_arbitrary_ids_remapped_in_sorted_order():
    ds = PromptDataset.from_rows(rows(3, uid=[700, 15, 99]))
    assert [r.meta["orig_id"] for r in ds] == [15, 99, 700]
    assert ds[0].prompt == "Q:1+1=A:"
    strs = PromptDataset.from_rows(rows(3, uid=["c", "a", "b"]))
    assert [r.meta["orig_id"] for r in strs] == ["a", "b", "c"]


@given(ids=st.lists(st.integers(-10**9, 10**9), min_size=1, max_size=30, unique=True), seed=st.integers(0, 1000))
def test_remapping_does_not_depend_on_row_order(ids, seed):
    base = rows(len(ids), uid=ids)
    shuffled = base[:]
    random.Random(seed).shuffle(shuffled)
    a, b = PromptDataset.from_rows(base), PromptDataset.from_rows(shuffled)
    assert [r.meta["orig_id"] for r in a] == sorted(ids)
    assert [(r.prompt_id, r.prompt) for r in a] == [(r.prompt_id, r.prompt) for r in b]


def test_missing_ids_rejected_naming_rows():
    data = rows(5, uid=[0, 1, None, 3, None])
    del data[4]["uid"]
    with pytest.raises(DatasetError, match=r"missing id 'uid' on row 2, row 4"):
        PromptDataset.from_rows(data)


def test_duplicate_ids_rejected_naming_rows():
    with pytest.raises(DatasetError, match=r"duplicate id 'uid': 7 on row 1, row 3"):
        PromptDataset.from_rows(rows(4, uid=[0, 7, 2, 7]))


def test_missing_fields_and_non_string_answers_rejected():
    data = rows(4)
    del data[1]["prompt"]
    del data[3]["answer"]
    data[2]["answer"] = 3
    with pytest.raises(DatasetError) as e:
        PromptDataset.from_rows(data)
    msg = str(e.value)
    assert "missing field 'prompt' on row 1" in msg
    assert "missing field 'answer' on row 3" in msg
    assert "'answer' must be a string, not on row 2 (int)" in msg


def test_bad_id_types_rejected():
    with pytest.raises(DatasetError, match=r"must be an int or a string.*row 1 \(1.5\)"):
        PromptDataset.from_rows(rows(2, uid=[0, 1.5]))
    with pytest.raises(DatasetError, match="mixes ints and strings"):
        PromptDataset.from_rows(rows(2, uid=[0, "a"]))


def test_jsonl_errors_name_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    items = rows(4, uid=[10, 11, 12, 11])
    write_jsonl(path, items, blank_after=0)  # line 2 is blank, so row k is on line k + 2 for k >= 1
    with pytest.raises(DatasetError, match=r"d.jsonl: duplicate id 'uid': 11 on line 3, line 5"):
        PromptDataset.from_jsonl(path)
    write_jsonl(path, [items[0], "{not json", items[1]])
    with pytest.raises(DatasetError, match=r"invalid JSON on line 2"):
        PromptDataset.from_jsonl(path)
    write_jsonl(path, [items[0], {"prompt": "x"}])
    with pytest.raises(DatasetError, match=r"missing field 'answer' on line 2"):
        PromptDataset.from_jsonl(path)


def test_jsonl_roundtrip(tmp_path):
    ds = PromptDataset.from_rows(rows(5, level=list(range(5))))
    path = tmp_path / "rt.jsonl"
    ds.to_jsonl(path)
    back = PromptDataset.from_jsonl(path)
    assert [(r.prompt_id, r.prompt, r.answer, r.meta["level"]) for r in back] == [
        (r.prompt_id, r.prompt, r.answer, r.meta["level"]) for r in ds
    ]


def test_get_many_and_indexing():
    ds = PromptDataset.from_rows(rows(6))
    got = ds.get_many([4, 0, 4])
    assert [r.prompt_id for r in got] == [4, 0, 4]
    assert [r.prompt_id for r in ds.get_many(torch.tensor([5, 1]))] == [5, 1]
    assert ds[torch.tensor(3)].prompt_id == 3
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(IndexError):
        ds[-1]


def test_constructor_requires_dense_ids():
    recs = [PromptRecord(0, "a", "1"), PromptRecord(2, "b", "2")]
    with pytest.raises(DatasetError, match="exactly 0..1"):
        PromptDataset(recs)
    assert [r.prompt_id for r in PromptDataset(reversed([PromptRecord(0, "a", "1"), PromptRecord(1, "b", "2")]))] == [0, 1]


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


# ------------------------------------------------ text bounds (issue 12, item 7)
def test_empty_prompts_and_answers_rejected_naming_rows():
    data = rows(5)
    data[1]["prompt"] = ""
    data[2]["prompt"] = " \n\t"
    data[3]["answer"] = ""
    data[4]["answer"] = "   "
    with pytest.raises(DatasetError) as e:
        PromptDataset.from_rows(data)
    msg = str(e.value)
    assert "empty or whitespace-only prompt on row 1, row 2" in msg
    assert "empty or whitespace-only answer on row 3, row 4" in msg


def test_oversized_prompt_rejected_and_bound_configurable(tmp_path):
    data = rows(3)
    data[2]["prompt"] = "x" * (1 << 20)  # 1 MB
    with pytest.raises(DatasetError, match=r"prompt longer than max_prompt_chars=65536 on row 2 \(1048576 chars\)"):
        PromptDataset.from_rows(data)
    assert len(PromptDataset.from_rows(data, max_prompt_chars=None)) == 3
    with pytest.raises(DatasetError, match=r"max_prompt_chars=7 on row 0 \(8 chars\), row 1 \(8 chars\)"):
        PromptDataset.from_rows(rows(2), max_prompt_chars=7)
    assert len(PromptDataset.from_rows(rows(2), max_prompt_chars=8)) == 2
    path = tmp_path / "big.jsonl"
    write_jsonl(path, data)
    with pytest.raises(DatasetError, match=r"big.jsonl: prompt longer than max_prompt_chars=65536 on line 3"):
        PromptDataset.from_jsonl(path)


def test_constructor_checks_text_naming_prompt_ids():
    with pytest.raises(DatasetError, match="empty or whitespace-only prompt on prompt_id 1"):
        PromptDataset([PromptRecord(0, "a", "1"), PromptRecord(1, "  ", "2")])
    with pytest.raises(DatasetError, match="empty or whitespace-only answer on prompt_id 0"):
        PromptDataset([PromptRecord(0, "a", "")])
    with pytest.raises(DatasetError, match=r"max_prompt_chars=3 on prompt_id 0 \(4 chars\)"):
        PromptDataset([PromptRecord(0, "abcd", "1")], max_prompt_chars=3)
    with pytest.raises(DatasetError, match=r"prompt must be a string, not on prompt_id 0 \(NoneType\); answer must be a string, not on prompt_id 1 \(int\)"):
        PromptDataset([PromptRecord(0, None, "1"), PromptRecord(1, "b", 2)])
    with pytest.raises(ValueError, match="max_prompt_chars must be a positive integer or None"):
        PromptDataset([PromptRecord(0, "a", "1")], max_prompt_chars=0)


# ---------------------------------------------------------------- arithmetic_splits
def _texts(ds):
    return [r.prompt for r in ds]


def test_arithmetic_splits_are_disjoint_and_default_to_arithmetic_dataset():
    from nemo_gdro.data.dataset import arithmetic_dataset, arithmetic_splits

    s = arithmetic_splits(64, 32, 7, num_validation=32, num_sft=200, unique_train=True)
    pools = {name: set(_texts(getattr(s, name))) for name in ("train", "eval", "validation", "sft")}
    for a in pools:
        for b in pools:
            if a < b:
                assert not pools[a] & pools[b], (a, b)
    assert len(pools["train"]) == 64  # unique_train
    train, held = arithmetic_dataset(64, 32, 7)
    plain = arithmetic_splits(64, 32, 7)
    assert _texts(plain.train) == _texts(train) and _texts(plain.eval) == _texts(held)
    assert plain.validation is None and plain.sft is None and plain.sft_pool is plain.train


def test_sft_sign_flip_changes_only_the_sft_targets():
    from nemo_gdro.data.dataset import arithmetic_splits

    clean = arithmetic_splits(64, 32, 7, num_validation=32, num_sft=2000)
    flip = arithmetic_splits(64, 32, 7, num_validation=32, num_sft=2000, sft_sign_flip=0.5)
    for name in ("train", "eval", "validation"):
        assert [(r.prompt, r.answer, r.meta["sft_target"]) for r in getattr(flip, name)] == [
            (r.prompt, r.answer, r.meta["sft_target"]) for r in getattr(clean, name)
        ]
    recs = list(flip.sft)
    assert _texts(flip.sft) == _texts(clean.sft)
    flipped = [r for r in recs if r.meta["sft_flipped"]]
    assert 0.4 < len(flipped) / len(recs) < 0.6
    for r in recs:
        if r.meta["sft_flipped"]:
            assert int(r.meta["sft_target"]) == -int(r.answer) != 0
        else:
            assert r.meta["sft_target"] == r.answer
    # a zero answer is never flipped (-0 would still be correct), and the draw is deterministic
    assert not any(r.meta["sft_flipped"] for r in recs if r.answer == "0")
    again = arithmetic_splits(64, 32, 7, num_validation=32, num_sft=2000, sft_sign_flip=0.5)
    assert [r.meta["sft_target"] for r in again.sft] == [r.meta["sft_target"] for r in recs]
    everything = arithmetic_splits(64, 32, 7, num_sft=500, sft_sign_flip=1.0)
    assert all(r.meta["sft_flipped"] or r.answer == "0" for r in everything.sft)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_sft_sign_flip_out_of_range_is_refused(value):
    from nemo_gdro.data.dataset import arithmetic_splits
    from nemo_gdro.tasks.arithmetic import ArithmeticConfigSection

    with pytest.raises(ValueError, match="sft_sign_flip"):
        arithmetic_splits(8, 8, 0, num_sft=10, sft_sign_flip=value)
    with pytest.raises(ValueError, match="data.sft_sign_flip"):
        ArithmeticConfigSection(num_sft=10, sft_sign_flip=value)


def test_sft_sign_flip_needs_a_separate_sft_pool():
    from nemo_gdro.tasks.arithmetic import ArithmeticConfigSection

    with pytest.raises(ValueError, match="data.sft_sign_flip.*data.num_sft"):
        ArithmeticConfigSection(sft_sign_flip=0.5)


def test_jsonl_non_utf8_byte_names_file_and_line(tmp_path):
    """Issue 21, item 7: not a bare 'utf-8 codec can't decode' without the file."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 2, character 16: byte 0xe9 is not UTF-8"):
        PromptDataset.from_jsonl(path)
