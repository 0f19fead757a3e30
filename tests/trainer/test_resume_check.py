"""Config and data comparisons on resume: which changes pass, which are refused, and the override."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.resume_check import (
    Change,
    check_dataset,
    check_resume_config,
    config_changes,
    dataset_fingerprint,
)
from nemo_gdro.typed_config import ConfigError


def _stored(*overrides):
    return OmegaConf.to_yaml(compose(overrides=list(overrides)))


def test_safe_changes_pass_and_are_reported():
    stored = _stored()
    current = compose(overrides=["trainer.max_steps=90", "trainer.eval_every=5", "logging.progress=false",
                                 "eval.k=8", "run.output_dir=/elsewhere", "sft.steps=3"])
    changes = check_resume_config(stored, current, [], "ckpt")
    assert {c.key for c in changes} == {"trainer.max_steps", "trainer.eval_every", "logging.progress", "eval.k",
                                        "run.output_dir", "sft.steps"}


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.seed=99", "data.seed"),
        ("data.num_eval=64", "data.num_eval"),
        ("rollout.n=4", "rollout.n"),
        ("algorithm.loss=r2vpo", "algorithm.loss"),
        ("algorithm.stats.window=10", "algorithm.stats.window"),
        ("model.overrides.num_layers=2", "model.overrides.num_layers"),
        ("optim.lr=0.001", "optim.lr"),
        ("run.seed=3", "run.seed"),
        ("parallel.tensor_parallel=2", "parallel.tensor_parallel"),
    ],
)
def test_state_changing_keys_are_refused_listing_them(override, key):
    with pytest.raises(ConfigError) as info:
        check_resume_config(_stored(), compose(overrides=[override]), [], "ckpt/step_00000002")
    message = str(info.value)
    assert f"{key}: " in message and f"run.allow_config_change=[{key}]" in message
    assert "ckpt/step_00000002 was written with another configuration" in message


def test_several_changes_are_listed_together_and_the_override_accepts_them():
    current = compose(overrides=["data.seed=99", "rollout.n=4", "optim.lr=0.001"])
    with pytest.raises(ConfigError, match=r"data\.seed: 1234 -> 99; optim\.lr: 0\.0002 -> 0\.001; rollout\.n: 8 -> 4"):
        check_resume_config(_stored(), current, [], "ckpt")
    assert len(check_resume_config(_stored(), current, ["data", "optim.lr", "rollout.n"], "ckpt")) == 3
    assert len(check_resume_config(_stored(), current, ["*"], "ckpt")) == 3
    with pytest.raises(ConfigError, match="rollout.n"):
        check_resume_config(_stored(), current, ["data", "optim"], "ckpt")  # a prefix covers its keys only


def test_added_and_removed_keys_count_as_changes():
    changes = config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}})
    assert [str(c) for c in changes] == ["a.c: <absent> -> 2"]
    assert check_resume_config(None, compose(), [], "old") == []  # a checkpoint without config.yaml: nothing to compare


def _records(texts):
    return [PromptRecord(i, prompt, answer) for i, (prompt, answer) in enumerate(texts)]


def test_dataset_fingerprint_names_the_prompts_that_changed():
    saved = dataset_fingerprint(_records([("Q:1+1=A:", "2"), ("Q:2+2=A:", "4"), ("Q:3+3=A:", "6")]))
    assert check_dataset(saved, saved.clone(), [], "ckpt") is None
    changed = dataset_fingerprint(_records([("Q:1+1=A:", "2"), ("Q:2+5=A:", "7"), ("Q:3+3=A:", "6")]))
    with pytest.raises(ConfigError, match=r"1 of 3 prompt ids hold a different prompt or answer \(ids \[1\]"):
        check_dataset(saved, changed, [], "ckpt")
    answer_only = dataset_fingerprint(_records([("Q:1+1=A:", "2"), ("Q:2+2=A:", "5"), ("Q:3+3=A:", "6")]))
    with pytest.raises(ConfigError, match=r"ids \[1\]"):
        check_dataset(saved, answer_only, [], "ckpt")
    with pytest.raises(ConfigError, match=r"2 training prompts now, 3 in the checkpoint"):
        check_dataset(saved, saved[:2], [], "ckpt")
    assert "allowed by run.allow_config_change" in check_dataset(saved, changed, ["data"], "ckpt")
    assert check_dataset(None, changed, [], "ckpt") is None
    assert saved.dtype == torch.int64 and saved.shape == (3, 2)


def _math(*overrides):
    return compose(overrides=["data=math", "reward.verifier=dapo_math", "sft.steps=0", *overrides])


def test_data_files_are_judged_by_the_fingerprint_not_by_their_names(tmp_path, monkeypatch):
    """Item 21.5: a relative path stored by an older version, or other files (parquet -> jsonl), pass the config
    check as ``data_files`` changes; the data fingerprint then decides. Other keys still refuse."""
    monkeypatch.chdir(tmp_path)
    stored = OmegaConf.to_yaml(_math("data.train_files=[d/train.parquet]", "+data.eval_files.math500=[m.jsonl]"))
    same = _math(f"data.train_files=[{tmp_path}/d/train.parquet]", f"+data.eval_files.math500=[{tmp_path}/m.jsonl]")
    changes = check_resume_config(stored, same, [], "ckpt")
    assert {(c.key, c.kind) for c in changes} == {("data.train_files", "same_path"), ("data.eval_files.math500", "same_path")}
    converted = _math("data.train_files=[d/train.jsonl]", "+data.eval_files.math500=[m.jsonl]")
    assert [(c.key, c.kind) for c in check_resume_config(stored, converted, [], "ckpt")] == [("data.train_files", "data_files")]
    assert check_resume_config(stored, converted, ["data"], "ckpt")[0].kind == "allowed"
    with pytest.raises(ConfigError, match=r"model.path"):
        check_resume_config(OmegaConf.to_yaml(_math("data.train_files=[a]", "model=hf", "model.path=m1")),
                            _math("data.train_files=[a]", "model=hf", "model.path=m2"), [], "ckpt")


def test_other_data_files_with_the_same_prompts_are_a_note_and_with_other_prompts_refused():
    saved = dataset_fingerprint(_records([("Q:1+1=A:", "2"), ("Q:2+2=A:", "4")]))
    moved = [Change("data.train_files", ["/d/train.parquet"], ["/d/train.jsonl"], "data_files")]
    note = check_dataset(saved, saved.clone(), [], "ckpt", moved)
    assert "same 2 training prompts" in note and "train.parquet" in note and "train.jsonl" in note
    other = dataset_fingerprint(_records([("Q:1+1=A:", "2"), ("Q:2+3=A:", "5")]))
    with pytest.raises(ConfigError, match=r"training data differ.*data files: data.train_files") as info:
        check_dataset(saved, other, [], "ckpt", moved)
    assert "\n" not in str(info.value)
    # An old checkpoint without a fingerprint cannot tell: other files are refused (unless allowed).
    with pytest.raises(ConfigError, match="holds no fingerprint"):
        check_dataset(None, saved, [], "ckpt", moved)
    assert check_dataset(None, saved, ["data"], "ckpt", moved) is None


def _compare_configs_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from nemo_gdro.trainer.resume_check import check_same_config_across_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        same = OmegaConf.to_yaml(compose(overrides=["rollout.n=4"]))
        check_same_config_across_ranks(same)  # identical configs pass
        differing = OmegaConf.to_yaml(compose(overrides=[f"rollout.n={4 + 4 * rank}"]))
        try:
            check_same_config_across_ranks(differing)
            results[rank] = "no error"
        except ConfigError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


def test_ranks_started_with_different_configs_fail_at_start_naming_the_key(tmp_path):
    """Two real gloo processes: rank 1 got rollout.n=8, rank 0 rollout.n=4; both stop with the key named."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_compare_configs_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert "different configurations" in results[rank] and "rollout.n" in results[rank], results[rank]
