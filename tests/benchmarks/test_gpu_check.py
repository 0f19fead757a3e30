"""scripts/gpu_check.sh and benchmarks/gpu_check.py on CPU (``--cpu-dry-run``): the prepared GPU
check must not rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def _script(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[int, dict, str]:
    out = tmp_path / "out" / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_the_script_writes_one_json_and_a_log_per_part(tmp_path):
    rc, report, output = _script(tmp_path, "--parts", "env")
    assert rc == 0, output
    assert report["mode"] == "cpu-dry-run" and report["all_ok"] is True
    env = report["parts"]["env"]
    assert env["status"] == "ok" and env["backend"] == "gloo" and env["all_reduce_ok"] is True
    assert env["version/megatron.core"] and env["te_installed"] is False
    assert (tmp_path / "out" / "gpu_check_logs" / "env.log").is_file()


@pytest.mark.slow
def test_a_hung_part_is_killed_and_recorded(tmp_path):
    """The global deadline cuts the part short; the JSON still says what happened (exit code 1)."""
    # tiny_train takes ~8.7 s on an idle core (imports included), so an 8 s deadline could let it finish;
    # 5.5 s is the smallest deadline that still starts a part (gpu_check skips one with < 5 s left).
    rc, report, output = _script(tmp_path, "--parts", "tiny_train,env", "--deadline-s", "5.5")
    assert rc == 1, output
    tiny = report["parts"]["tiny_train"]
    assert tiny["status"] == "timeout" and "killed after" in tiny["error"] and "log_tail" in tiny
    assert report["parts"]["env"]["status"] == "skipped"  # nothing left of the deadline
    assert report["all_ok"] is False


def test_unknown_part_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--parts", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown part(s) ['nope']" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("part", ["logprob_entropy", "actor_qwen3_0p6b", "actor_qwen3_1p7b", "tiny_train"])
def test_each_part_runs_at_toy_size(part, tmp_path, monkeypatch):
    """In-process (the script runs each in a subprocess): the figures the GPU run will report exist."""
    monkeypatch.chdir(tmp_path)
    figures = gpu_check.PART_FUNCTIONS[part](True)
    if part == "logprob_entropy":
        assert figures["time_ratio"] > 0 and figures["fwd_bwd_time_ratio"] > 0
        assert {"ours_peak_extra_over_logits", "naive_logp_peak_extra_over_logits"} <= set(figures)
    elif part.startswith("actor"):
        assert figures["failed_variants"] == []
        for name, rec in figures.items():
            if name != "failed_variants":
                assert rec["loss_finite"] and rec["tokens_per_s"] > 0 and len(rec["step_times_s"]) == 2, name
        if part == "actor_qwen3_0p6b":
            assert figures["default"]["offload"]["state_identical"] is True
            assert figures["distributed_optimizer_full_recompute"]["distributed_optimizer"] is True
    else:
        assert figures["rl_steps"] == 2 and figures["checkpoints"][-1] == "step_00000002"
        assert figures["rl_steps_per_s"] > 0 and "eval/pass@1" in figures["eval_last"]
