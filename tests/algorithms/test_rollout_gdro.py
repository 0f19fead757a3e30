"""Tests of Rollout-GDRO (gdro.md §3, §4, §6; grpo_base.md §7 invariants 3, 4, 5, 7).

Everything runs on real values: a real ``PromptStatsStore`` fed through
``observe``, real plans, real observations. Arm scores are set through the
public ``load_state_dict`` where a test needs a known starting point.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.rollout_gdro import (
    RolloutGDRO,
    RolloutGDROConfig,
    RolloutPlan,
    arm_log_probs,
    solve_arm_plan,
)
from nemo_gdro.algorithms.stats import PromptStatsStore


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def make_store(rollouts: list[int], correct: list[int]) -> PromptStatsStore:
    """Store over prompt ids 0..len-1 with cumulative counters G, K (G = 0: unseen)."""
    store = PromptStatsStore(max(len(rollouts), 1))
    ids = [i for i, g in enumerate(rollouts) if g > 0]
    if ids:
        store.observe(
            torch.tensor(ids),
            torch.tensor([rollouts[i] for i in ids]),
            torch.tensor([correct[i] for i in ids]),
        )
    return store


def expand(plan: RolloutPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-level ``(bins [R], group_index [R])`` for a plan's rollouts."""
    group_index = torch.repeat_interleave(torch.arange(plan.counts.numel()), plan.counts)
    return plan.bins[group_index], group_index


def bandit_with_scores(scores: torch.Tensor, mu: float = 0.0, **cfg) -> RolloutGDRO:
    config = RolloutGDROConfig(mode="bandit", proxy="loss_var", **cfg)
    ctl = RolloutGDRO(config, scores.shape[0], store=None)
    state = ctl.state_dict()
    state["scores"] = scores.to(torch.float64)
    state["mu"] = mu
    ctl.load_state_dict(state)
    return ctl


def variance_objective(plan: RolloutPlan, counts: torch.Tensor) -> float:
    """``sum_i v_{b(i)} / n_i = sum_b c_b v_b / n_b`` (per-prompt form)."""
    return float((plan.variance[plan.bins] / counts.to(torch.float64)).sum())


# --------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------- #
def test_config_defaults_match_spec() -> None:
    c = RolloutGDROConfig()
    assert (c.mode, c.n_min, c.n_max, c.n_bar, c.proxy) == ("sqrt", 2, 12, 4, "bernoulli")
    assert (c.v_floor, c.unseen_success, c.loss_var_beta) == (1e-3, 0.5, 0.12)
    assert (c.eta, c.gamma, c.score_decay, c.sign) == (0.65, 0.01, 0.4, "utility")
    assert (c.alpha_mu, c.mu_max, c.mu_init) == (0.05, 10.0, 0.0)
    assert c.num_arms == 11 and c.arms.tolist() == list(range(2, 13))


@pytest.mark.parametrize(
    "key, value",
    [
        ("mode", "greedy"),
        ("n_min", 0),
        ("n_min", 2.0),
        ("n_max", 1),
        ("n_bar", 13),
        ("n_bar", 1),
        ("n_bar", 4.5),
        ("n_bar", True),
        ("proxy", "entropy"),
        ("v_floor", 0.0),
        ("unseen_success", 1.5),
        ("loss_var_beta", 0.0),
        ("eta", -1.0),
        ("gamma", 1.2),
        ("score_decay", 0.0),
        ("sign", "minus"),
        ("alpha_mu", -0.1),
        ("mu_max", 0.0),
        ("mu_init", 11.0),
        ("mu_init", float("nan")),
    ],
)
def test_config_validation_names_the_key(key: str, value) -> None:
    with pytest.raises(ValueError, match=rf"rollout_gdro\.{key} "):
        RolloutGDROConfig(**{key: value})


def test_bernoulli_proxy_needs_a_store() -> None:
    with pytest.raises(ValueError, match="store"):
        RolloutGDRO(RolloutGDROConfig(), 3, store=None)


# --------------------------------------------------------------------------- #
# sqrt mode: square-root law
# --------------------------------------------------------------------------- #
def test_sqrt_law_matches_closed_form_when_no_bound_is_active() -> None:
    # Per-rollout success rates p = K / G from the store's cumulative counters.
    #            bin 0 (p .5,.4,.6)  bin 1 (p .2,.2) bin 2 (p .1 x4)      bin 3 (p .3)
    rollouts = [10, 10, 10, 10, 5, 10, 10, 20, 10, 10]
    correct = [5, 4, 6, 2, 1, 1, 1, 2, 1, 3]
    bins = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    store = make_store(rollouts, correct)
    ctl = RolloutGDRO(RolloutGDROConfig(), num_bins=4, store=store)
    plan = ctl.allocate(torch.arange(10), bins)

    p = torch.tensor(correct, dtype=torch.float64) / torch.tensor(rollouts, dtype=torch.float64)
    v_prompt = p * (1 - p)
    v = torch.stack([v_prompt[bins == b].mean() for b in range(4)])
    share = torch.bincount(bins).to(torch.float64) / 10
    n_bar = 4
    closed = n_bar * v.sqrt() / (share * v.sqrt()).sum()
    assert bool(((closed > 2) & (closed < 12)).all()), "test needs every bin interior"
    torch.testing.assert_close(plan.variance, v, rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.continuous, closed, rtol=0, atol=1e-9)
    # n_b = sqrt(v_b / mu)  =>  mu = (sum_j share_j sqrt(v_j) / n_bar)^2.
    mu_closed = float(((share * v.sqrt()).sum() / n_bar) ** 2)
    assert plan.mu == pytest.approx(mu_closed, rel=1e-9, abs=0)
    torch.testing.assert_close(plan.continuous, (v / plan.mu).sqrt(), rtol=1e-9, atol=0)

    # Integer plan: exact budget, each prompt floor or ceil of its bin's n_b.
    assert int(plan.counts.sum()) == 10 * n_bar
    cont_i = plan.continuous[bins]
    assert bool(((plan.counts >= cont_i.floor()) & (plan.counts <= cont_i.ceil())).all())
    # And it beats uniform on the variance proxy sum_b c_b v_b / n_b.
    uniform = torch.full_like(plan.counts, n_bar)
    assert variance_objective(plan, plan.counts) < variance_objective(plan, uniform)


def test_sqrt_hand_example_lower_bound_active() -> None:
    # One prompt per bin: p = .5, .5 and 0 (v = .25, .25, floored 1e-3).
    store = make_store([10, 10, 10], [5, 5, 0])
    ctl = RolloutGDRO(RolloutGDROConfig(), num_bins=3, store=store)
    plan = ctl.allocate(torch.arange(3), torch.tensor([0, 1, 2]))
    # Unclipped: 12 * .5 / (.5 + .5 + .0316) = 5.82 ... 0.37 -> bin 2 clips at
    # n_min = 2; the other 10 split equally: 5, 5. Scale t = 5 / .5 = 10.
    assert plan.counts.tolist() == [5, 5, 2]
    torch.testing.assert_close(plan.continuous, torch.tensor([5.0, 5.0, 2.0], dtype=torch.float64))
    assert plan.mu == pytest.approx(0.01, rel=1e-9)
    d = ctl.diagnostics(plan)
    assert d["rollout_gdro/frac_at_n_min"] == pytest.approx(1 / 3)
    assert d["rollout_gdro/frac_at_n_max"] == 0.0
    assert d["rollout_gdro/budget_share/2"] == pytest.approx(2 / 12)


def test_sqrt_hand_example_upper_bound_active() -> None:
    # v = .25 for bin 0 and the floor 1e-3 for bins 1..3; n_max = 8, budget 16.
    store = make_store([10, 10, 10, 10], [5, 0, 10, 0])
    ctl = RolloutGDRO(RolloutGDROConfig(n_max=8), num_bins=4, store=store)
    plan = ctl.allocate(torch.arange(4), torch.tensor([0, 1, 2, 3]))
    # Bin 0 clips at 8; bins 1..3 share the other 8: 8/3 each -> two get 3, one 2.
    expected = torch.tensor([8.0, 8 / 3, 8 / 3, 8 / 3], dtype=torch.float64)
    torch.testing.assert_close(plan.continuous, expected, rtol=0, atol=1e-9)
    assert plan.counts[0] == 8
    assert sorted(plan.counts[1:].tolist()) == [2, 3, 3]
    # t sqrt(1e-3) = 8/3  =>  mu = 1 / t^2 = 1e-3 * 9 / 64.
    assert plan.mu == pytest.approx(1e-3 * 9 / 64, rel=1e-9)
    assert ctl.diagnostics(plan)["rollout_gdro/frac_at_n_max"] == pytest.approx(0.25)


def test_sqrt_unseen_prompts_count_as_p_half_and_store_is_only_read() -> None:
    store = make_store([0, 0, 10], [0, 0, 0])  # prompts 0, 1 unseen
    before = store.state_dict()
    ctl = RolloutGDRO(RolloutGDROConfig(), num_bins=2, store=store)
    plan = ctl.allocate(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]))
    assert plan.variance[0] == pytest.approx(0.25)
    assert plan.variance[1] == pytest.approx(1e-3)  # p = 0 -> floored
    after = store.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key


def test_all_prompts_at_n_max_when_budget_equals_upper_bound() -> None:
    store = make_store([10, 10], [5, 1])
    ctl = RolloutGDRO(RolloutGDROConfig(n_min=2, n_bar=4, n_max=4), num_bins=2, store=store)
    plan = ctl.allocate(torch.arange(2), torch.tensor([0, 1]))
    assert plan.counts.tolist() == [4, 4]
    assert plan.mu == 0.0


@st.composite
def sqrt_cases(draw):
    num_bins = draw(st.integers(1, 5))
    num_prompts = draw(st.integers(1, 20))
    n_min = draw(st.integers(1, 3))
    n_max = draw(st.integers(n_min, n_min + 10))
    n_bar = draw(st.integers(n_min, n_max))
    bins = draw(st.lists(st.integers(0, num_bins - 1), min_size=num_prompts, max_size=num_prompts))
    rollouts = draw(st.lists(st.integers(0, 20), min_size=num_prompts, max_size=num_prompts))
    correct = [draw(st.integers(0, g)) for g in rollouts]
    return num_bins, n_min, n_max, n_bar, bins, rollouts, correct


@given(sqrt_cases())
def test_sqrt_properties(case) -> None:
    num_bins, n_min, n_max, n_bar, bins_list, rollouts, correct = case
    store = make_store(rollouts, correct)
    cfg = RolloutGDROConfig(n_min=n_min, n_max=n_max, n_bar=n_bar)
    ctl = RolloutGDRO(cfg, num_bins=num_bins, store=store)
    bins = torch.tensor(bins_list)
    plan = ctl.allocate(torch.arange(len(bins_list)), bins)
    counts = plan.counts
    # Compute neutrality and bounds (no bin starved below n_min).
    assert counts.dtype == torch.int64
    assert int(counts.sum()) == len(bins_list) * n_bar
    assert bool(((counts >= n_min) & (counts <= n_max)).all())
    present = torch.bincount(bins, minlength=num_bins) > 0
    assert torch.equal(torch.isnan(plan.per_bin_n), ~present)
    assert bool((plan.per_bin_n[present] >= n_min).all())
    # Each prompt gets the floor or the ceil of its bin's continuous n_b.
    cont_i = plan.continuous[bins]
    assert bool(((counts >= torch.floor(cont_i - 1e-9)) & (counts <= torch.ceil(cont_i + 1e-9))).all())
    # Monotone in v: a higher-variance bin never gets fewer rollouts per prompt.
    for a, b in itertools.permutations(torch.nonzero(present).flatten().tolist(), 2):
        if plan.variance[a] > plan.variance[b] * (1 + 1e-6):
            assert plan.continuous[a] >= plan.continuous[b] - 1e-12
            assert int(counts[bins == a].min()) >= int(counts[bins == b].max())
    assert plan.mu >= 0.0


# --------------------------------------------------------------------------- #
# bandit mode: exact DP
# --------------------------------------------------------------------------- #
def brute_force(log_probs: torch.Tensor, bin_counts: list[int], n_min: int, n_bar: int, total: int):
    """Every feasible plan as ``(value, deviation, plan)``; values are summed in
    the same order as the DP so exact ties compare exactly."""
    num_arms = log_probs.shape[1]
    plans = []
    for ks in itertools.product(range(num_arms), repeat=len(bin_counts)):
        ns = [n_min + k for k in ks]
        if sum(c * n for c, n in zip(bin_counts, ns)) != total:
            continue
        value = 0.0
        for a, k in enumerate(ks):
            value = value + float(log_probs[a, k])
        dev = sum(c * (n - n_bar) ** 2 for c, n in zip(bin_counts, ns))
        plans.append((value, dev, ns))
    return plans


@st.composite
def dp_cases(draw):
    num_bins = draw(st.integers(1, 3))
    n_min = draw(st.integers(1, 3))
    n_max = draw(st.integers(n_min, n_min + 4))
    n_bar = draw(st.integers(n_min, n_max))
    num_arms = n_max - n_min + 1
    # A small value set makes exact ties (and so the tie-break) common.
    scores = draw(
        st.lists(
            st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.7]), min_size=num_arms, max_size=num_arms),
            min_size=num_bins,
            max_size=num_bins,
        )
    )
    bin_counts = draw(st.lists(st.integers(1, 4), min_size=num_bins, max_size=num_bins))
    return n_min, n_max, n_bar, torch.tensor(scores, dtype=torch.float64), bin_counts


@given(dp_cases())
def test_dp_equals_brute_force(case) -> None:
    n_min, n_max, n_bar, scores, bin_counts = case
    log_p = arm_log_probs(scores, eta=0.65, gamma=0.01)
    total = sum(bin_counts) * n_bar
    plan = solve_arm_plan(log_p, torch.tensor(bin_counts), n_min, n_bar, total).tolist()
    plans = brute_force(log_p, bin_counts, n_min, n_bar, total)
    assert plans, "the uniform plan is always feasible"
    best_value = max(v for v, _, _ in plans)
    best_dev = min(d for v, d, _ in plans if v == best_value)
    # The DP plan is feasible (infeasible plans are never chosen) ...
    assert sum(c * n for c, n in zip(bin_counts, plan)) == total
    assert all(n_min <= n <= n_max for n in plan)
    # ... optimal, and wins the tie-break (closest to uniform).
    mine = [p for p in plans if p[2] == plan]
    assert len(mine) == 1
    assert mine[0][0] == best_value
    assert mine[0][1] == best_dev
    winners = [p for v, d, p in plans if v == best_value and d == best_dev]
    if len(winners) == 1:
        assert plan == winners[0]


@pytest.mark.parametrize("seed", range(8))
def test_controller_plan_equals_brute_force_random_scores(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_bins = 3
    scores = torch.randn(num_bins, 11, generator=g, dtype=torch.float64) * 2
    ctl = bandit_with_scores(scores)
    bins = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    plan = ctl.allocate(torch.arange(7), bins)
    c = torch.bincount(bins).tolist()
    plans = brute_force(ctl.arm_log_probs(), c, 2, 4, 28)
    values = sorted((v for v, _, _ in plans), reverse=True)
    best = max(plans, key=lambda p: p[0])
    assert values[0] - values[1] > 1e-9, "random scores: the optimum is unique"
    assert plan.arms.tolist() == best[2]
    assert torch.equal(plan.counts, plan.arms[bins])
    assert int(plan.counts.sum()) == 28


def test_dp_picks_uniform_plan_when_scores_are_equal() -> None:
    ctl = RolloutGDRO(RolloutGDROConfig(mode="bandit", proxy="loss_var"), 4, store=None)
    plan = ctl.allocate(torch.arange(9), torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3]))
    assert plan.counts.tolist() == [4] * 9
    assert plan.continuous.tolist() == [4.0] * 4


def test_dp_never_picks_an_infeasible_high_probability_plan() -> None:
    # Arm n = 12 is by far the most likely in both bins, but 2 * 12 + 2 * 12 > 16.
    scores = torch.zeros(2, 11, dtype=torch.float64)
    scores[:, -1] = 20.0
    scores[0, 3] = 1.0  # n = 5 is the best feasible arm of bin 0
    ctl = bandit_with_scores(scores)
    plan = ctl.allocate(torch.arange(4), torch.tensor([0, 0, 1, 1]))
    assert int(plan.counts.sum()) == 16
    # Budget 16 over c = (2, 2): n_0 + n_1 = 8. The best feasible plan keeps arm
    # 5 in bin 0 (n_1 = 3); no plan uses n = 12.
    assert plan.arms.tolist() == [5, 3]


def test_dp_raises_when_no_plan_meets_the_budget() -> None:
    log_p = torch.zeros(2, 2, dtype=torch.float64)  # arms 2, 3
    with pytest.raises(ValueError, match="budget"):
        solve_arm_plan(log_p, torch.tensor([2, 2]), n_min=2, n_bar=2, total=9)  # odd total


@st.composite
def bandit_cases(draw):
    num_bins = draw(st.integers(1, 5))
    num_prompts = draw(st.integers(1, 16))
    n_min = draw(st.integers(1, 3))
    n_max = draw(st.integers(n_min, n_min + 8))
    n_bar = draw(st.integers(n_min, n_max))
    bins = draw(st.lists(st.integers(0, num_bins - 1), min_size=num_prompts, max_size=num_prompts))
    k = n_max - n_min + 1
    flat = draw(
        st.lists(
            st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=num_bins * k, max_size=num_bins * k
        )
    )
    return num_bins, n_min, n_max, n_bar, bins, torch.tensor(flat, dtype=torch.float64).reshape(num_bins, k)


@given(bandit_cases())
def test_bandit_properties(case) -> None:
    num_bins, n_min, n_max, n_bar, bins_list, scores = case
    ctl = bandit_with_scores(scores, n_min=n_min, n_max=n_max, n_bar=n_bar)
    bins = torch.tensor(bins_list)
    plan = ctl.allocate(torch.arange(len(bins_list)), bins)
    assert int(plan.counts.sum()) == len(bins_list) * n_bar
    assert bool(((plan.counts >= n_min) & (plan.counts <= n_max)).all())
    # Every prompt of a bin gets that bin's arm.
    assert torch.equal(plan.counts, plan.arms[bins])
    present = torch.bincount(bins, minlength=num_bins) > 0
    assert torch.equal(plan.per_bin_n[present], plan.arms[present].to(torch.float64))
    assert bool(torch.isnan(plan.per_bin_n[~present]).all())
    # The plan's objective is no worse than the uniform plan's.
    log_p = ctl.arm_log_probs()
    idx = torch.nonzero(present).flatten()
    c = torch.bincount(bins, minlength=num_bins)[idx]
    chosen = log_p[idx, plan.arms[idx] - n_min].sum()
    uniform = log_p[idx, n_bar - n_min].sum()
    assert float(chosen) >= float(uniform) - 1e-12
    assert int((c * plan.arms[idx]).sum()) == len(bins_list) * n_bar


# --------------------------------------------------------------------------- #
# live state (gdro.md §6.2)
# --------------------------------------------------------------------------- #
def test_observe_updates_the_chosen_arm_scores_exactly() -> None:
    ctl = bandit_with_scores(torch.zeros(3, 11), mu=0.5)
    bins = torch.tensor([0, 0, 1, 2])
    plan = ctl.allocate(torch.arange(4), bins)
    assert plan.arms.tolist() == [4, 4, 4]
    r_bins, gi = expand(plan)
    # Mean signal per bin: 0.5, -1.0, 0.0.
    signal = torch.tensor([{0: 0.5, 1: -1.0, 2: 0.0}[int(b)] for b in r_bins], dtype=torch.float32)
    before = ctl.scores.clone()
    ctl.observe(r_bins, signal, plan, bins, group_index=gi)
    # utility J_b = -mean; arm loss = -J_b + mu (n_b - n_bar) = mean (n_b = n_bar);
    # s <- 0.6 s + 0.4 * (-arm loss).
    expected = before.clone()
    expected[0, 2] = 0.4 * -0.5
    expected[1, 2] = 0.4 * 1.0
    expected[2, 2] = 0.0
    torch.testing.assert_close(ctl.scores, expected, rtol=0, atol=1e-12)
    assert not torch.equal(ctl.scores, before)


def test_observe_prices_compute_above_the_budget() -> None:
    scores = torch.zeros(2, 11, dtype=torch.float64)
    scores[0, 4] = 1.0  # bin 0 prefers n = 6
    ctl = bandit_with_scores(scores, mu=2.0)
    bins = torch.tensor([0, 1])
    plan = ctl.allocate(torch.arange(2), bins)
    assert plan.arms.tolist() == [6, 2]
    r_bins, gi = expand(plan)
    ctl.observe(r_bins, torch.zeros(r_bins.numel()), plan, bins, group_index=gi)
    # J = 0: arm loss = mu (n - n_bar) = 2 * 2 = 4 for bin 0 and 2 * -2 = -4 for bin 1.
    assert float(ctl.scores[0, 4]) == pytest.approx(0.6 * 1.0 + 0.4 * -4.0)
    assert float(ctl.scores[1, 0]) == pytest.approx(0.4 * 4.0)


def test_mu_rises_when_free_best_arms_exceed_budget() -> None:
    scores = torch.zeros(3, 11, dtype=torch.float64)
    scores[:, 8] = 5.0  # every bin's unconstrained best arm is n = 10 > n_bar = 4
    ctl = bandit_with_scores(scores, mu=0.0)
    bins = torch.tensor([0, 0, 1, 1, 2, 2])
    plan = ctl.allocate(torch.arange(6), bins)
    assert int(plan.counts.sum()) == 24
    r_bins, gi = expand(plan)
    out = ctl.observe(r_bins, torch.full((r_bins.numel(),), 0.1), plan, bins, group_index=gi)
    assert out["rollout_gdro/n_free"] == pytest.approx(10.0)
    assert ctl.mu == pytest.approx(0.05 * (10 - 4))


def test_mu_stays_at_mu_max_and_never_goes_below_zero() -> None:
    high = torch.zeros(2, 11, dtype=torch.float64)
    high[:, 8] = 5.0
    ctl = bandit_with_scores(high, mu=10.0)
    bins = torch.tensor([0, 1])
    plan = ctl.allocate(torch.arange(2), bins)
    r_bins, gi = expand(plan)
    ctl.observe(r_bins, torch.zeros(r_bins.numel()), plan, bins, group_index=gi)
    assert ctl.mu == 10.0

    low = torch.zeros(2, 11, dtype=torch.float64)
    low[:, 0] = 5.0  # best arm n = 2 < n_bar: mu is pushed down
    ctl = bandit_with_scores(low, mu=0.05)
    for _ in range(3):
        plan = ctl.allocate(torch.arange(2), bins)
        r_bins, gi = expand(plan)
        ctl.observe(r_bins, torch.zeros(r_bins.numel()), plan, bins, group_index=gi)
        assert ctl.mu == 0.0


def test_mu_holds_when_untrained_scores_tie() -> None:
    ctl = bandit_with_scores(torch.zeros(2, 11), mu=0.3)
    bins = torch.tensor([0, 1])
    plan = ctl.allocate(torch.arange(2), bins)
    # Only bin 1 returns responses; zero signal leaves both bins' arms tied, and
    # the tie goes to n_bar: n_free = n_bar, mu unchanged.
    r_bins = torch.tensor([1, 1, 1, 1])
    gi = torch.tensor([1, 1, 1, 1])
    out = ctl.observe(r_bins, torch.zeros(4), plan, bins, group_index=gi)
    assert out["rollout_gdro/score_updated_bins"] == 1.0
    assert ctl.mu == pytest.approx(0.3)


@pytest.mark.parametrize("sign, direction", [("utility", -1.0), ("adversarial", 1.0)])
def test_sign_flips_the_score_update(sign: str, direction: float) -> None:
    ctl = bandit_with_scores(torch.zeros(1, 11), sign=sign)
    bins = torch.tensor([0, 0])
    plan = ctl.allocate(torch.arange(2), bins)
    r_bins, gi = expand(plan)
    ctl.observe(r_bins, torch.full((r_bins.numel(),), 2.0), plan, bins, group_index=gi)
    # Mean loss 2: utility J = -2 -> score -0.8; adversarial J = +2 -> +0.8.
    assert float(ctl.scores[0, 2]) == pytest.approx(direction * 0.4 * 2.0)


def test_loss_var_proxy_ema_and_fallback() -> None:
    cfg = RolloutGDROConfig(proxy="loss_var", loss_var_beta=0.5)
    ctl = RolloutGDRO(cfg, num_bins=3, store=None)
    bins = torch.tensor([0, 0, 0, 1])
    plan = ctl.allocate(torch.arange(4), bins)
    # Nothing observed yet: every bin at the 0.25 prior -> uniform plan.
    assert plan.variance[:2].tolist() == [0.25, 0.25]
    assert plan.counts.tolist() == [4, 4, 4, 4]
    # Per-prompt mean signals of bin 0: 1, 2, 3 -> unbiased variance 1. Bin 1 has
    # one prompt: no spread information, not updated.
    gi = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    signal = torch.tensor([0.5, 1.5, 2.0, 2.0, 3.0, 3.0, 7.0])
    ctl.observe(bins[gi], signal, plan, bins, group_index=gi)
    assert ctl.loss_var_seen.tolist() == [True, False, False]
    assert float(ctl.loss_var_ema[0]) == pytest.approx(1.0)
    plan = ctl.allocate(torch.arange(4), bins)
    # Never-observed bins take the mean of the observed ones (here 1.0).
    assert plan.variance[:2].tolist() == [1.0, 1.0]
    # Second observation blends with beta: 0.5 * 1 + 0.5 * 4 (means 0, 2, 4 -> var 4).
    signal2 = torch.tensor([0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 1.0])
    ctl.observe(bins[gi], signal2, plan, bins, group_index=gi)
    assert float(ctl.loss_var_ema[0]) == pytest.approx(2.5)


def test_loss_var_needs_group_index() -> None:
    ctl = RolloutGDRO(RolloutGDROConfig(proxy="loss_var"), num_bins=2, store=None)
    bins = torch.tensor([0, 1])
    plan = ctl.allocate(torch.arange(2), bins)
    with pytest.raises(ValueError, match="group_index"):
        ctl.observe(bins.repeat_interleave(4), torch.zeros(8), plan, bins)


# --------------------------------------------------------------------------- #
# this step's labels (gdro.md §6.1)
# --------------------------------------------------------------------------- #
def loss_var_controller(variances: list[float], mode: str = "sqrt") -> RolloutGDRO:
    ctl = RolloutGDRO(RolloutGDROConfig(mode=mode, proxy="loss_var"), len(variances), store=None)
    state = ctl.state_dict()
    state["loss_var_ema"] = torch.tensor(variances, dtype=torch.float64)
    state["loss_var_seen"] = torch.ones(len(variances), dtype=torch.bool)
    ctl.load_state_dict(state)
    return ctl


def test_allocation_follows_this_steps_bins() -> None:
    ctl = loss_var_controller([0.2, 0.002])
    ids = torch.arange(4)
    first = ctl.allocate(ids, torch.tensor([0, 0, 1, 1]))
    assert first.counts.tolist() == [6, 6, 2, 2]
    # Next step the classifier moved the prompts: the plan follows the new labels
    # of these prompts, not the previous step's labels by position.
    second = ctl.allocate(ids, torch.tensor([1, 1, 0, 0]))
    assert second.counts.tolist() == [2, 2, 6, 6]
    # A different batch: only its own bins matter.
    third = ctl.allocate(torch.tensor([7, 8, 9]), torch.tensor([1, 0, 1]))
    assert third.counts.tolist() == [2, 8, 2]


def test_bernoulli_variance_comes_from_this_batchs_prompts() -> None:
    store = make_store([10, 10, 10, 10], [5, 5, 0, 10])  # p = .5, .5, 0, 1
    ctl = RolloutGDRO(RolloutGDROConfig(), num_bins=2, store=store)
    a = ctl.allocate(torch.tensor([0, 2]), torch.tensor([0, 1]))
    b = ctl.allocate(torch.tensor([3, 1]), torch.tensor([0, 1]))
    assert a.variance.tolist() == [0.25, 1e-3]
    assert b.variance.tolist() == [1e-3, 0.25]
    assert a.counts.tolist() == [6, 2] and b.counts.tolist() == [2, 6]


def test_observe_rejects_labels_of_another_step() -> None:
    ctl = loss_var_controller([0.2, 0.002])
    plan = ctl.allocate(torch.arange(4), torch.tensor([0, 0, 1, 1]))
    stale = torch.tensor([1, 1, 0, 0])
    gi = torch.repeat_interleave(torch.arange(4), plan.counts)
    with pytest.raises(ValueError, match="prompt_bins"):
        ctl.observe(stale[gi], torch.zeros(gi.numel()), plan, stale, group_index=gi)
    # Response bins that disagree with their prompt's bin are rejected too.
    with pytest.raises(ValueError, match="group_index"):
        ctl.observe(stale[gi], torch.zeros(gi.numel()), plan, plan.bins, group_index=gi)


@pytest.mark.parametrize("seed", range(5))
def test_permuting_the_batch_permutes_the_counts(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # Distinct bin variances; several prompts per bin, so rounding leaves some
    # bins with a mix of floor and ceil counts.
    variances = [0.21, 0.05, 0.12, 0.009, 0.16]
    num_prompts = 23
    ids = torch.randperm(1000, generator=g)[:num_prompts]
    bins = torch.randint(0, 5, (num_prompts,), generator=g)
    base = loss_var_controller(variances).allocate(ids, bins)
    perm = torch.randperm(num_prompts, generator=g)
    permuted = loss_var_controller(variances).allocate(ids[perm], bins[perm])
    assert torch.equal(permuted.counts, base.counts[perm])
    torch.testing.assert_close(permuted.continuous, base.continuous, rtol=0, atol=1e-12, equal_nan=True)
    assert permuted.mu == pytest.approx(base.mu, rel=1e-12)


def test_permutation_when_one_bin_mixes_floor_and_ceil() -> None:
    # Bin 1 holds three prompts at n = 8/3 each: one gets 2, two get 3. Which ones
    # is decided by the prompts' ids (and the step), never by their positions.
    def plan_for(ids: torch.Tensor, bins: torch.Tensor) -> RolloutPlan:
        ctl = RolloutGDRO(RolloutGDROConfig(n_max=8, proxy="loss_var"), 2, store=None)
        state = ctl.state_dict()
        state["loss_var_ema"] = torch.tensor([0.25, 0.001], dtype=torch.float64)
        state["loss_var_seen"] = torch.ones(2, dtype=torch.bool)
        ctl.load_state_dict(state)
        return ctl.allocate(ids, bins)

    ids = torch.tensor([11, 42, 7, 19])
    bins = torch.tensor([0, 1, 1, 1])
    base = plan_for(ids, bins)
    assert base.counts[0] == 8 and sorted(base.counts[1:].tolist()) == [2, 3, 3]
    for perm in itertools.permutations(range(4)):
        p = torch.tensor(perm)
        assert torch.equal(plan_for(ids[p], bins[p]).counts, base.counts[p])


def test_permuting_the_batch_with_bernoulli_proxy() -> None:
    g = torch.Generator().manual_seed(3)
    rollouts = torch.randint(1, 20, (30,), generator=g)
    correct = (torch.rand(30, generator=g) * (rollouts + 1)).floor().clamp(max=rollouts).to(torch.int64)
    store = make_store(rollouts.tolist(), correct.tolist())
    bins = torch.randint(0, 4, (30,), generator=g)
    ids = torch.arange(30)
    base = RolloutGDRO(RolloutGDROConfig(), 4, store).allocate(ids, bins)
    perm = torch.randperm(30, generator=g)
    permuted = RolloutGDRO(RolloutGDROConfig(), 4, store).allocate(ids[perm], bins[perm])
    assert torch.equal(permuted.counts, base.counts[perm])


# --------------------------------------------------------------------------- #
# once per step
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", ["sqrt", "bandit"])
def test_double_observe_raises(mode: str) -> None:
    ctl = RolloutGDRO(RolloutGDROConfig(mode=mode, proxy="loss_var"), 2, store=None)
    bins = torch.tensor([0, 0, 1, 1])
    plan = ctl.allocate(torch.arange(4), bins)
    r_bins, gi = expand(plan)
    signal = torch.arange(r_bins.numel(), dtype=torch.float64)
    ctl.observe(r_bins, signal, plan, bins, group_index=gi)
    state = ctl.state_dict()
    with pytest.raises(RuntimeError, match="already observed"):
        ctl.observe(r_bins, signal, plan, bins, group_index=gi)
    after = ctl.state_dict()
    assert torch.equal(state["scores"], after["scores"]) and state["mu"] == after["mu"]
    assert torch.equal(state["loss_var_ema"], after["loss_var_ema"])


def test_stale_or_foreign_plan_is_rejected() -> None:
    ctl = RolloutGDRO(RolloutGDROConfig(mode="bandit", proxy="loss_var"), 2, store=None)
    bins = torch.tensor([0, 1])
    old = ctl.allocate(torch.arange(2), bins)
    new = ctl.allocate(torch.arange(2), bins)
    r_bins, gi = expand(new)
    ctl.observe(r_bins, torch.ones(r_bins.numel()), new, bins, group_index=gi)
    r_bins, gi = expand(old)
    with pytest.raises(RuntimeError, match="already observed"):
        ctl.observe(r_bins, torch.ones(r_bins.numel()), old, bins, group_index=gi)
    other = RolloutGDRO(RolloutGDROConfig(mode="bandit", proxy="loss_var"), 2, store=None)
    with pytest.raises(RuntimeError, match="not issued"):
        other.observe(r_bins, torch.ones(r_bins.numel()), new, bins, group_index=gi)


# --------------------------------------------------------------------------- #
# diagnostics
# --------------------------------------------------------------------------- #
def test_diagnostics_values() -> None:
    ctl = loss_var_controller([0.2, 0.002, 0.1])
    bins = torch.tensor([0, 0, 1, 1])  # bin 2 absent
    plan = ctl.allocate(torch.arange(4), bins)
    assert plan.counts.tolist() == [6, 6, 2, 2]
    d = ctl.diagnostics(plan, bins)
    assert d["rollout_gdro/mu"] == plan.mu
    assert d["rollout_gdro/n_b/0"] == 6.0 and d["rollout_gdro/n_b/1"] == 2.0
    assert math.isnan(d["rollout_gdro/n_b/2"])
    assert d["rollout_gdro/budget_share/0"] == pytest.approx(0.75)
    assert d["rollout_gdro/budget_share/2"] == 0.0
    assert d["rollout_gdro/prompt_share/1"] == pytest.approx(0.5)
    assert d["rollout_gdro/alloc_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert d["rollout_gdro/frac_at_n_min"] == pytest.approx(0.5)
    se = 0.5 * math.sqrt(0.2) / math.sqrt(6) + 0.5 * math.sqrt(0.002) / math.sqrt(2)
    se_uni = (0.5 * math.sqrt(0.2) + 0.5 * math.sqrt(0.002)) / 2
    assert d["rollout_gdro/se_proxy"] == pytest.approx(se)
    assert d["rollout_gdro/se_proxy_uniform"] == pytest.approx(se_uni)
    assert d["rollout_gdro/se_ratio"] == pytest.approx(se / se_uni)
    var_ratio = (2 * 0.2 / 6 + 2 * 0.002 / 2) / ((2 * 0.2 + 2 * 0.002) / 4)
    assert d["rollout_gdro/var_ratio"] == pytest.approx(var_ratio)
    assert d["rollout_gdro/var_ratio"] < 1.0
    with pytest.raises(ValueError, match="bins"):
        ctl.diagnostics(plan, torch.tensor([1, 1, 0, 0]))


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
def run_steps(ctl: RolloutGDRO, steps: range, num_bins: int) -> list[RolloutPlan]:
    plans = []
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        ids = torch.randperm(50, generator=g)[:12]
        bins = torch.randint(0, num_bins, (12,), generator=g)
        plan = ctl.allocate(ids, bins)
        r_bins, gi = expand(plan)
        signal = torch.randn(r_bins.numel(), generator=g, dtype=torch.float64) + r_bins.to(torch.float64) * 0.3
        ctl.observe(r_bins, signal, plan, bins, group_index=gi)
        plans.append(plan)
    return plans


@pytest.mark.parametrize("mode, proxy", [("bandit", "loss_var"), ("sqrt", "loss_var"), ("bandit", "bernoulli")])
def test_state_dict_round_trip_reproduces_decisions(mode: str, proxy: str) -> None:
    store = make_store([10] * 50, [i % 11 for i in range(50)])
    cfg = RolloutGDROConfig(mode=mode, proxy=proxy, alpha_mu=0.5)
    original = RolloutGDRO(cfg, 4, store)
    run_steps(original, range(4), 4)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = RolloutGDRO(cfg, 4, store)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))

    a = run_steps(original, range(4, 8), 4)
    b = run_steps(resumed, range(4, 8), 4)
    for pa, pb in zip(a, b):
        assert torch.equal(pa.counts, pb.counts)
        assert pa.mu == pb.mu and pa.plan_id == pb.plan_id
    sa, sb = original.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key
    if mode == "bandit":
        assert not torch.equal(sa["scores"], torch.zeros_like(sa["scores"])), "state is live"


def test_load_state_dict_validates() -> None:
    ctl = RolloutGDRO(RolloutGDROConfig(mode="bandit", proxy="loss_var"), 3, store=None)
    good = ctl.state_dict()
    missing = dict(good)
    del missing["mu"]
    with pytest.raises(KeyError, match="mu"):
        ctl.load_state_dict(missing)
    with pytest.raises(ValueError, match="scores"):
        ctl.load_state_dict({**good, "scores": torch.zeros(4, 11)})
    with pytest.raises(ValueError, match="loss_var_ema"):
        ctl.load_state_dict({**good, "loss_var_ema": torch.zeros(2)})
    with pytest.raises(ValueError, match="mu"):
        ctl.load_state_dict({**good, "mu": 11.0})
    with pytest.raises(ValueError, match="plan counters"):
        ctl.load_state_dict({**good, "last_observed_plan_id": 5})
    ctl.load_state_dict(good)  # the untouched state still loads
