"""The ``skip_zero_variance`` prompt scheduler in the real loop: a tiny run, exact resume, DP=1 vs DP=2."""

import math

import pytest
import torch

from nemo_gdro.trainer.checkpoint import CheckpointManager
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import Trainer
from tests.trainer.test_loop import TINY, controller_state, read_metrics
from tests.trainer.test_loop_dp import _rows, _train_args

# A pool of 8 prompts at 4 per step: an epoch every 2 steps, so the skip acts from step 3 on.
SKIP = TINY + ["data.num_train=8", "algorithm.prompt_scheduler=skip_zero_variance"]
KEYS = ("skipped", "explored", "precision", "fallback", "predicted_zero_share", "explore_easy", "explore_hard")


def _same_rows(a, b, steps):
    for step in steps:
        for key, value in a[step].items():
            if key.startswith("time/"):
                continue
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert b[step][key] is None or math.isnan(b[step][key]), (step, key)
            else:
                assert b[step][key] == value, (step, key)


@pytest.mark.slow
def test_tiny_run_skips_and_checkpoints_the_table(tmp_path):
    cfg = compose(overrides=SKIP + ["trainer.max_steps=4", "trainer.checkpoint_every=2", f"run.output_dir={tmp_path}"])
    with Trainer(cfg) as trainer:
        assert trainer.run().steps_done == 4
        rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
        state = controller_state(trainer)
    for step in (1, 2, 3, 4):
        assert rows[step]["train/rollouts"] == 16  # the budget is unchanged: P prompts x n every step
        assert all(f"prompt_skip/{k}" in rows[step] for k in KEYS)
    assert rows[1]["prompt_skip/skipped"] == rows[2]["prompt_skip/skipped"] == 0  # no history in epoch 1
    # The near-untrained policy fails almost everything: most of the pool is predicted zero-variance
    # after one epoch, and the second epoch skips some of it.
    assert rows[2]["prompt_skip/predicted_zero_share"] >= 0.5
    assert rows[3]["prompt_skip/skipped"] + rows[4]["prompt_skip/skipped"] > 0
    streak = state["prompt_skip"]["streak"]
    assert streak.dtype == torch.int16 and streak.shape == (8,) and int(streak.max()) >= 1
    saved = CheckpointManager(tmp_path / "checkpoints").load(tmp_path / "checkpoints" / "step_00000004")
    assert torch.equal(saved["controllers"]["prompt_skip"]["streak"], streak)
    assert saved["controllers"]["prompt_skip"]["sampler"] == state["prompt_skip"]["sampler"]


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = SKIP + ["trainer.checkpoint_every=2"]
    with Trainer(compose(overrides=base + ["trainer.max_steps=5", f"run.output_dir={straight}"])) as a:
        a.run()
        state_a = controller_state(a)["prompt_skip"]
    with Trainer(compose(overrides=base + ["trainer.max_steps=2", f"run.output_dir={split}"])) as b:
        b.run()
    with Trainer(compose(overrides=base + ["trainer.max_steps=5", f"run.output_dir={split}", "run.resume=auto"])) as c:
        c.run()
        state_c = controller_state(c)["prompt_skip"]
    _same_rows(_rows(straight), _rows(split), (3, 4, 5))
    for key, value in state_a.items():
        assert torch.equal(value, state_c[key]) if isinstance(value, torch.Tensor) else value == state_c[key], key


@pytest.mark.slow
def test_draws_and_metrics_do_not_depend_on_the_dp_size(tmp_path):
    """Every rank updates the table from the global feedback: DP=2 draws and logs as DP=1 does."""
    args = [a for a in SKIP if not a.startswith("trainer.prompts_per_step")] + [
        "trainer.prompts_per_step=6", "data.num_train=12", "trainer.max_steps=4", "trainer.checkpoint_every=0",
    ]
    one, two = tmp_path / "dp1", tmp_path / "dp2"
    for out, nproc in ((one, 1), (two, 2)):
        _train_args([*args, f"run.output_dir={out}"], nproc)
    a, b = _rows(one), _rows(two)
    assert sum(a[s]["prompt_skip/skipped"] for s in (3, 4)) > 0  # the skip acted
    for step in (1, 2, 3, 4):
        for key, value in a[step].items():
            if key.startswith("time/") or value is None:
                continue
            if key.startswith(("train/", "prompt_skip/")) and not key.startswith("train/response_tokens"):
                assert b[step][key] == value, (step, key)  # the same prompts, rollouts and rewards
            else:
                assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
