"""kill -9 during checkpoint saves (and anywhere): the resumed run equals the uninterrupted one, nothing lost."""

from __future__ import annotations

import random
import signal

import pytest

from nemo_gdro.testing.faults import compare_runs, corrupt_newest, logged_steps, seed_run
from tests.reliability.conftest import STEPS


def _finish(campaign, run, tmp_path, resumes=True):
    done = campaign.launcher.run(campaign.args(run), tmp_path / "resume.log")
    assert done.exitcode == 0, done.log[-3000:]
    assert not resumes or "resumed from" in done.log, done.log[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("skip_saves", [1])
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
    # SIGKILL as soon as RL step 1 is logged: it lands in that step's checkpoint save, evaluation or the next
    # step (a fixed delay is not robust to the machine's load: the run may finish first).
    killed = campaign.launcher.signal_after_step(campaign.args(run), tmp_path / "killed.log", run, step=1,
                                                 signum=signal.SIGKILL)
    assert killed.exitcode == -signal.SIGKILL, killed.log[-2000:]
    before = logged_steps(run, rl_only=True)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    what = corrupt_newest(run / "checkpoints", rng)
    # With only the seeded step-0 checkpoint, corrupting it leaves nothing to resume: the run starts over.
    done = _finish(campaign, run, tmp_path, resumes=len(kept) > 1)
    verdict = compare_runs(campaign.reference, run, STEPS)
    assert verdict["lost"] == [] and verdict["identical"], (what, before, verdict, done.log[-2000:])
