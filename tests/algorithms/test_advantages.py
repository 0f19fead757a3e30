import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.advantages import (
    AdvantageConfig,
    group_reward_stats,
    grpo_advantages,
    mean_at_k,
    pass_at_k,
    pass_at_k_from_rows,
    zero_variance_group_fraction,
)


def test_grpo_advantages_hand_computed_ragged_interleaved_rows():
    # Group 0 rows 0,1,3: rewards 1,0,1 -> mean 2/3, unbiased std sqrt(1/3).
    # Group 1 rows 2,4,5: rewards 0,1,1 -> same stats. Group 2 row 6: single rollout.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    group_index = torch.tensor([0, 0, 1, 0, 1, 1, 2])
    adv = grpo_advantages(rewards, group_index, 3, AdvantageConfig(eps=0.0))
    s = math.sqrt(1.0 / 3.0)
    hi, lo = (1 / 3) / s, (-2 / 3) / s
    torch.testing.assert_close(adv, torch.tensor([hi, lo, lo, hi, hi, hi, 0.0]), rtol=0, atol=1e-6)


def test_population_std_and_eps():
    rewards = torch.tensor([1.0, 0.0])
    gi = torch.tensor([0, 0])
    adv = grpo_advantages(rewards, gi, 1, AdvantageConfig(std="population", eps=0.5))
    # mean 0.5, population std 0.5 -> 0.5 / (0.5 + 0.5) = 0.5
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))
    adv_u = grpo_advantages(rewards, gi, 1, AdvantageConfig(eps=0.0))
    torch.testing.assert_close(adv_u, torch.tensor([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)]))


def test_dr_grpo_mean_centring_only():
    rewards = torch.tensor([3.0, 1.0, 2.0])
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 0]), 1, AdvantageConfig(normalize_by_std=False))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0]))


def test_advantage_clip():
    # One success among 40: A = (1 - 1/40) / std; std = sqrt(40/40 * 1/40 * 39/40 * 40/39) -> A ~ 6.2 > 5.
    rewards = torch.zeros(40)
    rewards[7] = 1.0
    gi = torch.zeros(40, dtype=torch.long)
    adv = grpo_advantages(rewards, gi, 1)
    assert adv[7].item() == pytest.approx(5.0)
    unclipped = grpo_advantages(rewards, gi, 1, AdvantageConfig(adv_clip=None))
    assert unclipped[7].item() == pytest.approx((1 - 1 / 40) / math.sqrt(1 / 40), rel=1e-4)


def test_degenerate_groups_have_zero_advantage_and_are_counted():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3])
    gi = torch.tensor([0, 0, 1, 1, 2])
    adv = grpo_advantages(rewards, gi, 3)
    assert adv[0] == 0 and adv[1] == 0 and adv[4] == 0
    assert adv[2] < 0 < adv[3]
    assert zero_variance_group_fraction(rewards, gi, 3) == pytest.approx(2 / 3)


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    seed=st.integers(0, 10_000),
)
def test_advantages_sum_to_zero_per_group_and_follow_permutation(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    gi = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    rewards = torch.randint(0, 2, (gi.numel(),), generator=g).float()
    cfg = AdvantageConfig(adv_clip=None)
    adv = grpo_advantages(rewards, gi, len(sizes), cfg)
    sums = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, gi, adv.double())
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-5)
    perm = torch.randperm(gi.numel(), generator=g)
    adv_perm = grpo_advantages(rewards[perm], gi[perm], len(sizes), cfg)
    torch.testing.assert_close(adv_perm, adv[perm])


def test_group_stats_match_torch_std():
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.1, 0.7])
    gi = torch.tensor([1, 0, 1, 1, 0])
    stats = group_reward_stats(rewards, gi, 2)
    assert stats.std[1].item() == pytest.approx(torch.tensor([0.2, 0.4, 0.1]).std().item())
    assert stats.mean[0].item() == pytest.approx(0.8)


def test_bad_group_index_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        grpo_advantages(torch.zeros(3), torch.tensor([0, 1, 2]), 2)


def test_pass_at_k_hand_values_and_limits():
    n = torch.tensor([8, 8, 8, 10, 5, 4])
    c = torch.tensor([0, 1, 8, 3, 5, 0])
    got = pass_at_k(n, c, 4)
    expected = [
        0.0,
        1 - math.comb(7, 4) / math.comb(8, 4),
        1.0,
        1 - math.comb(7, 4) / math.comb(10, 4),
        1.0,
        0.0,
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # k = 1 is the plain success rate.
    torch.testing.assert_close(pass_at_k(n, c, 1), c.double() / n.double())


@given(n=st.integers(1, 300), data=st.data())
def test_pass_at_k_matches_binomial_formula(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    got = pass_at_k(torch.tensor([n]), torch.tensor([c]), k).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_pass_at_k_rejects_too_few_samples():
    with pytest.raises(ValueError, match="at least 8 samples"):
        pass_at_k(torch.tensor([8, 4]), torch.tensor([1, 1]), 8)


def test_pass_and_mean_at_k_from_rows():
    correct = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0])
    gi = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    torch.testing.assert_close(mean_at_k(correct, gi, 2), torch.tensor([0.5, 0.25], dtype=torch.float64))
    p2 = pass_at_k_from_rows(correct, gi, 2, 2)
    torch.testing.assert_close(p2, torch.tensor([1 - 1 / 6, 1 - 3 / 6], dtype=torch.float64))
