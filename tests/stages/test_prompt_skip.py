"""The ``skip_zero_variance`` prompt scheduler as a stage: built by name, walks the uniform epochs,
skips predicted zero-variance prompts, reports its diagnostics, checkpoints and resumes exactly."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.stats import PromptStatsStore, group_outcomes
from nemo_gdro.registries import PROMPT_SCHEDULERS
from nemo_gdro.stages import AlgorithmSetup, StageContext, StepFeedback, build_stages
from nemo_gdro.stages.prompt import UniformPrompts
from nemo_gdro.stages.prompt_skip import ZeroVarianceSkipPrompts
from nemo_gdro.trainer.config import compose

N, P, N_BAR = 40, 8, 4
KEYS = {"skipped", "explored", "precision", "fallback", "predicted_zero_share", "explore_easy", "explore_hard"}


def build(scheduler="skip_zero_variance", seed=3, **skip):
    section = OmegaConf.to_container(compose().algorithm, resolve=True)
    section["prompt_scheduler"] = scheduler
    section["prompt_skip"].update(skip)
    setup = AlgorithmSetup.from_dict(section, n_bar=N_BAR)
    store = PromptStatsStore(N, setup.stats)
    classifier = DifficultyClassifier(setup.difficulty, store)
    return build_stages(StageContext(setup, store, classifier, N, seed=seed)), store, classifier


def step(stages, store, classifier, g, pass_rate):
    """One step through the stage protocol with Bernoulli(pass_rate[id]) rewards; returns (draw, diagnostics)."""
    draw = stages.prompts.draw(P)
    bins = classifier.classify(draw.ids)
    alloc = stages.rollouts.allocate(draw, bins)
    gi = torch.repeat_interleave(torch.arange(P), alloc.counts)
    rewards = (torch.rand(gi.numel(), generator=g) < pass_rate[draw.ids][gi]).float()
    store.observe(draw.ids, *group_outcomes(rewards, gi, P))
    feedback = StepFeedback(draw, bins, alloc, bins[gi], gi, rewards, (1.0 - rewards).double(), None)
    for obs in stages.observers:
        obs.observe(feedback)
    diagnostics = {}
    for obs in stages.observers:
        diagnostics.update(obs.diagnostics(feedback))
    return draw, diagnostics


#: Prompts 0-19 are never solved (always zero-variance), 20-39 half the time (rarely zero-variance at n=4).
PASS_RATE = torch.cat([torch.zeros(N // 2), torch.full((N // 2,), 0.5)])


def test_registered_built_by_name_and_checkpointed_as_prompt_skip():
    assert "skip_zero_variance" in PROMPT_SCHEDULERS.names()
    assert PROMPT_SCHEDULERS.get("skip_zero_variance") is ZeroVarianceSkipPrompts
    stages, *_ = build()
    assert isinstance(stages.prompts, ZeroVarianceSkipPrompts) and set(stages.stateful()) == {"prompt_skip"}
    assert stages.prompts in stages.observers
    assert stages.prompts.response_weights(stages.prompts.draw(P), torch.zeros(P * N_BAR, dtype=torch.int64)) is None


def test_without_history_it_draws_what_uniform_draws():
    skip, *_ = build()
    uniform = UniformPrompts(N, seed=3)
    for _ in range(N // P + 2):  # past an epoch boundary: still nothing observed, nothing skipped
        a, b = skip.prompts.draw(P), uniform.draw(P)
        assert torch.equal(a.ids, b.ids) and a.new_epoch == b.new_epoch


def test_skips_the_never_solved_prompts_after_the_first_epoch():
    g = torch.Generator().manual_seed(0)
    stages, store, classifier = build(explore=0.1, adapt=False)
    drawn, diags = [], []
    for _ in range(4 * N // P):  # four epochs
        draw, d = step(stages, store, classifier, g, PASS_RATE)
        drawn.append(draw.ids)
        diags.append(d)
    assert all({f"prompt_skip/{k}" for k in KEYS} <= set(d) for d in diags)
    first, later = torch.cat(drawn[: N // P]), torch.cat(drawn[N // P :])
    assert float((first < N // 2).double().mean()) == 0.5  # epoch 1 is the uniform permutation
    assert float((later < N // 2).double().mean()) < 0.3  # then the never-solved half is mostly skipped
    assert sum(d["prompt_skip/skipped"] for d in diags[N // P :]) > 0
    assert all(d["prompt_skip/skipped"] == 0 for d in diags[: N // P - 1])
    # After an epoch every never-solved prompt is predicted zero-variance (and few others).
    assert 0.5 <= diags[N // P]["prompt_skip/predicted_zero_share"] <= 0.8
    precisions = [d["prompt_skip/precision"] for d in diags if not math.isnan(d["prompt_skip/precision"])]
    assert precisions and all(0.0 <= x <= 1.0 for x in precisions)
    for d in diags:  # explored is NaN-free and precision is NaN exactly when nothing was explored
        assert math.isnan(d["prompt_skip/precision"]) == (d["prompt_skip/explored"] == 0)


def test_every_prompt_zero_variance_falls_back_and_still_draws_p():
    g = torch.Generator().manual_seed(0)
    stages, store, classifier = build(explore=0.0, adapt=False)
    never = torch.zeros(N)
    for _ in range(N // P):
        step(stages, store, classifier, g, never)
    draw, d = step(stages, store, classifier, g, never)
    assert draw.ids.numel() == P and d["prompt_skip/fallback"] == 1.0
    assert d["prompt_skip/skipped"] == N and d["prompt_skip/predicted_zero_share"] == 1.0


def test_adapt_follows_the_zero_variance_share_from_the_second_epoch():
    g = torch.Generator().manual_seed(0)
    stages, store, classifier = build()  # defaults: adapt, p_e 0.5, target 0.25
    ps = []
    for _ in range(3 * N // P):
        _, d = step(stages, store, classifier, g, torch.zeros(N))  # every group hard zero-variance
        ps.append((d["prompt_skip/explore_easy"], d["prompt_skip/explore_hard"]))
    assert ps[N // P - 2] == (0.5, 0.5)  # first epoch: no adaptation
    easy, hard = ps[-1]
    assert hard < 0.5 < easy  # too many hard zero-variance groups: explore them less; no easy ones: more


@pytest.mark.parametrize("steps_before", [3, 7])
def test_state_round_trip_resumes_the_same_draws(steps_before):
    g = torch.Generator().manual_seed(1)
    a, store_a, cls_a = build(explore=0.3)
    for _ in range(steps_before):
        step(a, store_a, cls_a, g, PASS_RATE)
    state = a.prompts.state_dict()
    b, *_ = build(seed=99, explore=0.3)
    with pytest.raises(ValueError, match="seed"):
        b.prompts.load_state_dict(state)  # the sampler belongs to another seed
    b, *_ = build(explore=0.3)
    b.prompts.load_state_dict(state)
    g_a, g_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(6):
        da = a.prompts.draw(P)
        db = b.prompts.draw(P)
        assert torch.equal(da.ids, db.ids) and da.new_epoch == db.new_epoch
        for stages, g in ((a, g_a), (b, g_b)):
            gi = torch.arange(P).repeat_interleave(N_BAR)
            rewards = (torch.rand(gi.numel(), generator=g) < PASS_RATE[da.ids][gi]).float()
            stages.prompts.controller.observe(da.ids, gi, rewards, adapt=True)
    assert torch.equal(a.prompts.controller.streak, b.prompts.controller.streak)
