"""SIGTERM / SIGINT: the step finishes, a checkpoint is written, one line, and the next run continues from it."""

from __future__ import annotations

import re
import signal

import pytest

from nemo_gdro.testing.faults import compare_runs, logged_steps, seed_run
from tests.reliability.conftest import STEPS


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_the_rerun_finishes_identically(campaign, tmp_path, signum):
    run = tmp_path / "run"
    seed_run(campaign.warm, run)
    stopped = campaign.launcher.signal_after_step(campaign.args(run), tmp_path / "stopped.log", run, step=1,
                                                  signum=signum)
    name = signal.Signals(signum).name
    assert stopped.exitcode == 128 + signum, stopped.log[-3000:]
    assert "Traceback" not in stopped.log
    line = re.search(rf"^nemo-gdro train: stopped by {name} after step (\d+): checkpoint (\S+); run the same command "
                     r"again to continue \(run\.resume=auto\)$", stopped.log, re.M)
    assert line, stopped.log[-3000:]
    step = int(line.group(1))
    assert 1 <= step < STEPS and line.group(2).endswith(f"step_{step:08d}")
    assert logged_steps(run, rl_only=True) == list(range(1, step + 1))  # it stopped right after that step
    resumed = campaign.launcher.run(campaign.args(run), tmp_path / "resumed.log")
    assert resumed.exitcode == 0 and f"at step {step}" in resumed.log, resumed.log[-3000:]
    verdict = compare_runs(campaign.reference, run, STEPS)
    assert verdict["lost"] == [] and verdict["identical"], verdict
