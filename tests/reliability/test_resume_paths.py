"""Resume, export and eval where paths are spelled otherwise, files moved, folders deleted, stages switched.

Issue 21 item 5, as a hostile user would try it. Every row is real training on tiny
assets (the math task on DAPO-layout files with a tiny random Qwen3 and its real
tokenizer; the arithmetic task for the algorithm switches), resumed or exported from
a copy of one first run.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from nemo_gdro.cli import main
from nemo_gdro.testing.tiny_hf import build_tiny_hf
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import train_config
from nemo_gdro.typed_config import ConfigError
from tests.data.fixtures import write_benchmark, write_dapo_math, write_rows
from tests.reliability.conftest import TINY

# ------------------------------------------------------------------ math runs: data paths
MATH = [
    "data=math", "reward.verifier=dapo_math", "tokenizer.name=hf", "model=hf", "model.dtype=float32", "sft.steps=0",
    "data.prompt_format=raw", "reward.num_workers=1", "trainer.prompts_per_step=4", "rollout.n=2",
    "rollout.max_new_tokens=3", "eval.k=1", "trainer.micro_batch_size=8", "trainer.eval_every=0",
    "trainer.checkpoint_every=1", "logging.tensorboard=false", "logging.progress=false",
]


@pytest.fixture(scope="module")
def math_run(tmp_path_factory):
    """One step of math RL with ``model.path`` and ``data.train_files`` given relative to ``root``."""
    import os

    root = tmp_path_factory.mktemp("resume_paths")
    build_tiny_hf(root / "qwen3", arch="qwen3", seed=5)
    write_dapo_math(root / "data" / "dapo.parquet", num_prompts=8, repeats=2, cjk_prompts=0)
    write_benchmark("math500", root / "data" / "math500.jsonl", num=2)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        train_config(compose(overrides=MATH + ["model.path=qwen3", "data.train_files=[data/dapo.parquet]",
                                               "+data.eval_files.math500=[data/math500.jsonl]",
                                               "trainer.max_steps=1", "run.output_dir=run"]))
    finally:
        os.chdir(cwd)
    return root


def _same_rows_as_jsonl(root: Path) -> str:
    import pyarrow.parquet as pq

    out = root / "data" / "dapo.jsonl"
    write_rows(out, pq.read_table(root / "data" / "dapo.parquet").to_pylist(), "jsonl")
    return str(out)


def _other_rows(root: Path) -> str:
    return str(write_dapo_math(root / "data" / "other.parquet", num_prompts=8, repeats=2, cjk_prompts=0, start=50).path)


def _through_symlink(root: Path) -> str:
    link = root / "data_link"
    if not link.exists():
        link.symlink_to(root / "data")
    return str(link / "dapo.parquet")


# (case, where the resumed run points data.train_files, how it must end: "ok" + a printed note | "refuse" + the error)
DATA_CASES = [
    ("relative path, resumed from the same directory", lambda root: "data/dapo.parquet", "ok", None),
    ("absolute path", lambda root: str(root / "data" / "dapo.parquet"), "ok", None),
    ("same file through a symlinked folder", _through_symlink, "ok", "paths spelled otherwise, same files"),
    ("parquet converted to jsonl, same rows", _same_rows_as_jsonl, "ok", "hold the same 8 training prompts"),
    ("other rows", _other_rows, "refuse", "the training data differ"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, files, outcome, text", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_resume_with_the_data_spelled_otherwise(math_run, tmp_path, monkeypatch, capsys, case, files, outcome, text):
    run = tmp_path / "run"
    shutil.copytree(math_run / "run" / "checkpoints", run / "checkpoints")
    monkeypatch.chdir(math_run)
    overrides = MATH + [f"model.path={math_run / 'qwen3'}", f"data.train_files=[{files(math_run)}]",
                        f"+data.eval_files.math500=[{math_run / 'data' / 'math500.jsonl'}]",
                        "trainer.max_steps=2", f"run.output_dir={run}"]
    if outcome == "refuse":
        with pytest.raises(ConfigError, match=text) as info:
            train_config(compose(overrides=overrides))
        assert "data.train_files" in str(info.value) and "\n" not in str(info.value)
        return
    assert train_config(compose(overrides=overrides)).steps_done == 2
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 1" in out
    if text:
        assert text in out


# ------------------------------------------------------------------ export / eval of a math run
def _relative_model_path_from_another_cwd(root: Path, run: Path, tmp_path: Path) -> None:
    pass  # the run was trained with model.path=qwen3 from `root`; export runs from tmp_path


def _model_folder_deleted(root: Path, run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved_away"
    shutil.move(str(root / "qwen3"), moved)  # restored after the test (other rows need it)


EXPORT_CASES = [
    ("relative model.path, export from another directory", _relative_model_path_from_another_cwd),
    ("original model folder deleted", _model_folder_deleted),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, damage", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_and_eval_from_elsewhere(math_run, tmp_path, monkeypatch, case, damage):
    from transformers import AutoTokenizer

    from nemo_gdro.trainer.eval_run import evaluate_target

    run = tmp_path / "run"
    shutil.copytree(math_run / "run", run)
    damage(math_run, run, tmp_path)
    try:
        monkeypatch.chdir(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["export", str(run), "exported"]) == 0
            metrics = evaluate_target(run, ["eval.k=1", f"run.output_dir={tmp_path / 'eval'}"])
        out = tmp_path / "exported"
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= {
            p.name for p in out.iterdir()}
        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        assert tok("1 + 1 = 2")["input_ids"] and json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        assert "eval/pass@1" in metrics
    finally:
        if (tmp_path / "moved_away").exists():
            shutil.move(str(tmp_path / "moved_away"), math_run / "qwen3")


# ------------------------------------------------------------------ algorithm stages switched mid-run
# (case, the resumed run's overrides, allow the change?, "ok" + the stage named in a warning | "refuse" + error)
STAGE_CASES = [
    ("r2vpo on", ["algorithm.loss=r2vpo"], True, "ok", "no state for 'dual'"),
    ("r2vpo with replay on", ["algorithm.loss=r2vpo", "algorithm.replay.ratio=1.0"], True, "ok",
     "no state for 'replay'"),
    ("rollout_gdro on", ["algorithm.rollout_scheduler=rollout_gdro"], True, "ok", "no state for 'rollout_gdro'"),
    ("prompt_gdro_resample on", ["algorithm.prompt_scheduler=prompt_gdro_resample"], True, "ok",
     "no state for 'bin_index'"),
    ("r2vpo on, not allowed", ["algorithm.loss=r2vpo"], False, "refuse",
     r"run.allow_config_change=\[algorithm.loss\]"),
]


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    train_config(compose(overrides=TINY + ["trainer.max_steps=1", f"run.output_dir={root / 'run'}"]))
    return root / "run"


def _resume(source: Path, run: Path, *extra: str):
    if source != run:
        shutil.copytree(source / "checkpoints", run / "checkpoints")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_config(compose(overrides=TINY + [f"run.output_dir={run}", *extra]))
    return result, [str(w.message) for w in caught if "run.allow_config_change" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize("case, overrides, allow, outcome, text", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_allowed_algorithm_change_switches_a_stage_on(arithmetic_run, tmp_path, case, overrides, allow, outcome, text):
    extra = ["trainer.max_steps=2", *overrides] + (["run.allow_config_change=[algorithm]"] if allow else [])
    if outcome == "refuse":
        with pytest.raises(ConfigError, match=text):
            _resume(arithmetic_run, tmp_path / "run", *extra)
        return
    result, caught = _resume(arithmetic_run, tmp_path / "run", *extra)
    assert result.steps_done == 2
    assert any(text in m and "starts from its initial state" in m for m in caught), caught


@pytest.mark.slow
def test_a_stage_switched_off_is_ignored_with_a_warning(arithmetic_run, tmp_path):
    """R2VPO (with its replay buffer) on for step 2, then off again for step 3: its state is left behind, named."""
    allow = "run.allow_config_change=[algorithm]"
    _resume(arithmetic_run, tmp_path / "run", "trainer.max_steps=2", "algorithm.loss=r2vpo",
            "algorithm.replay.ratio=1.0", allow)
    result, caught = _resume(tmp_path / "run", tmp_path / "run", "trainer.max_steps=3", allow)
    assert result.steps_done == 3
    for name in ("'dual'", "'replay'"):
        assert any(name in m and "no longer uses; it is ignored" in m for m in caught), caught
