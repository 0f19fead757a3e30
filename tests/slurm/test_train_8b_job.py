"""Submit the real ``scripts/slurm/train_8b.sh`` to a private Slurm cluster.

The script runs unchanged; only its documented knobs differ from a GPU site:
one node, 2 tasks, no GPUs (gloo), and overrides that drop the Qwen3-8B
layout for the tiny CPU config with a few steps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm" / "train_8b.sh"
JOB_TIMEOUT_S = 360.0

# Small enough to finish in a couple of minutes on 2 cores, large enough to
# exercise SFT, RL steps with DP=2, evaluation and a checkpoint.
TINY_OVERRIDES = " ".join(
    [
        "sft.steps=5",
        "sft.batch_size=16",
        "trainer.max_steps=2",
        "trainer.prompts_per_step=4",
        "trainer.micro_batch_size=8",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "rollout.n=4",
        "data.num_train=64",
        "data.num_eval=8",
        "eval.k=2",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
)

# The script's default path: the qwen3_8b_dapo recipe from MODEL_PATH / TRAIN_FILES / EVAL_FILES,
# here a tiny random Qwen3 with the real tokenizer and project-written DAPO-Math / MATH-500 files,
# shrunk to seconds (one process per DP rank, no TP; the HF engine: no vLLM in this venv).
RECIPE_TINY_OVERRIDES = " ".join(
    [
        "parallel.tensor_parallel=1",
        "rollout.vllm.tensor_parallel=1",
        "rollout.engine=hf",
        "model.dtype=float32",
        "trainer.max_steps=2",
        "trainer.prompts_per_step=4",
        "rollout.n=2",
        "rollout.max_new_tokens=6",
        "eval.k=1",
        "reward.num_workers=1",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
)

# sbatch options that replace the script's GPU-site #SBATCH defaults.
CPU_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def _tiny_assets(tmp: Path) -> dict[str, str]:
    """MODEL_PATH / TRAIN_FILES / EVAL_FILES for the recipe path, all written here (never downloaded)."""
    from nemo_gdro.testing.tiny_hf import build_tiny_hf
    from tests.data.fixtures import write_benchmark, write_dapo_math

    model = build_tiny_hf(tmp / "qwen3", arch="qwen3", seed=3)
    train = write_dapo_math(tmp / "dapo.parquet", num_prompts=8, repeats=2, cjk_prompts=0).path
    math500 = write_benchmark("math500", tmp / "math500.jsonl", num=3).path
    return {
        "MODEL_PATH": str(model), "TRAIN_FILES": str(train), "EVAL_FILES": f"math500={math500}",
        "NEMO_GDRO_CONFIG_OVERRIDES": RECIPE_TINY_OVERRIDES,
    }


def _submit(cluster: LocalSlurm, tmp: Path, env_extra: dict[str, str], args: tuple[str, ...] = ()) -> tuple[int, Path]:
    env = cluster.env()
    # A launcher's variables in the test's own environment would leak into the job.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        GPUS_PER_NODE="0",
        NEMO_GDRO_PYTHON=sys.executable,
        NEMO_GDRO_RECIPE_OVERRIDES="",
        NEMO_GDRO_CONFIG_OVERRIDES=TINY_OVERRIDES,
        RUN_NAME="slurm_tiny",
        OUTPUT_DIR=str(tmp / "run"),
    )
    env.update(env_extra)
    if "MODEL_PATH" in env_extra:  # the recipe path: the script builds the recipe overrides itself
        env.pop("NEMO_GDRO_RECIPE_OVERRIDES")
    log = tmp / "job.out"
    job_id = cluster.sbatch([*CPU_SBATCH, f"--output={log}", str(SCRIPT), *args], env=env, cwd=REPO)
    return job_id, log


def _assert_completed(cluster: LocalSlurm, job_id: int, log: Path) -> str:
    fields = cluster.wait_job(job_id, JOB_TIMEOUT_S)
    text = log.read_text(errors="replace") if log.exists() else "<no job log>"
    assert fields.get("JobState") == "COMPLETED", f"job {job_id}: {fields.get('JobState')} {fields.get('ExitCode')}\n{text[-6000:]}"
    assert fields.get("ExitCode") == "0:0", text[-6000:]
    assert fields.get("NumTasks") == "2" and fields.get("NumNodes") == "1"
    # The controller's completion record, written independently of scontrol's view.
    deadline = time.monotonic() + 10
    while cluster.jobcomp_state(job_id) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.jobcomp_state(job_id) == "COMPLETED"
    return text


def test_dry_run_starts_both_ranks_with_one_rendezvous(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    job_id, log = _submit(slurm_cluster, tmp_path, {"NEMO_GDRO_DRY_RUN": "1"})
    text = _assert_completed(slurm_cluster, job_id, log)
    port = 15000 + job_id % 10000
    for rank in (0, 1):
        # srun --label prefixes each line with the task id.
        line = re.search(rf"^{rank}: \[nemo-gdro\] dry run: rank {rank}/2 local_rank {rank} via slurm "
                         rf"\(rendezvous (\S+):{port}\)", text, re.M)
        assert line, text
        assert line.group(1) == "localhost"


@pytest.mark.slow
def test_train_8b_script_runs_the_recipe_dp2_on_cpu(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    start = time.monotonic()
    job_id, log = _submit(slurm_cluster, tmp_path, _tiny_assets(tmp_path))
    text = _assert_completed(slurm_cluster, job_id, log)
    print(f"job {job_id} finished in {time.monotonic() - start:.0f}s\n{text}")

    # Both ranks joined one gloo world of size 2.
    for rank in (0, 1):
        assert re.search(rf"^{rank}: \[nemo-gdro\] rank {rank}/2 local_rank {rank} via slurm", text, re.M), text
    assert "backend gloo" in text
    assert "+recipe=qwen3_8b_dapo" in text  # the command line the script logged

    run = tmp_path / "run"
    assert _rl_steps(run) == [1, 2]
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert checkpoints and checkpoints[-1].name == "step_00000002", f"checkpoints: {checkpoints}"
    files = sorted(str(p.relative_to(checkpoints[-1])) for p in checkpoints[-1].rglob("*") if p.is_file())
    print(f"checkpoint files: {files}")
    assert files

    # Requeue (what the USR1 trap and preemption do): Slurm reruns the same
    # script under the same job id; run.resume=auto finds the finished run's
    # checkpoint, so nothing is trained twice.
    # slurmd revokes a finished job's credential and compares with 1 s
    # resolution: an instance started in that same second would be refused
    # ("Job credential revoked"), which is why Slurm normally delays requeues.
    time.sleep(3)
    requeue = subprocess.run(["scontrol", "requeue", str(job_id)], env=slurm_cluster.env(), capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    # Slurm holds a requeued job for ~2 minutes (BeginTime) for that reason; a
    # real cluster waits, the test, having waited above, makes it eligible now.
    release = subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_cluster.env(), capture_output=True, text=True
    )
    assert release.returncode == 0, release.stderr
    text = _assert_completed(slurm_cluster, job_id, log)
    print(text[-3000:])
    assert f"job {job_id} (nemo-gdro-qwen3-8b) restart 1" in text
    assert re.search(r"^0: \[nemo-gdro\] resumed from \S+step_00000002 at step 2", text, re.M), text
    assert _rl_steps(run) == [1, 2]


def _rl_steps(run: Path) -> list[int]:
    """Steps with an RL record in metrics.jsonl (the SFT stage logs step 0)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [rec["step"] for rec in map(json.loads, filter(str.strip, lines)) if "train/reward_mean" in rec]


@pytest.mark.slow
def test_sigterm_from_slurm_checkpoints_and_the_requeued_job_resumes_there(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """`scancel --signal=TERM` (what Slurm sends job steps at preemption / the time limit): every
    rank finishes its step, one checkpoint is written, the job ends; requeued, it resumes there."""
    steps = 40
    job_id, log = _submit(slurm_cluster, tmp_path, {}, args=(f"trainer.max_steps={steps}", "trainer.checkpoint_every=0"))
    run = tmp_path / "run"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and _rl_steps(run)):
        time.sleep(1)
    assert _rl_steps(run), log.read_text(errors="replace")[-4000:] if log.exists() else "no log"
    sig = subprocess.run(["scancel", "--signal=TERM", str(job_id)], env=slurm_cluster.env(), capture_output=True, text=True)
    assert sig.returncode == 0, sig.stderr
    fields = slurm_cluster.wait_job(job_id, JOB_TIMEOUT_S)
    text = log.read_text(errors="replace")
    stopped = re.search(r"^0: nemo-gdro train: stopped by SIGTERM after step (\d+): checkpoint (\S+?);", text, re.M)
    assert stopped, f"{fields.get('JobState')}\n{text[-4000:]}"
    step = int(stopped.group(1))
    assert 1 <= step < steps and stopped.group(2).endswith(f"step_{step:08d}")
    assert "Traceback" not in text
    assert _rl_steps(run) == list(range(1, step + 1))

    time.sleep(3)  # see test_train_8b_script_runs_the_recipe_dp2_on_cpu: a same-second restart is refused
    requeue = subprocess.run(["scontrol", "requeue", str(job_id)], env=slurm_cluster.env(), capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    release = subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_cluster.env(), capture_output=True, text=True
    )
    assert release.returncode == 0, release.stderr
    text = _assert_completed(slurm_cluster, job_id, log)
    assert re.search(rf"^0: \[nemo-gdro\] resumed from \S+step_{step:08d} at step {step}", text, re.M), text[-4000:]
    assert _rl_steps(run) == list(range(1, steps + 1))  # no step lost, none logged twice
