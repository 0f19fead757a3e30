"""scripts/slurm/train_8b.sh refuses missing or wrong recipe inputs before it starts any task.

The script runs for real (bash), inside a stand-in Slurm job environment
(the variables sbatch sets); each case stops at the input check, before srun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm" / "train_8b.sh"


def _run(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TRAIN_FILES", "EVAL_FILES")}
    for name in ("NEMO_GDRO_RECIPE_OVERRIDES", "NEMO_GDRO_CONFIG_OVERRIDES", "NEMO_GDRO_WORKDIR", "RECIPE"):
        env.pop(name, None)
    env.update(SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO))
    # The configuration check runs this interpreter on this checkout, from whatever directory the tasks use.
    env.update(NEMO_GDRO_PYTHON=sys.executable, PYTHONPATH=str(REPO))
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


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


# ------------------------------------------------------------ the config check before srun (issue 21, item 6)
# The recipe at test size: no vLLM in this venv, a float32 model; the 8-task job of the TP=4 recipe.
SMALL = "rollout.engine=hf model.dtype=float32 rollout.vllm.tensor_parallel=1"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A real tiny Qwen3 checkpoint (weights and tokenizer), a DAPO-Math Parquet file and a MATH-500 file."""
    from nemo_gdro.testing.tiny_hf import build_tiny_hf
    from tests.data.fixtures import write_benchmark, write_dapo_math

    root = tmp_path_factory.mktemp("assets")
    build_tiny_hf(root / "qwen3", arch="qwen3", seed=3)
    write_dapo_math(root / "dapo.parquet", num_prompts=4, repeats=2, cjk_prompts=0)
    write_benchmark("math500", root / "math500.jsonl", num=3)
    return root


def _good(assets: Path, **extra: str) -> dict[str, str]:
    env = {
        "MODEL_PATH": str(assets / "qwen3"), "TRAIN_FILES": str(assets / "dapo.parquet"),
        "EVAL_FILES": f"math500={assets / 'math500.jsonl'}", "NEMO_GDRO_CONFIG_OVERRIDES": SMALL,
        "SLURM_NTASKS": "8", "NEMO_GDRO_CHECK_ONLY": "1",
    }
    env.update(extra)
    return env


def test_valid_inputs_pass_the_check_against_the_jobs_task_count(tmp_path, assets):
    """The batch shell is one process; the TP=4 recipe is checked against the job's 8 tasks."""
    r = _run(tmp_path, **_good(assets))
    assert r.returncode == 0, r.stderr
    assert "nemo-gdro train: configuration OK for 8 process(es)" in r.stdout
    assert "inputs and configuration checked; no task started" in r.stdout


def test_a_world_size_the_layout_cannot_split_is_named(tmp_path, assets):
    r = _run(tmp_path, **_good(assets, SLURM_NTASKS="6"))
    assert r.returncode == 2
    assert "= 4 must divide the 6 process(es) launched" in r.stderr and "no task was started" in r.stderr


def test_unknown_benchmark_is_named(tmp_path, assets):
    r = _run(tmp_path, **_good(assets, EVAL_FILES=f"math500={assets / 'math500.jsonl'} math5000={assets / 'math500.jsonl'}"))
    assert r.returncode == 2
    assert "data.eval_files.math5000: unknown benchmark; valid names: aime24" in r.stderr


def test_unknown_recipe_is_named_with_the_known_ones(tmp_path, assets):
    r = _run(tmp_path, **_good(assets, RECIPE="qwen3_9b_dapo"))
    assert r.returncode == 2
    assert "Could not find 'recipe/qwen3_9b_dapo'" in r.stderr and "qwen3_8b_dapo" in r.stderr


def test_model_folder_without_weights_is_named(tmp_path, assets):
    model = tmp_path / "no_weights"
    shutil.copytree(assets / "qwen3", model, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    r = _run(tmp_path, **_good(assets, MODEL_PATH=str(model)))
    assert r.returncode == 2
    assert f"model.path={model}: no weights: no model.safetensors and no model.safetensors.index.json" in r.stderr


@pytest.mark.parametrize("name, why", [("train.txt", "unknown data file type '.txt'"), ("train.parquet", "cannot read as Parquet")])
def test_training_file_of_an_unsupported_type_is_named(tmp_path, assets, name, why):
    bad = tmp_path / name
    bad.write_text("prompt,answer\n")
    r = _run(tmp_path, **_good(assets, TRAIN_FILES=f"{assets / 'dapo.parquet'},{bad}"))
    assert r.returncode == 2
    assert f"data.train_files[1]={bad}: {why}" in r.stderr


def test_every_problem_is_listed_before_exiting(tmp_path, assets):
    bad = tmp_path / "train.txt"
    bad.write_text("x")
    model = tmp_path / "empty_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    r = _run(tmp_path, **_good(assets, MODEL_PATH=str(model), TRAIN_FILES=f"{bad},/nonexistent/b.parquet",
                               EVAL_FILES=f"math500={assets / 'math500.jsonl'},/nonexistent/m.jsonl"))
    assert r.returncode == 2
    for text in ("TRAIN_FILES entry /nonexistent/b.parquet does not exist", "EVAL_FILES math500: /nonexistent/m.jsonl does not exist",
                 f"{model}/config.json: no key 'architectures'", f"data.train_files[0]={bad}: unknown data file type",
                 "data.train_files[1]=/nonexistent/b.parquet: does not exist",
                 "data.eval_files.math500[1]=/nonexistent/m.jsonl: does not exist"):
        assert text in r.stderr, text


def test_relative_paths_are_taken_from_the_workdir_not_the_submit_directory(tmp_path, assets):
    work, submit = tmp_path / "work", tmp_path / "submit"
    (work / "data").mkdir(parents=True)
    submit.mkdir()
    shutil.copy(assets / "dapo.parquet", work / "data" / "dapo.parquet")
    relative = {"TRAIN_FILES": "data/dapo.parquet", "NEMO_GDRO_WORKDIR": str(work)}
    r = _run(submit, **_good(assets, **relative))
    assert r.returncode == 0, r.stderr
    assert f"data.train_files=['{work}/data/dapo.parquet']" in r.stdout  # the srun line: the path the tasks open
    # A file that only the submitting directory has is refused, naming where the tasks would look.
    (submit / "only_here.parquet").write_bytes((assets / "dapo.parquet").read_bytes())
    r = _run(submit, **_good(assets, TRAIN_FILES="only_here.parquet", NEMO_GDRO_WORKDIR=str(work)))
    assert r.returncode == 2
    assert f"TRAIN_FILES entry {work}/only_here.parquet does not exist" in r.stderr


def test_paths_with_spaces_commas_quotes_and_equals_reach_the_config_intact(tmp_path, assets):
    """Each path is opened by the check (files must exist, the model must have weights), so a
    path that Hydra split, unquoted or mangled fails the check."""
    # MODEL_PATH is one path: anything goes. TRAIN_FILES is split at commas, EVAL_FILES at spaces and commas.
    model = shutil.copytree(assets / "qwen3", tmp_path / "my model, v2 = \"final\" it's \\ here\\")
    odd = tmp_path / "train data = 'v2' \"q\" \\"
    odd.mkdir()
    train = odd / "dapo math [1].parquet"
    shutil.copy(assets / "dapo.parquet", train)
    data = tmp_path / "data=x"
    data.mkdir()
    bench = data / "math500's.jsonl"
    shutil.copy(assets / "math500.jsonl", bench)
    # A stray comma in TRAIN_FILES (an empty entry) is no Hydra parse error either.
    r = _run(tmp_path, **_good(assets, MODEL_PATH=str(model), TRAIN_FILES=f"{train},", EVAL_FILES=f"math500={bench}"))
    assert r.returncode == 0, r.stderr
    assert "configuration OK for 8 process(es)" in r.stdout
    missing = odd / "absent file.parquet"
    r = _run(tmp_path, **_good(assets, MODEL_PATH=str(model), TRAIN_FILES=f"{missing}", EVAL_FILES=f"math500={bench}"))
    assert r.returncode == 2 and f"data.train_files[0]={missing}: does not exist" in r.stderr


def test_a_path_the_config_would_interpolate_is_refused(tmp_path, assets):
    odd = tmp_path / "${oops}"
    odd.mkdir()
    train = odd / "dapo.parquet"
    shutil.copy(assets / "dapo.parquet", train)
    r = _run(tmp_path, **_good(assets, TRAIN_FILES=str(train)))
    assert r.returncode == 2
    assert f"TRAIN_FILES entry {train}: contains '${{', which the config reads as an interpolation" in r.stderr


@pytest.mark.parametrize("path", ["recipe", "own_overrides"])
def test_what_the_real_slurm_test_submits_passes_the_check(tmp_path, path):
    """tests/slurm submits this script with these inputs on 2 tasks: the check must accept them."""
    from tests.slurm.test_train_8b_job import TINY_OVERRIDES, _tiny_assets

    env = {"SLURM_NTASKS": "2", "GPUS_PER_NODE": "0", "NEMO_GDRO_CHECK_ONLY": "1", "RUN_NAME": "slurm_tiny",
           "OUTPUT_DIR": str(tmp_path / "run")}
    if path == "recipe":
        env.update(_tiny_assets(tmp_path))
    else:
        env.update(NEMO_GDRO_RECIPE_OVERRIDES="", NEMO_GDRO_CONFIG_OVERRIDES=TINY_OVERRIDES)
    r = _run(tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert "configuration OK for 2 process(es)" in r.stdout
    assert not (tmp_path / "run").exists()  # nothing written


def test_blanks_around_list_entries_and_stray_commas_are_no_part_of_a_path(tmp_path, assets):
    train = f" {assets / 'dapo.parquet'} , ,{assets / 'dapo.parquet'},"
    r = _run(tmp_path, **_good(assets, TRAIN_FILES=train, EVAL_FILES=f"math500={assets / 'math500.jsonl'},"))
    assert r.returncode == 0, r.stderr
    r = _run(tmp_path, **_good(assets, TRAIN_FILES=" , ", EVAL_FILES="math500=,"))
    assert r.returncode == 2
    assert "TRAIN_FILES=' , ' names no file" in r.stderr and "EVAL_FILES entry 'math500=,' names no file" in r.stderr


def test_a_relative_model_path_is_shown_where_it_points(tmp_path, assets):
    r = _run(tmp_path, **_good(assets, MODEL_PATH="ckpt/qwen3", NEMO_GDRO_WORKDIR=str(tmp_path)))
    assert r.returncode == 2
    assert f"MODEL_PATH=ckpt/qwen3 (= {tmp_path}/ckpt/qwen3) has no config.json" in r.stderr
    assert f"model.path={tmp_path}/ckpt/qwen3: no such directory" in r.stderr
