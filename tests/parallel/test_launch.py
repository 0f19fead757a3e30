"""Launcher environment detection (torchrun / srun / lone) and Slurm node-list expansion."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nemo_gdro.parallel.launch import (
    PORT_BASE,
    PORT_SPAN,
    LaunchEnv,
    LaunchEnvError,
    detect_launch_env,
    expand_nodelist,
    first_host,
    port_from_job_id,
)

# An srun task's variables (as slurmd sets them: the batch step lacks SLURM_STEP_ID).
SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


# ------------------------------------------------------------------ node lists
@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("node[001-004,7],gpu-a1", ["node001", "node002", "node003", "node004", "node7", "gpu-a1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a1,b[2],c", ["a1", "b2", "c"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("dgx-[1,3]-ib", ["dgx-1-ib", "dgx-3-ib"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "n[1-3", "n1-3]", "n[3-1]", "n[a-b]", "n[1,,2]", "a,,b", "n[[1]]", "n[1-]"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(LaunchEnvError):
        expand_nodelist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize("nodelist", ["node[001-004,7],gpu-a1", "n[8-10]", "rack[1-2]-n[01-02]", "n[098-101]", "dgx-[1,3]"])
def test_expand_nodelist_agrees_with_scontrol(nodelist: str, tmp_path: Path) -> None:
    # `scontrol show hostnames` expands locally, without a controller, but
    # insists on reading some slurm.conf first.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n")
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist],
        capture_output=True, text=True, check=True, env={**os.environ, "SLURM_CONF": str(conf)},
    )
    assert expand_nodelist(nodelist) == out.stdout.split()


def test_first_host_without_scontrol() -> None:
    assert first_host("gpu[007-008],cpu1", use_scontrol=False) == "gpu007"


def test_port_from_job_id_stays_in_range() -> None:
    ports = {port_from_job_id(j) for j in (0, 1, 9999, 10000, 123456789)}
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert port_from_job_id(4242) == port_from_job_id(4242) != port_from_job_id(4243)


# ------------------------------------------------------------------ detection
def test_lone_process() -> None:
    env = detect_launch_env({})
    assert env == LaunchEnv(0, 1, 0, None, None, "single")
    exported: dict[str, str] = {}
    env.export(exported)
    assert exported == {}  # keeps the private FileStore world


def test_torchrun_variables() -> None:
    env = detect_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    )
    assert env == LaunchEnv(3, 8, 3, "h0", 29500, "torchrun")


def test_torchrun_with_file_rendezvous_needs_no_address() -> None:
    env = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.master_addr, env.master_port, env.source) == (None, None, "torchrun")


def test_torchrun_wins_over_slurm() -> None:
    # `srun torchrun`: the Slurm variables describe the node task, torchrun's the worker.
    env = detect_launch_env({**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "32", "LOCAL_RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.source) == (5, 32, "torchrun")


def test_srun_task() -> None:
    env = detect_launch_env(SRUN_TASK, use_scontrol=False)
    assert env == LaunchEnv(9, 16, 1, "gpu007", port_from_job_id(4242), "slurm")
    exported: dict[str, str] = {}
    env.export(exported)
    assert exported == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007", "MASTER_PORT": str(port_from_job_id(4242)),
    }


def test_srun_task_honours_explicit_rendezvous() -> None:
    env = detect_launch_env({**SRUN_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}, use_scontrol=False)
    assert (env.master_addr, env.master_port) == ("head", 29400)


def test_batch_step_is_a_lone_process() -> None:
    # The batch script itself carries SLURM_PROCID=0 and the job's task count;
    # treating it as rank 0 of 16 would hang waiting for ranks that never start.
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert detect_launch_env(batch).source == "single"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        ({**SRUN_TASK, "SLURM_PROCID": "16"}, "SLURM_PROCID=16"),
        ({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "8"}, "SLURM_STEP_NUM_TASKS=8"),
        ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID"),
        ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
        ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID"),
        ({**SRUN_TASK, "SLURM_JOB_NODELIST": "gpu[1-"}, "unbalanced"),
    ],
)
def test_inconsistent_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchEnvError, match=message.replace("[", r"\[")):
        detect_launch_env(env, use_scontrol=False)
