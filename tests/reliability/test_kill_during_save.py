"""kill -9 during checkpoint saves (and anywhere): the resumed run equals the uninterrupted one, nothing lost."""

from __future__ import annotations

import random

import pytest

from nemo_gdro.testing.faults import compare_runs, corrupt_newest, logged_steps, seed_run
from tests.reliability.conftest import STEPS


def _finish(campaign, run, tmp_path):
    done = campaign.launcher.run(campaign.args(run), tmp_path / "resume.log")
    assert done.exitcode == 0, done.log[-3000:]
    assert "resumed from" in done.log
    return done


@pytest.mark.slow
@pytest.mark.parametrize("skip_saves", [0, 2])
def test_kill_inside_a_save_then_resume_is_identical(campaign, tmp_path, skip_saves):
    run = tmp_path / "run"
    seed_run(campaign.warm, run)
    killed = campaign.launcher.kill_during_save(campaign.args(run), tmp_path / "killed.log", run / "checkpoints",
                                                skip_saves=skip_saves)
    assert killed.killed, "the kill did not land inside a save"  # its temp dir is left behind
    assert any(p.name.startswith(".tmp_step_") for p in (run / "checkpoints").iterdir())
    _finish(campaign, run, tmp_path)
    verdict = compare_runs(campaign.reference, run, STEPS)
    assert verdict["lost"] == [] and verdict["identical"], verdict
    assert not any(p.name.startswith(".tmp_step_") for p in (run / "checkpoints").iterdir())


@pytest.mark.slow
def test_kill_anywhere_and_a_corrupted_newest_checkpoint(campaign, tmp_path):
    rng = random.Random(7)
    run = tmp_path / "run"
    seed_run(campaign.warm, run)
    killed = campaign.launcher.kill_after(campaign.args(run), tmp_path / "killed.log", delay=0.6 * campaign.run_s)
    assert killed.killed
    before = logged_steps(run, rl_only=True)
    what = corrupt_newest(run / "checkpoints", rng)
    done = _finish(campaign, run, tmp_path)
    verdict = compare_runs(campaign.reference, run, STEPS)
    assert verdict["lost"] == [] and verdict["identical"], (what, before, verdict, done.log[-2000:])
