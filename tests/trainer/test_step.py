"""``RLStep``'s controller clock: ``time/controllers_ms`` is the stages' own time, nothing else."""

import time

import pytest

from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import Trainer
from nemo_gdro.trainer.step import ControllerClock

TINY = [
    "sft.steps=0",
    "trainer.max_steps=1",
    "data.num_train=48",
    "data.num_eval=6",
    "trainer.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=4",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "logging.tensorboard=false",
    "logging.progress=false",
]


def test_clock_sums_the_timed_blocks():
    clock = ControllerClock()
    for _ in range(3):
        with clock():
            time.sleep(0.02)
    time.sleep(0.05)  # outside any block: not counted
    assert 0.06 <= clock.seconds < 0.1


def _slow(fn, seconds):
    def wrapped(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("algorithm", [[], ["algorithm.loss=r2vpo", "algorithm.rollout_scheduler=rollout_gdro"]])
def test_controller_time_counts_the_stages_and_not_the_engine(tmp_path, monkeypatch, algorithm):
    """Slow the prompt draw and the pass-rate store (controller work) by 0.15 s each, and the
    engine's generation and weight push (not controller work) by 0.4 s each."""
    with Trainer(compose(overrides=[*TINY, *algorithm, f"run.output_dir={tmp_path}"])) as trainer:
        c = trainer.components
        monkeypatch.setattr(c.stages.prompts, "draw", _slow(c.stages.prompts.draw, 0.15))
        monkeypatch.setattr(c.store, "observe", _slow(c.store.observe, 0.15))
        monkeypatch.setattr(c.engine, "generate", _slow(c.engine.generate, 0.4))
        monkeypatch.setattr(c.engine, "load_weights", _slow(c.engine.load_weights, 0.4))
        trainer._push_weights()
        metrics = trainer.rl_step(0)
    controllers_ms = metrics["time/controllers_ms"]
    assert 300 <= controllers_ms < 700, controllers_ms
    assert metrics["time/generate_s"] >= 0.4
    assert metrics["time/step_s"] * 1e3 > controllers_ms + 800


def test_time_metrics_split_the_step(tmp_path, monkeypatch):
    """Slow verification (0.6 s), the behaviour pass (0.5 s) and the weight push (0.4 s): each lands in its own
    ``time/*`` metric, generation no longer includes verification, and the parts add up to at most the step."""
    with Trainer(compose(overrides=[*TINY, f"run.output_dir={tmp_path}"])) as trainer:
        c = trainer.components
        assert trainer.rl_step.behaviour.separate_pass  # two mini-batches (the default)
        monkeypatch.setattr(c.task.verifier, "verify_batch", _slow(c.task.verifier.verify_batch, 0.6))
        monkeypatch.setattr(c.actor, "compute_token_stats", _slow(c.actor.compute_token_stats, 0.5))
        monkeypatch.setattr(c.engine, "load_weights", _slow(c.engine.load_weights, 0.4))
        metrics = trainer.rl_step(0)
    # Lower bounds from the injected sleeps and a sum of disjoint parts: no upper bound a loaded machine can break.
    assert metrics["time/behaviour_s"] >= 0.5
    assert metrics["time/weight_push_s"] >= 0.4
    assert metrics["actor/behaviour_pass"] == 1.0
    parts = ("time/plan_s", "time/generate_s", "time/behaviour_s", "time/train_s", "time/weight_push_s")
    # The slow verification (0.6 s) is inside no part (generation included): the parts and it fit in the step.
    assert sum(metrics[k] for k in parts) + 0.6 <= metrics["time/step_s"]
