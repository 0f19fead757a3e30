import math

import numpy as np
import pytest
import torch

from nemo_gdro.algorithms.advantages import AdvantageConfig, grpo_advantages
from nemo_gdro.algorithms.bin_index import BinIndex
from nemo_gdro.algorithms.losses import clipped_policy_loss, k3_kl
from nemo_gdro.algorithms.prompt_gdro import (
    PromptGDRO,
    PromptGDROConfig,
    failure_signal,
    learnability_signal,
    surrogate_signal,
)


def test_ema_debiased_scores_hand_computed():
    ctl = PromptGDRO(PromptGDROConfig(beta=0.12), num_bins=4)
    bins = torch.tensor([0, 0, 1, 1, 1, 3])
    # bin 0: mean 1, share 2/6 -> 3; bin 1: mean 0.2, share 1/2 -> 0.4; bin 3: 0.5 / (1/6) = 3.
    m = ctl.observe(bins, torch.tensor([1.0, 1.0, 0.1, 0.2, 0.3, 0.5]))
    torch.testing.assert_close(m, torch.tensor([3.0, 0.4, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(ctl.scores, torch.tensor([3.0, 0.4, 0.0, 3.0], dtype=torch.float64))
    # Second step: only bins 1 and 2 present; bin 2's first observation is taken as is.
    ctl.observe(torch.tensor([1, 2, 2, 2]), torch.tensor([1.0, 0.0, 0.0, 0.3]))
    # bin 1: mean 1, share 1/4 -> 4; bin 2: mean 0.1, share 3/4 -> 2/15.
    expected = torch.tensor([3.0, 0.88 * 0.4 + 0.12 * 4.0, 0.1 / 0.75, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ctl.scores, expected)


def test_share_floor_limits_the_debias():
    ctl = PromptGDRO(PromptGDROConfig(share_floor=0.25), num_bins=2)
    bins = torch.tensor([0] * 9 + [1])
    m = ctl.observe(bins, torch.ones(10))
    torch.testing.assert_close(m, torch.tensor([1 / 0.9, 1 / 0.25], dtype=torch.float64))


def test_distribution_mixes_gamma_over_active_bins_only():
    ctl = PromptGDRO(PromptGDROConfig(eta=0.65, gamma=0.01), num_bins=3)
    ctl.scores = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64)
    q = ctl.distribution(torch.tensor([True, True, False]))
    e1, e0 = math.exp(0.65), 1.0
    expected = [0.99 * e1 / (e1 + e0) + 0.005, 0.99 * e0 / (e1 + e0) + 0.005, 0.0]
    torch.testing.assert_close(q, torch.tensor(expected, dtype=torch.float64))
    ctl_clip = PromptGDRO(PromptGDROConfig(score_clip=0.5), num_bins=2)
    ctl_clip.scores = torch.tensor([3.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(ctl_clip.omega(), torch.tensor([math.exp(0.325), math.exp(-0.325)], dtype=torch.float64))


def test_normalized_weights_have_mean_one_and_are_capped():
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.0), num_bins=3)
    ctl.scores = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    bins = torch.tensor([0, 1, 1, 1, 2, 2])
    w, w_bin = ctl.response_weights(bins)
    assert w.mean().item() == pytest.approx(1.0)
    e = math.exp(1.3)
    assert w_bin[0].item() / w_bin[1].item() == pytest.approx(e)
    capped = PromptGDRO(PromptGDROConfig(gamma=0.0, w_max=1.5), num_bins=3)
    capped.scores = ctl.scores.clone()
    w_c, _ = capped.response_weights(bins)
    assert w_c.max().item() == pytest.approx(1.5)
    assert torch.allclose(w_c[1:], w[1:])


def test_normalized_weight_hand_value():
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.0, eta=math.log(3.0)), num_bins=2)
    ctl.scores = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # q = [3/4, 1/4]; responses: one in bin 0, three in bin 1 -> mean q = (3/4 + 3/4) / 4 = 3/8.
    w, _ = ctl.response_weights(torch.tensor([0, 1, 1, 1]))
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3], dtype=torch.float64))


def test_paper_weight_form_is_capped_omega():
    ctl = PromptGDRO(PromptGDROConfig(weight_form="paper", w_max=2.0), num_bins=3)
    ctl.scores = torch.tensor([0.5, 5.0, 0.0], dtype=torch.float64)
    w, w_bin = ctl.response_weights(torch.tensor([0, 1]))
    torch.testing.assert_close(w, torch.tensor([math.exp(0.325), 2.0], dtype=torch.float64))
    assert w_bin[2].item() == 0.0


def _ragged_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([4, 2, 6, 3, 5])
    gi = torch.repeat_interleave(torch.arange(5), sizes)
    perm = torch.randperm(gi.numel(), generator=g)
    gi = gi[perm]  # rows of a prompt are not contiguous
    rewards = torch.randint(0, 2, (gi.numel(),), generator=g).float()
    prompt_bins = torch.tensor([0, 2, 0, 1, 2])
    return gi, rewards, prompt_bins[gi], g


def test_surrogate_signal_vanishes_on_policy_and_not_off_policy():
    """gdro.md §2: with rho = 1 the signal is -A, whose bin means are exactly 0."""
    gi, rewards, bins, g = _ragged_batch()
    adv = grpo_advantages(rewards, gi, 5, AdvantageConfig(adv_clip=None)).double()
    lengths = torch.randint(1, 7, (gi.numel(),), generator=g)
    mask = torch.arange(7)[None, :] < lengths[:, None]
    logp = -torch.rand(gi.numel(), 7, generator=g, dtype=torch.float64)
    token_loss, _ = clipped_policy_loss(logp, logp.clone(), adv, mask)
    signal = surrogate_signal(token_loss, mask)
    torch.testing.assert_close(signal, -adv)
    ctl = PromptGDRO(PromptGDROConfig(), num_bins=3)
    m = ctl.observe(bins, signal)
    assert torch.allclose(m, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # Off-policy (a later mini-batch) the same batch gives non-zero bin losses.
    logp_new = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    token_loss2, _ = clipped_policy_loss(logp_new, logp, adv, mask)
    m2 = PromptGDRO(PromptGDROConfig(), num_bins=3).observe(bins, surrogate_signal(token_loss2, mask))
    assert m2.abs().max() > 1e-3
    # ... and so does the KL term on-policy.
    kl = k3_kl(logp, logp - 0.2)
    m3 = PromptGDRO(PromptGDROConfig(), num_bins=3).observe(bins, surrogate_signal(token_loss, mask, kl, 0.5))
    assert bool((m3[torch.unique(bins)] > 0).all())


def test_failure_and_learnability_signals():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    torch.testing.assert_close(failure_signal(rewards, (-1.0, 1.0)), torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    gi = torch.tensor([0, 0, 0, 1, 1])
    # group 0: p = 1/3 -> 2/9; group 1: p = 1 -> 0.
    torch.testing.assert_close(
        learnability_signal(rewards, gi, 2), torch.tensor([2 / 9, 2 / 9, 2 / 9, 0.0, 0.0], dtype=torch.float64)
    )


def test_live_state_failure_signal_upweights_the_failing_bin():
    ctl = PromptGDRO(PromptGDROConfig(signal="failure"), num_bins=2)
    bins = torch.tensor([0, 0, 1, 1])
    before, _ = ctl.response_weights(bins)
    for _ in range(3):
        ctl.observe(bins, failure_signal(torch.tensor([0.0, 0.0, 1.0, 1.0])))
    after, w_bin = ctl.response_weights(bins)
    assert torch.equal(before, torch.ones(4, dtype=torch.float64))
    assert w_bin[0] > 1.0 > w_bin[1]


def test_resample_draws_bins_from_q_and_prompts_within_them():
    index = BinIndex(num_prompts=1000, num_bins=3, initial_bin=0)
    index.move(torch.arange(600, 900), torch.full((300,), 1))
    index.move(torch.arange(900, 1000), torch.full((100,), 2))
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.0), num_bins=3, seed=1)
    ctl.scores = torch.tensor([0.0, math.log(2) / 0.65, math.log(5) / 0.65], dtype=torch.float64)
    ids, bins, q = ctl.sample_prompts(index, 8000)
    torch.testing.assert_close(q, torch.tensor([1 / 8, 2 / 8, 5 / 8], dtype=torch.float64))
    freq = torch.bincount(bins, minlength=3).double() / 8000
    assert torch.allclose(freq, q, atol=0.02)
    assert torch.equal(torch.from_numpy(index.bin_of[ids.numpy()].astype(np.int64)), bins)
    iw = ctl.importance_weights(torch.tensor([0, 1, 2]), q, index)
    torch.testing.assert_close(iw, torch.tensor([0.6 / (1 / 8), 0.3 / 0.25, 0.1 / (5 / 8)], dtype=torch.float64))


def test_state_dict_round_trip_reproduces_next_decisions(tmp_path):
    index = BinIndex(50, 3, 0)
    index.move(torch.arange(20, 50), torch.tensor([1, 2] * 15))
    a = PromptGDRO(PromptGDROConfig(), num_bins=3, seed=7)
    a.observe(torch.tensor([0, 1, 2, 2]), torch.tensor([0.5, -0.2, 0.1, 0.3]))
    torch.save(a.state_dict(), tmp_path / "pg.pt")
    b = PromptGDRO(PromptGDROConfig(), num_bins=3, seed=123)
    b.load_state_dict(torch.load(tmp_path / "pg.pt", weights_only=False))
    for ctl in (a, b):
        ctl.observe(torch.tensor([0, 2]), torch.tensor([1.0, 0.0]))
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.sample_prompts(index, 16)[0], b.sample_prompts(index, 16)[0])
    assert torch.equal(a.response_weights(torch.tensor([0, 1, 2]))[0], b.response_weights(torch.tensor([0, 1, 2]))[0])
    with pytest.raises(ValueError, match="3 bins, this run has 4"):
        PromptGDRO(PromptGDROConfig(), num_bins=4).load_state_dict(a.state_dict())


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="prompt_gdro.signal"):
        PromptGDROConfig(signal="reweight")
    with pytest.raises(ValueError, match="prompt_gdro.beta"):
        PromptGDROConfig(beta=0.0)
