"""scripts/slurm/train_8b.sh refuses missing or wrong recipe inputs before it starts any task.

The script runs for real (bash), inside a stand-in Slurm job environment
(the variables sbatch sets); each case stops at the input check, before srun.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm" / "train_8b.sh"


def _run(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TRAIN_FILES", "EVAL_FILES")}
    env.pop("NEMO_GDRO_RECIPE_OVERRIDES", None)
    env.update(SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO))
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_missing_inputs_are_all_named(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 2
    for name in ("MODEL_PATH", "TRAIN_FILES", "EVAL_FILES", "qwen3_8b_dapo"):
        assert name in r.stderr


@pytest.fixture
def inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    train = tmp_path / "train.parquet"
    train.write_bytes(b"")
    bench = tmp_path / "math500.jsonl"
    bench.write_text("")
    return {"MODEL_PATH": str(model), "TRAIN_FILES": str(train), "EVAL_FILES": f"math500={bench}"}


def test_model_dir_without_config_is_named(tmp_path, inputs):
    r = _run(tmp_path, **{**inputs, "MODEL_PATH": str(tmp_path)})
    assert r.returncode == 2 and f"MODEL_PATH={tmp_path} has no config.json" in r.stderr


def test_missing_train_file_is_named(tmp_path, inputs):
    r = _run(tmp_path, **{**inputs, "TRAIN_FILES": inputs["TRAIN_FILES"] + ",/nonexistent/b.parquet"})
    assert r.returncode == 2 and "TRAIN_FILES entry /nonexistent/b.parquet does not exist" in r.stderr


@pytest.mark.parametrize("entry", ["math500", "=x.jsonl", "math500="])
def test_malformed_eval_entry_is_named(tmp_path, inputs, entry):
    r = _run(tmp_path, **{**inputs, "EVAL_FILES": entry})
    assert r.returncode == 2 and f"EVAL_FILES entry '{entry}' is not benchmark=file[,file]" in r.stderr


def test_missing_eval_file_is_named(tmp_path, inputs):
    r = _run(tmp_path, **{**inputs, "EVAL_FILES": inputs["EVAL_FILES"] + " aime24=/nonexistent/aime.parquet"})
    assert r.returncode == 2 and "EVAL_FILES aime24: /nonexistent/aime.parquet does not exist" in r.stderr
