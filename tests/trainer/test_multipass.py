"""The loss-side options in real one-step runs (tiny Megatron actor, HF engine, real verifier):
``trainer.epochs_per_batch``, ``algorithm.policy_loss.loss_agg_mode`` and replay with the clipped loss."""

import math

import pytest
import torch

from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import Trainer
from tests.trainer.tiny_run import TINY_OVERLONG



def _steps(out, overrides, steps=1):
    """``steps`` RL steps from the same initial state; returns (metrics per step, optimizer steps taken,
    the stages' controller states, updated HF weights)."""
    with Trainer(compose(overrides=[*TINY_OVERLONG, *overrides, f"run.output_dir={out}"])) as trainer:
        c = trainer.components
        trainer._enter_rl_phase()
        trainer._push_weights()
        before = c.actor.step_count
        metrics = [trainer.rl_step(s) for s in range(steps)]
        state = {name: item.obj.state_dict() for name, item in c.stateful().items() if item.scope != "model"}
        weights = {k: v.clone() for k, v in c.actor.export_hf_state_dict().items()}
        return metrics, c.actor.step_count - before, state, weights


def test_two_passes_double_the_optimizer_steps_and_keep_the_first_pass_signal(tmp_path):
    """epochs_per_batch=2: twice the optimizer steps; the second pass's ratios differ from 1; Prompt-GDRO
    learns from the first pass's surrogate, so its scores equal those of a single-pass run."""
    common = ["trainer.minibatches_per_step=2", "algorithm.advantage_weighting=prompt_gdro"]
    (one,), steps_one, state_one, w_one = _steps(tmp_path / "one", common)
    (two,), steps_two, state_two, w_two = _steps(tmp_path / "two", [*common, "trainer.epochs_per_batch=2"])
    assert (steps_one, steps_two) == (2, 4)
    assert (one["actor/optimizer_steps"], two["actor/optimizer_steps"]) == (2.0, 4.0)
    assert "actor/ratio_var/pass1" not in one
    # Pass 0's first mini-batch is on-policy (ratio 1); its second and all of pass 1 train on moved weights.
    assert two["actor/ratio_var/pass1"] > two["actor/ratio_var/pass0"] > 0
    assert two["actor/ratio_var/pass1"] > 1e-6
    # The same rollouts (same seeds and weights) and the same first pass: identical controller learning.
    assert torch.equal(state_one["prompt_gdro"]["scores"], state_two["prompt_gdro"]["scores"])
    assert one["train/reward_mean"] == two["train/reward_mean"]
    # ...but the policy moved further.
    assert any(not torch.equal(w_one[k], w_two[k]) for k in w_one)


def test_each_pass_draws_its_own_minibatches(tmp_path):
    """The passes shuffle the rows anew (a fresh seeded permutation each, pass 0 the single-pass one)."""
    with Trainer(compose(overrides=[*TINY_OVERLONG, "trainer.minibatches_per_step=2", "trainer.epochs_per_batch=3",
                                    f"run.output_dir={tmp_path}"])) as trainer:
        step = trainer.rl_step
        trainer._push_weights()
        step(0)
        rows = step.last.rows
        a = [step._minibatch_assignment(rows.num_rows, rows, 0, e) for e in range(3)]
        again = [step._minibatch_assignment(rows.num_rows, rows, 0, e) for e in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, again))  # deterministic
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    for x in a:  # balanced: 16 rows into 2 mini-batches of 8
        assert torch.bincount(x, minlength=2).tolist() == [8, 8]


def test_informative_token_mean_scales_the_loss_by_the_informative_share(tmp_path):
    """The same rollouts: informative-token-mean's loss = token-mean's / (informative tokens / tokens);
    seq-mean-token-mean trains too (a different loss, finite)."""
    (tm,), _, _, _ = _steps(tmp_path / "tm", [])
    (inf,), _, _, _ = _steps(tmp_path / "inf", ["algorithm.policy_loss.loss_agg_mode=informative-token-mean"])
    (seq,), steps, _, _ = _steps(tmp_path / "seq", ["algorithm.policy_loss.loss_agg_mode=seq-mean-token-mean"])
    assert tm["train/reward_mean"] == inf["train/reward_mean"] == seq["train/reward_mean"]
    share = inf["actor/informative_token_share"]
    assert tm["actor/informative_token_share"] == share and 0.0 < share <= 1.0
    assert inf["actor/loss"] == pytest.approx(tm["actor/loss"] / share, rel=1e-5, abs=1e-7)
    assert inf["actor/optimizer_steps"] == 1.0 and inf["actor/grad_norm"] > 0
    assert steps == 1 and math.isfinite(seq["actor/loss"]) and seq["actor/grad_norm"] > 0


def test_informative_token_mean_skips_a_step_without_informative_tokens(tmp_path):
    """Random weights, 1/0 rewards: every group is all wrong, every advantage 0. token-mean still takes
    its (zero-gradient) optimizer step; informative-token-mean takes none, and the controllers still get
    their signal (0 for each row)."""
    no_shaping = ["reward.overlong.enabled=false", "algorithm.advantage_weighting=prompt_gdro"]
    (tm,), steps_tm, _, _ = _steps(tmp_path / "tm", no_shaping)
    assert tm["train/reward_mean"] == 0.0 and steps_tm == 1
    agg = "algorithm.policy_loss.loss_agg_mode=informative-token-mean"
    (inf,), steps_inf, state, _ = _steps(tmp_path / "inf", [*no_shaping, agg])
    assert steps_inf == 0 and inf["actor/optimizer_steps"] == 0.0 and "actor/loss" not in inf
    assert state["prompt_gdro"]["num_updates"] == 1


def test_replay_with_the_clipped_loss_reports_fresh_and_replayed_rows(tmp_path):
    """The control run of R2VPO's replay: the clipped loss trains on replayed groups, and its clip metrics
    come per kind of row."""
    metrics, steps, state, _ = _steps(tmp_path, ["algorithm.replay.ratio=1.0"], steps=2)
    assert steps == 2 and "dual" not in state and len(state["replay"]["groups"]) > 0
    first, second = metrics
    assert first["train/replayed_rows"] == 0 and second["train/replayed_rows"] == 16
    assert second["actor/behaviour_pass"] == 1.0  # replayed rows need their generation-time log-probs
    for kind in ("fresh", "replayed"):
        for key in ("actor/clip_frac", "actor/clipped_grad_share", "actor/ratio_var", "actor/would_clip_grad_share"):
            assert math.isfinite(second[f"{key}_{kind}"]), (key, kind)
    # Replayed rows come from the weights before the last update: their ratios are not 1, the fresh ones' are.
    assert second["actor/ratio_var_replayed"] > 1e-6 > second["actor/ratio_var_fresh"]
    assert second["actor/clipped_grad_share"] == pytest.approx(second["actor/would_clip_grad_share"])
