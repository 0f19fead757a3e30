"""GRESO-style skip controller: zero-variance detection, the skip rule, exploration, fallback, adaptation, state."""

import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from nemo_gdro.algorithms.configs import PromptSkipConfig
from nemo_gdro.algorithms.zero_variance_skip import (
    ZeroVarianceSkip,
    explored_precision,
    zero_variance_groups,
)
from nemo_gdro.stages.setup import AlgorithmSetup
from nemo_gdro.trainer.config import compose
from nemo_gdro.typed_config import ConfigError

FIXED = dict(adapt=False)  # a constant p_e: the rule alone


def walker(order):
    """A source over a fixed id order (as the epoch sampler hands them out), counting what it gave."""
    state = {"pos": 0}

    def source(k):
        out = order[state["pos"] : state["pos"] + k]
        state["pos"] += k
        assert out.numel() == k, "the walk asked for more ids than the order holds"
        return out

    return source, state


def feed(ctl, ids, zero, easy=None, n=4, adapt=True):
    """One step's outcome: prompt i's group is all-equal iff zero[i] (all 1 if easy else all 0), else mixed."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    zero = torch.as_tensor(zero, dtype=torch.bool)
    easy = torch.zeros_like(zero) if easy is None else torch.as_tensor(easy, dtype=torch.bool)
    gi = torch.arange(ids.numel()).repeat_interleave(n)
    rewards = torch.where(easy[gi], 1.0, 0.0)
    mixed = ~zero[gi] & (torch.arange(gi.numel()) % n == 0)
    rewards = torch.where(mixed, 1.0 - rewards, rewards)
    return ctl.observe(ids, gi, rewards.float(), adapt=adapt)


# ------------------------------------------------------------------ zero-variance detection
def test_zero_variance_groups_exact_equality_one_row_groups_and_easy():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.3])
    gi = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3, 4])
    zero, easy = zero_variance_groups(rewards, gi, 6, midpoint=0.5)
    # group 0 all 1 (easy), 1 all 0 (hard), 2 one row, 3 three equal non-dyadic values, 4 one row, 5 empty
    assert zero.tolist() == [True, True, True, True, True, False]
    assert easy.tolist() == [True, False, True, False, False, False]
    zero, _ = zero_variance_groups(torch.tensor([0.0, 1.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1]), 2, 0.5)
    assert zero.tolist() == [False, True]


def test_explored_precision():
    assert explored_precision(torch.tensor([True, True, False]), torch.tensor([True, False, False])) == 0.5
    assert math.isnan(explored_precision(torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)))


# ------------------------------------------------------------------ the rule
def test_live_state_zero_variance_feedback_grows_the_streak_and_an_informative_visit_resets_it():
    ctl = ZeroVarianceSkip(PromptSkipConfig(**FIXED), 6, seed=0)
    before = ctl.state_dict()
    feed(ctl, [0, 1, 2], [True, True, False], easy=[True, False, False])
    assert ctl.streak.tolist() == [1, 1, 0, 0, 0, 0] and ctl.easy.tolist()[:3] == [True, False, False]
    assert not torch.equal(before["streak"], ctl.state_dict()["streak"])
    feed(ctl, [0, 1, 2], [True, False, True])
    assert ctl.streak.tolist()[:3] == [2, 0, 1] and ctl.easy.tolist()[:3] == [False, False, False]
    assert ctl.streak.dtype == torch.int16 and ctl.num_updates == 2
    assert ctl.candidates(torch.arange(6)).tolist() == [True, False, True, False, False, False]
    assert ctl.predicted_zero_share() == pytest.approx(2 / 6)


def test_a_repeated_id_is_zero_variance_only_if_all_its_groups_were():
    ctl = ZeroVarianceSkip(PromptSkipConfig(**FIXED), 4, seed=0)
    feed(ctl, [3, 3, 2, 2], [True, False, True, True])
    assert ctl.streak.tolist() == [0, 0, 1, 0]


def test_the_streak_saturates_instead_of_overflowing():
    ctl = ZeroVarianceSkip(PromptSkipConfig(**FIXED), 2, seed=0)
    ctl.streak[0] = 32767
    feed(ctl, [0], [True])
    assert int(ctl.streak[0]) == 32767


@pytest.mark.parametrize("explore, kept", [(0.0, 0), (1.0, 5)])
def test_explore_zero_skips_every_candidate_and_one_keeps_them_all(explore, kept):
    ctl = ZeroVarianceSkip(PromptSkipConfig(explore=explore, **FIXED), 10, seed=1)
    feed(ctl, [0, 1, 2, 3, 4], [True] * 5)  # prompts 0-4 predicted zero-variance, 5-9 unseen
    source, pos = walker(torch.arange(10))
    sel = ctl.select(source, 5)
    assert sel.skipped == 5 - kept and int(sel.explored.sum()) == kept and not sel.fallback
    assert sel.ids.tolist() == ([0, 1, 2, 3, 4] if kept else [5, 6, 7, 8, 9])
    assert pos["pos"] == sel.examined == 10 - kept  # every examined id consumed, none beyond


def test_min_streak_and_the_power_rule():
    ctl = ZeroVarianceSkip(PromptSkipConfig(min_streak=2, explore=0.3, **FIXED), 4, seed=0)
    ids = torch.arange(4)
    feed(ctl, [0, 1, 2], [True, True, True])
    assert not ctl.candidates(ids).any() and torch.equal(ctl.keep_probability(ids), torch.ones(4, dtype=torch.float64))
    feed(ctl, [0, 1], [True, True])
    feed(ctl, [0], [True])
    # streaks 3, 2, 1, 0 -> keep with 0.3^2, 0.3^1, 1, 1
    assert ctl.keep_probability(ids).tolist() == pytest.approx([0.09, 0.3, 1.0, 1.0])


def test_easy_and_hard_candidates_use_their_own_explore_probability():
    ctl = ZeroVarianceSkip(PromptSkipConfig(**FIXED), 2, seed=0)
    feed(ctl, [0, 1], [True, True], easy=[True, False])
    ctl.explore_easy, ctl.explore_hard = 0.2, 0.7
    assert ctl.keep_probability(torch.tensor([0, 1])).tolist() == pytest.approx([0.2, 0.7])


@pytest.mark.parametrize("streak, rate", [(1, 0.1), (2, 0.01)])
def test_exploration_rate_matches_explore_to_the_streak(streak, rate):
    n = 20_000
    ctl = ZeroVarianceSkip(PromptSkipConfig(explore=0.1, **FIXED), n, seed=5)
    ctl.streak[: n // 2] = streak  # half the pool predicted zero-variance
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    source, _ = walker(order)
    sel = ctl.select(source, 6000)
    examined = order[: sel.examined]
    candidates = int((examined < n // 2).sum())
    explored = int(sel.explored.sum())
    assert explored == int((sel.ids < n // 2).sum())
    sd = math.sqrt(candidates * rate * (1 - rate))
    assert abs(explored - candidates * rate) < 5 * sd, (explored, candidates)
    assert sel.skipped == candidates - explored


def test_whole_pool_predicted_zero_variance_falls_back_to_drawing_without_skipping():
    n, p = 12, 5
    ctl = ZeroVarianceSkip(PromptSkipConfig(explore=0.0, **FIXED), n, seed=0)
    ctl.streak[:] = 3
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(e)) for e in range(3)])
    source, pos = walker(order)
    sel = ctl.select(source, p)
    assert sel.fallback and sel.examined == n and sel.skipped == n
    assert sel.ids.tolist() == order[n : n + p].tolist() and not sel.explored.any()
    assert pos["pos"] == n + p


def test_the_walk_never_examines_more_than_the_pool_before_falling_back():
    ctl = ZeroVarianceSkip(PromptSkipConfig(explore=0.5, **FIXED), 8, seed=2)
    ctl.streak[:] = 20  # keep probability 0.5^20: the pool is skipped almost surely
    source, pos = walker(torch.arange(8).repeat(3))
    sel = ctl.select(source, 3)
    assert sel.examined <= 8 and sel.ids.numel() == 3 and pos["pos"] == sel.examined + (3 if sel.fallback else 0)


# ------------------------------------------------------------------ adaptation
def test_adapt_moves_each_explore_probability_towards_the_target_within_bounds():
    cfg = PromptSkipConfig(explore=0.5, adapt=True, target_zero_variance=0.3, adapt_step=0.1, explore_min=0.25,
                           explore_max=0.7)
    ctl = ZeroVarianceSkip(cfg, 10, seed=0)
    ids = list(range(10))
    # 5 of 10 hard zero-variance (0.5 >= 0.2 target): hard p falls; no easy ones (0 < 0.1): easy p rises.
    feed(ctl, ids, [True] * 5 + [False] * 5)
    assert (ctl.explore_easy, ctl.explore_hard) == pytest.approx((0.6, 0.4))
    for _ in range(5):
        feed(ctl, ids, [True] * 5 + [False] * 5)
    assert (ctl.explore_easy, ctl.explore_hard) == pytest.approx((0.7, 0.25))  # clamped
    # all easy: easy share 1 >= 0.1 -> easy p falls; hard share 0 < 0.2 -> hard p rises
    feed(ctl, ids, [True] * 10, easy=[True] * 10)
    assert (ctl.explore_easy, ctl.explore_hard) == pytest.approx((0.6, 0.35))


def test_no_adaptation_when_off_or_not_asked_this_step():
    off = ZeroVarianceSkip(PromptSkipConfig(explore=0.5, adapt=False), 4, seed=0)
    feed(off, [0, 1, 2, 3], [True] * 4)
    on = ZeroVarianceSkip(PromptSkipConfig(explore=0.5), 4, seed=0)
    feed(on, [0, 1, 2, 3], [True] * 4, adapt=False)
    for ctl in (off, on):
        assert (ctl.explore_easy, ctl.explore_hard) == (0.5, 0.5)
        assert ctl.streak.tolist() == [1, 1, 1, 1]  # the table learns either way


# ------------------------------------------------------------------ state
def test_state_round_trip_repeats_the_decisions():
    n = 50
    a = ZeroVarianceSkip(PromptSkipConfig(explore=0.4), n, seed=9)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(40)])
    source, pos = walker(order)
    for _ in range(6):
        sel = a.select(source, 10)
        feed(a, sel.ids, torch.rand(10, generator=g) < 0.6, easy=torch.rand(10, generator=g) < 0.5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ZeroVarianceSkip(PromptSkipConfig(explore=0.4), n, seed=123)
    b.load_state_dict(torch.load(buf, weights_only=True))
    start = pos["pos"]
    sel_a = a.select(source, 10)
    source_b, _ = walker(order[start:])
    sel_b = b.select(source_b, 10)
    assert torch.equal(sel_a.ids, sel_b.ids) and torch.equal(sel_a.explored, sel_b.explored)
    assert sel_a.skipped == sel_b.skipped and (a.explore_easy, a.explore_hard) == (b.explore_easy, b.explore_hard)


def test_load_refuses_another_pool_and_missing_keys():
    a = ZeroVarianceSkip(PromptSkipConfig(), 5, seed=0)
    with pytest.raises(ValueError, match="5 prompts, this run has 6"):
        ZeroVarianceSkip(PromptSkipConfig(), 6, seed=0).load_state_dict(a.state_dict())
    state = a.state_dict()
    del state["rng"]
    with pytest.raises(KeyError, match="rng"):
        a.load_state_dict(state)


# ------------------------------------------------------------------ config
def _algorithm(**skip):
    section = OmegaConf.to_container(compose().algorithm, resolve=True)
    section["prompt_skip"].update(skip)
    return section


def test_yaml_defaults_are_the_dataclass_defaults_and_overrides_apply():
    assert AlgorithmSetup.from_dict(_algorithm(), n_bar=4).prompt_skip == PromptSkipConfig()
    cfg = AlgorithmSetup.from_dict(_algorithm(min_streak=2, explore=0.1, adapt=False, target_zero_variance=0.5,
                                              adapt_step=0.02, explore_min=0.0, explore_max=1.0), n_bar=4).prompt_skip
    assert cfg == PromptSkipConfig(2, 0.1, False, 0.5, 0.02, 0.0, 1.0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("min_streak", 0, "prompt_skip.min_streak must be an integer in"),
        ("explore", 1.5, "prompt_skip.explore must be in [0, 1]"),
        ("target_zero_variance", -0.1, "prompt_skip.target_zero_variance must be in [0, 1]"),
        ("adapt_step", 2.0, "prompt_skip.adapt_step must be in [0, 1]"),
        ("explore_min", 0.96, "prompt_skip.explore_min must be <= prompt_skip.explore_max"),
        ("explore", 0.99, "prompt_skip.explore must lie in [explore_min, explore_max]"),
        ("adapt", "yes", "algorithm.prompt_skip.adapt"),
        ("nope", 1, "algorithm.prompt_skip.nope"),
    ],
)
def test_invalid_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        AlgorithmSetup.from_dict(_algorithm(**{key: value}), n_bar=4)
    assert message in str(err.value)


def test_explore_outside_the_bounds_is_fine_without_adapt():
    assert PromptSkipConfig(explore=0.0, adapt=False).explore == 0.0
