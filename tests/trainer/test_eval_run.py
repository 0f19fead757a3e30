"""``evaluate_target``: an HF directory with its own tokenizer and a task that fits it, a live run read without its lock."""

from __future__ import annotations

import shutil

import pytest

from nemo_gdro.testing.tiny_hf import build_tiny_hf
from nemo_gdro.trainer.eval_run import _config_for, evaluate_target
from nemo_gdro.trainer.hf_out import export_checkpoint
from nemo_gdro.typed_config import ConfigError
from tests.data.fixtures import write_benchmark, write_dapo_math
from tests.trainer.tiny_run import hold_lock, snapshot

SMALL = ["eval.k=1", "rollout.max_new_tokens=3", "data.num_eval=2"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny_hf(tmp_path_factory.mktemp("eval_hf") / "qwen3", arch="qwen3", seed=7)


def test_an_hf_dir_uses_its_own_tokenizer_and_refuses_the_default_task(qwen):
    with pytest.raises(ConfigError, match=r"own tokenizer; the default task, data=arithmetic.*data=math data.train_files"):
        _config_for(qwen, SMALL, "train")
    # Choosing the task runs it, with the directory's tokenizer.
    cfg, ckpt = _config_for(qwen, [*SMALL, "data=arithmetic"], "train")
    assert ckpt is None and cfg.tokenizer.name == "hf" and cfg.tokenizer.path is None and cfg.model.path == str(qwen)
    # An explicit tokenizer.name is kept.
    assert _config_for(qwen, [*SMALL, "tokenizer.name=char"], "train")[0].tokenizer.name == "char"


def test_an_hf_dir_without_tokenizer_files_names_the_keys(qwen, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in qwen.iterdir():
        if p.name == "config.json" or "safetensors" in p.name:
            shutil.copy(p, bare / p.name)
    with pytest.raises(ConfigError, match=r"holds no tokenizer files .*tokenizer.name=hf tokenizer.path=.*tokenizer.name=char"):
        _config_for(bare, SMALL, "train")
    cfg, _ = _config_for(bare, [*SMALL, f"tokenizer.path={qwen}", "data=arithmetic"], "train")
    assert (cfg.tokenizer.name, cfg.tokenizer.path) == ("hf", str(qwen))


def test_math_task_keys_evaluate_an_hf_dir(qwen, tmp_path):
    train = write_dapo_math(tmp_path / "dapo.parquet", num_prompts=6, repeats=1, cjk_prompts=0).path
    math500 = write_benchmark("math500", tmp_path / "math500.jsonl", num=2).path
    # No trainer.prompts_per_step: evaluation draws no training prompts, so a pool of 6 (< the 32 a
    # training step draws) is no reason to refuse.
    task = ["data=math", f"data.train_files=[{train}]", "reward.verifier=dapo_math", "reward.num_workers=1",
            "eval.k=1", "rollout.max_new_tokens=3"]
    with pytest.raises(ConfigError, match=r"nothing to evaluate: .*data.eval_files is empty.*\+data.eval_files.<benchmark>=\[FILE\]"):
        _config_for(qwen, task, "train")
    metrics = evaluate_target(qwen, [*task, f"+data.eval_files.math500=[{math500}]"])
    assert 0.0 <= metrics["eval/pass@1"] <= 1.0


def test_our_export_is_evaluated_with_the_tokenizer_and_task_it_was_trained_with(tiny_run, tmp_path):
    out = export_checkpoint(tiny_run, tmp_path / "hf")
    cfg, _ = _config_for(out, SMALL, "train")
    assert (cfg.tokenizer.name, cfg.data.task) == ("char", "arithmetic")
    with pytest.raises(ConfigError, match="was trained on data.task=arithmetic but the config evaluates data.task=math"):
        _config_for(out, [*SMALL[:2], "+recipe=qwen3_0p6b_dapo"], "train")


def test_a_running_run_is_evaluated_without_its_lock_and_left_untouched(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working directory either
    holder = hold_lock(tiny_run)  # the run's own output_dir (its saved run.output_dir), as a live trainer holds it
    try:
        before = snapshot(tiny_run)
        metrics = evaluate_target(tiny_run, ["eval.k=1"])
        assert {"eval/pass@1", "eval/mean@k"} <= metrics.keys()
        assert snapshot(tiny_run) == before
        assert not list(tmp_path.iterdir())
    finally:
        holder.kill()
        holder.wait()


def test_a_run_without_a_complete_checkpoint_is_one_line(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no complete checkpoint yet"):
        _config_for(tmp_path / "run", [], "train")
