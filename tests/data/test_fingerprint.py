import json

import pytest
import torch

from nemo_gdro.data.dataset import PromptDataset, PromptRecord
from nemo_gdro.data.fingerprint import DatasetFingerprint, remap_prompt_ids
from nemo_gdro.data.prompt_files import load_prompt_files
from tests.data.fixtures import write_dapo_math


def _ds(items):
    return PromptDataset(PromptRecord(k, p, a, {"uid": u}) for k, (u, p, a) in enumerate(items))


def test_same_content_same_fingerprint_and_json_roundtrip(tmp_path):
    a, _ = load_prompt_files(write_dapo_math(tmp_path / "a.parquet", 5, 3, shuffle_seed=1).path, log=None)
    b, _ = load_prompt_files(write_dapo_math(tmp_path / "b.jsonl", 5, 2, "jsonl", shuffle_seed=7).path, log=None)
    fa, fb = a.fingerprint(), b.fingerprint()
    assert fa == fb and fa.diff(fb) == []
    assert fa.uids == tuple(r.meta["uid"] for r in a)
    back = DatasetFingerprint.from_dict(json.loads(json.dumps(fa.to_dict())))
    assert back == fa


def test_diff_names_what_changed():
    base = _ds([(10, "p", "1"), (20, "q", "2"), (30, "r", "3")])
    fp = base.fingerprint()
    assert "1 prompts changed text or answer (stored prompt_id 1" in " ".join(fp.diff(_ds([(10, "p", "1"), (20, "q", "9"), (30, "r", "3")]).fingerprint()))
    assert "1 prompts removed, 1 added" in " ".join(fp.diff(_ds([(10, "p", "1"), (20, "q", "2"), (40, "s", "4")]).fingerprint()))
    grown = _ds([(5, "o", "0"), (10, "p", "1"), (20, "q", "2"), (30, "r", "3")]).fingerprint()
    assert fp.diff(grown)[0] == "number of prompts 3 -> 4"
    # without uids (arithmetic task): position-wise content
    plain = PromptDataset([PromptRecord(0, "a", "1"), PromptRecord(1, "b", "2")])
    assert plain.fingerprint().uids is None
    other = PromptDataset([PromptRecord(0, "a", "1"), PromptRecord(1, "b", "3")])
    assert "1 prompt ids now hold a different prompt or answer (prompt_id 1" in plain.fingerprint().diff(other.fingerprint())[0]


def test_remap_prompt_ids():
    old = _ds([(10, "p", "1"), (20, "q", "2"), (30, "r", "3")]).fingerprint()
    new = _ds([(5, "o", "0"), (10, "p", "1"), (30, "r", "changed")]).fingerprint()
    assert torch.equal(remap_prompt_ids(old, new), torch.tensor([1, -1, -1]))
    with pytest.raises(ValueError, match="needs uids"):
        remap_prompt_ids(PromptDataset([PromptRecord(0, "a", "1")]).fingerprint(), new)


def test_from_dict_rejects_other_payloads():
    with pytest.raises(ValueError, match="not a dataset fingerprint"):
        DatasetFingerprint.from_dict({"format": "x"})
    d = _ds([(1, "a", "1")]).fingerprint().to_dict()
    d["item_hashes"] = []
    with pytest.raises(ValueError, match="do not have num_prompts=1 entries"):
        DatasetFingerprint.from_dict(d)
    d = _ds([(1, "a", "1")]).fingerprint().to_dict()
    d["item_hashes"] = ["{:016x}".format(5)]
    with pytest.raises(ValueError, match="sha256 does not match"):
        DatasetFingerprint.from_dict(d)
    d = _ds([(1, "a", "1")]).fingerprint().to_dict()
    del d["sha256"]
    with pytest.raises(ValueError, match="missing key 'sha256'"):
        DatasetFingerprint.from_dict(d)
    d = _ds([(1, "a", "1")]).fingerprint().to_dict()
    d["uids"] = ["x"]
    with pytest.raises(ValueError, match="malformed value"):
        DatasetFingerprint.from_dict(d)
    with pytest.raises(ValueError, match="not a dataset fingerprint"):
        DatasetFingerprint.from_dict([1, 2])
