"""The behaviour log-probs: a separate pass only where the training forward cannot supply them."""

import pytest
import torch

from nemo_gdro.trainer.behaviour import BehaviourPlan, behaviour_plan
from nemo_gdro.trainer.config import compose
from nemo_gdro.trainer.loop import Trainer
from tests.trainer.tiny_run import TINY_OVERLONG



@pytest.mark.parametrize(
    "minibatches, replays, tis, current, epochs, source",
    [
        (1, False, False, False, 1, "forward"),
        (2, False, False, False, 1, "separate"),  # mini-batch 2 is trained on updated weights
        (1, True, False, False, 1, "separate"),  # replayed rows come from older weights
        (2, False, False, True, 1, "separate"),
        (1, False, False, True, 1, "current"),  # the stages' current-policy pass has them
        (1, False, True, False, 1, "separate"),  # TIS needs them before the forward
        (1, False, True, True, 1, "current"),
        (1, True, True, True, 1, "separate"),
        (1, False, False, False, 2, "separate"),  # pass 2 is trained on updated weights; pass 1 keeps no logp
        (1, False, False, True, 3, "current"),  # pass 1's current-policy pass has them; later passes reuse them
        (1, False, True, False, 2, "separate"),
        (2, False, False, True, 2, "separate"),
        (1, True, False, True, 2, "separate"),
    ],
)
def test_the_rule(minibatches, replays, tis, current, epochs, source):
    plan = behaviour_plan(
        minibatches_per_step=minibatches, replays=replays, tis=tis, needs_current_policy=current, epochs_per_batch=epochs
    )
    assert plan.source == source and plan.separate_pass == (source == "separate") and plan.reason
    if epochs > 1 and source != "forward" and minibatches == 1 and not replays and not (tis and not current):
        assert "epochs_per_batch" in plan.reason


def _one_step(out, overrides, plan: BehaviourPlan | None = None):
    """One RL step from the same initial state; returns (metrics, updated HF weights, token-stats passes)."""
    with Trainer(compose(overrides=[*TINY_OVERLONG, *overrides, f"run.output_dir={out}"])) as trainer:
        c = trainer.components
        if plan is not None:
            trainer.rl_step.behaviour = plan
        calls = []
        compute = c.actor.compute_token_stats

        def counted(*args, **kwargs):
            calls.append(args[0].shape[0])
            return compute(*args, **kwargs)

        trainer._enter_rl_phase()  # the RL optimizer; the KL reference frozen from the initial weights
        c.actor.compute_token_stats = counted
        trainer._push_weights()
        metrics = trainer.rl_step(0)
        weights = {k: v.clone() for k, v in c.actor.export_hf_state_dict().items()}
        source = trainer.rl_step.behaviour.source
    return metrics, weights, calls, source


@pytest.mark.parametrize(
    "overrides, source",
    [
        ([], "forward"),
        (["algorithm.loss=r2vpo", "algorithm.policy_loss.kl_coef=0.1"], "forward"),
        (["algorithm.token_modulation=dynamo", "rollout.tis_cap=1.5"], "current"),
    ],
    ids=["clipped", "r2vpo+kl", "dynamo+tis"],
)
def test_skipping_the_pass_changes_nothing(tmp_path, overrides, source):
    """Loss, gradient norm, updated weights and the engine-vs-actor mismatch equal the separate pass's."""
    skip, w_skip, calls_skip, got = _one_step(tmp_path / "skip", overrides)
    assert got == source
    ref, w_ref, calls_ref, _ = _one_step(tmp_path / "ref", overrides, BehaviourPlan("separate", "test"))
    assert skip["actor/behaviour_pass"] == 0.0 and ref["actor/behaviour_pass"] == 1.0
    # The separate pass is one forward over the step's 16 rows; the skip saves exactly that one.
    assert calls_ref[0] == 16 and len(calls_skip) == len(calls_ref) - 1
    for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/kl", "rollout/engine_token_mult_prob_error",
                "rollout/engine_mean_abs_logp_diff", "rollout/engine_max_abs_logp_diff",
                "rollout/engine_mean_logp_diff", *[k for k in ref if k.startswith(("r2vpo/", "dynamo/"))]):
        assert skip[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert w_skip.keys() == w_ref.keys()
    moved = 0
    for name in w_ref:
        torch.testing.assert_close(w_skip[name], w_ref[name], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(w_ref[name], _initial(tmp_path, name)))
    assert moved > 0  # the step did update the weights


_INITIAL: dict[str, torch.Tensor] = {}


def _initial(tmp_path, name):
    if not _INITIAL:
        with Trainer(compose(overrides=[*TINY_OVERLONG, f"run.output_dir={tmp_path / 'init'}"])) as trainer:
            _INITIAL.update({k: v.clone() for k, v in trainer.components.actor.export_hf_state_dict().items()})
    return _INITIAL[name]


def test_two_minibatches_keep_the_separate_pass(tmp_path):
    metrics, _, calls, source = _one_step(tmp_path, ["trainer.minibatches_per_step=2"])
    assert source == "separate" and metrics["actor/behaviour_pass"] == 1.0 and calls == [16]


@pytest.mark.parametrize("overrides", [["algorithm.token_modulation=dynamo"], ["algorithm.loss=r2vpo",
                                       "algorithm.r2vpo.center=batch_mean", "rollout.tis_cap=1.5"]],
                         ids=["dynamo", "r2vpo_batch_mean+tis"])
def test_two_passes_reuse_the_first_pass_current_policy_log_probs(tmp_path, overrides):
    """epochs_per_batch=2 with a current-policy pass: the first pass stores its log-probs as the behaviour
    log-probs, the second pass (on updated weights) reads them; the same as a separate pass, without it."""
    two = [*overrides, "trainer.epochs_per_batch=2"]
    skip, w_skip, calls_skip, got = _one_step(tmp_path / "skip", two)
    assert got == "current"
    ref, w_ref, calls_ref, _ = _one_step(tmp_path / "ref", two, BehaviourPlan("separate", "test"))
    assert skip["actor/behaviour_pass"] == 0.0 and skip["actor/optimizer_steps"] == 2.0
    # The separate pass is one forward over the 16 rows; each pass runs its current-policy pass either way.
    assert calls_ref[0] == 16 and len(calls_skip) == len(calls_ref) - 1 == 2
    # The second pass trains on moved weights against the generating ones: its ratios are not 1.
    assert skip["actor/ratio_var/pass0"] < 1e-10 < skip["actor/ratio_var/pass1"]
    for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/ratio_var/pass1", "actor/would_clip_grad_share",
                *[k for k in ref if k.startswith(("r2vpo/", "dynamo/"))]):
        assert skip[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    for name in w_ref:
        torch.testing.assert_close(w_skip[name], w_ref[name], rtol=1e-5, atol=1e-6)
