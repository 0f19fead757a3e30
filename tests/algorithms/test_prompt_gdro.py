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
from tests.algorithms.bin_pools import pool_in_bins


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
    assert math.isnan(w_bin[2].item())  # absent from the batch: no weight (NaN), never 0


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


def test_resample_bins_form_draws_bins_from_q_and_prompts_within_them():
    index = BinIndex(num_prompts=1000, num_bins=3, initial_bin=0)
    index.move(torch.arange(600, 900), torch.full((300,), 1))
    index.move(torch.arange(900, 1000), torch.full((100,), 2))
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.0, resample_base="bins"), num_bins=3, seed=1)
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
    with pytest.raises(ValueError, match="prompt_gdro.normalize_over"):
        PromptGDROConfig(normalize_over="nonzero")
    with pytest.raises(ValueError, match="prompt_gdro.resample_base"):
        PromptGDROConfig(resample_base="uniform")


# ------------------------------------------------------------------ normalize_over
def _weighted_controller(**kw):
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.0, eta=math.log(3.0), **kw), num_bins=3)
    ctl.scores = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # q over bins {0, 1} = [3/4, 1/4]
    return ctl


def test_normalize_over_defaults_to_all_and_informative_counts_nonzero_advantages_only():
    assert PromptGDROConfig().normalize_over == "all"
    bins = torch.tensor([0, 1, 1, 1])
    informative = torch.tensor([False, True, True, False])
    # all: mean q over the 4 responses = 3/8 -> [2, 2/3]; the mask is ignored.
    w_all, _ = _weighted_controller().response_weights(bins, informative)
    torch.testing.assert_close(w_all, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
    # informative: mean q over the two informative responses (both in bin 1) = 1/4 -> [3, 1].
    ctl = _weighted_controller(normalize_over="informative")
    w, w_bin = ctl.response_weights(bins, informative)
    torch.testing.assert_close(w, torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert w[informative].mean().item() == pytest.approx(1.0)
    assert w_bin[:2].tolist() == pytest.approx([3.0, 1.0]) and math.isnan(w_bin[2].item())
    # Nothing informative anywhere: every weight is 1.
    w0, w0_bin = ctl.response_weights(bins, torch.zeros(4, dtype=torch.bool))
    assert torch.equal(w0, torch.ones(4, dtype=torch.float64)) and w0_bin[:2].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="prompt_gdro.normalize_over=informative"):
        ctl.response_weights(bins)
    with pytest.raises(ValueError, match="informative"):
        ctl.response_weights(bins, torch.ones(3, dtype=torch.bool))


def test_informative_normalisation_keeps_informative_bins_from_shrinking_under_an_all_fail_bin():
    """An upweighted bin of all-fail groups shrinks every informative row's weight under `all`, not under `informative`."""
    # Bin 0: two all-fail groups (zero advantages); bin 1: two mixed groups.
    rewards = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0])
    gi = torch.repeat_interleave(torch.arange(4), 4)
    adv = grpo_advantages(rewards, gi, 4)
    bins = torch.tensor([0, 0, 1, 1])[gi]
    informative = adv != 0
    for form, mean_informative in (("all", None), ("informative", 1.0)):
        ctl = PromptGDRO(PromptGDROConfig(gamma=0.0, normalize_over=form), num_bins=2)
        ctl.scores = torch.tensor([2.0, 0.0], dtype=torch.float64)  # the all-fail bin is upweighted
        w, _ = ctl.response_weights(bins, informative)
        got = w[informative].mean().item()
        if mean_informative is None:
            assert got < 0.5 and w.mean().item() == pytest.approx(1.0)  # informative rows shrunk
        else:
            assert got == pytest.approx(mean_informative)


# ------------------------------------------------------------------ diagnostics
def test_weight_diagnostics_nan_for_absent_bins_min_max_and_effective_mass():
    ctl = _weighted_controller()
    bins = torch.tensor([0, 1, 1, 1])
    _, w_bin = ctl.response_weights(bins)
    d = ctl.diagnostics(bins, w_bin)
    assert d["prompt_gdro/weight/0"] == pytest.approx(2.0) and d["prompt_gdro/weight/1"] == pytest.approx(2 / 3)
    assert math.isnan(d["prompt_gdro/weight/2"])
    assert d["prompt_gdro/weight_min"] == pytest.approx(2 / 3) and d["prompt_gdro/weight_max"] == pytest.approx(2.0)
    # share [1/4, 3/4]; share x weight = [1/2, 1/2] -> TV = 0.5 (|1/4 - 1/2| + |3/4 - 1/2|) = 1/4.
    assert d["prompt_gdro/effective_bin_mass"] == pytest.approx(0.25)
    flat = PromptGDRO(PromptGDROConfig(), num_bins=3)
    _, w_flat = flat.response_weights(bins)
    d_flat = flat.diagnostics(bins, w_flat)
    assert d_flat["prompt_gdro/effective_bin_mass"] == pytest.approx(0.0, abs=1e-12)
    assert d_flat["prompt_gdro/weight_min"] == pytest.approx(1.0) == d_flat["prompt_gdro/weight_max"]
    # Without applied weights (resampling only) no weight keys are reported.
    assert not any(k.startswith("prompt_gdro/weight") and k != "prompt_gdro/weight_entropy" for k in flat.diagnostics(bins))


# ------------------------------------------------------------------ resample_base


def test_resample_base_defaults_to_data():
    assert PromptGDROConfig().resample_base == "data"


def test_data_base_flat_adversary_is_uniform_sampling_without_replacement():
    """Flat scores: every step's prompts are distinct and every P-subset of the pool equally likely."""
    index = pool_in_bins([3, 2, 1, 0])  # unequal bins and an empty one
    ctl = PromptGDRO(PromptGDROConfig(), num_bins=4, seed=5)
    ctl.scores = torch.full((4,), 0.7, dtype=torch.float64)  # flat, not zero
    steps, P = 6000, 3
    subsets: dict[tuple, int] = {}
    per_prompt = np.zeros(6)
    for _ in range(steps):
        ids, bins, p = ctl.sample_prompts(index, P)
        assert ids.unique().numel() == P
        assert torch.equal(torch.from_numpy(index.bin_of[ids.numpy()].astype(np.int64)), bins)
        key = tuple(sorted(ids.tolist()))
        subsets[key] = subsets.get(key, 0) + 1
        per_prompt[ids.numpy()] += 1
    torch.testing.assert_close(p, torch.tensor([3 / 6, 2 / 6, 1 / 6, 0.0], dtype=torch.float64))
    # 20 subsets of 3 out of 6, each 1/20 (300 expected, sd ~17).
    assert len(subsets) == 20 and all(abs(c - steps / 20) < 90 for c in subsets.values()), subsets
    assert np.abs(per_prompt - steps * P / 6).max() < 150
    # The first form (uniform over bins, with replacement) is far from this: the lone prompt of bin 2 is drawn
    # about 1/3 of the time there, 1/6 here.
    old = PromptGDRO(PromptGDROConfig(resample_base="bins"), num_bins=4, seed=5)
    ids_old = torch.cat([old.sample_prompts(index, P)[0] for _ in range(2000)])
    assert (ids_old == 5).double().mean().item() > 0.28 and per_prompt[5] / (steps * P) < 0.19


def test_data_base_draw_probabilities_follow_the_spec():
    """p_b = (1 - gamma) share_b omega_b / sum_j share_j omega_j + gamma share_b; the first draw of a step picks b with p_b."""
    index = pool_in_bins([60, 30, 10])
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.1), num_bins=3, seed=2)
    ctl.scores = torch.tensor([0.0, math.log(2) / 0.65, math.log(5) / 0.65], dtype=torch.float64)  # omega 1, 2, 5
    share = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    omega = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    expected = 0.9 * share * omega / (share * omega).sum() + 0.1 * share
    _, _, p = ctl.sample_prompts(index, 1)
    torch.testing.assert_close(p, expected)
    first = torch.stack([ctl.sample_prompts(index, 4)[1][0] for _ in range(6000)])
    freq = torch.bincount(first, minlength=3).double() / first.numel()
    assert torch.allclose(freq, expected, atol=0.025)


def test_data_base_pool_smaller_than_the_step_repeats_prompts_in_rounds():
    index = pool_in_bins([3, 2])
    ctl = PromptGDRO(PromptGDROConfig(), num_bins=2, seed=0)
    ctl.scores = torch.tensor([1.0, -1.0], dtype=torch.float64)
    ids, _, _ = ctl.sample_prompts(index, 12)
    counts = torch.bincount(ids, minlength=5)
    assert sorted(counts.tolist()) == [2, 2, 2, 3, 3]
    assert ids[:5].unique().numel() == 5 and ids[5:10].unique().numel() == 5


def test_importance_weights_data_form_hand_computed():
    """share_b / p_b, capped at w_max, rescaled to mean 1 over the batch's responses."""
    index = pool_in_bins([60, 30, 10])
    ctl = PromptGDRO(PromptGDROConfig(gamma=0.0, w_max=15.0, importance_cap=0.5), num_bins=3)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    rb = torch.tensor([0, 0, 1, 2])
    raw = torch.tensor([3.0, 3.0, 1.0, 0.2], dtype=torch.float64)  # importance_cap does not apply to `data`
    torch.testing.assert_close(ctl.importance_weights(rb, p, index), raw / raw.mean())
    capped = PromptGDRO(PromptGDROConfig(w_max=2.0), num_bins=3)
    raw_c = torch.tensor([2.0, 2.0, 1.0, 0.2], dtype=torch.float64)
    w = capped.importance_weights(rb, p, index)
    torch.testing.assert_close(w, raw_c / raw_c.mean())
    assert w.mean().item() == pytest.approx(1.0)
    # A flat adversary draws with p = share: no correction.
    flat = PromptGDRO(PromptGDROConfig(), num_bins=3)
    _, _, p_flat = flat.sample_prompts(index, 8)
    torch.testing.assert_close(flat.importance_weights(rb, p_flat, index), torch.ones(4, dtype=torch.float64))


def test_bins_form_is_the_first_form_bit_for_bit():
    """resample_base=bins: the same generator calls, draws and factor as before the data base existed."""
    index = pool_in_bins([50, 0, 30, 20])
    ctl = PromptGDRO(PromptGDROConfig(resample_base="bins", importance_cap=3.0), num_bins=4, seed=11)
    ctl.scores = torch.tensor([0.3, 0.0, -0.2, 0.9], dtype=torch.float64)
    ref_rng = np.random.Generator(np.random.PCG64(11))
    for _ in range(5):
        ids, bins, q = ctl.sample_prompts(index, 16)
        # The first form, written out: q over non-empty bins, bins by rng.choice, a prompt per bin.
        q_ref = ctl.distribution(index.counts() > 0)
        bins_ref = torch.from_numpy(ref_rng.choice(4, size=16, p=(q_ref / q_ref.sum()).numpy()))
        ids_ref = index.sample_in_bins(bins_ref, ref_rng)
        assert torch.equal(q, q_ref) and torch.equal(bins, bins_ref.to(torch.int64)) and torch.equal(ids, ids_ref)
        share = index.counts().double() / index.num_prompts
        w_ref = torch.where(q_ref > 0, share / q_ref.clamp_min(1e-300), torch.zeros_like(q_ref)).clamp(max=3.0)[bins]
        assert torch.equal(ctl.importance_weights(bins, q, index), w_ref)


def test_data_base_resume_repeats_the_next_draws(tmp_path):
    index = pool_in_bins([20, 15, 5])
    a = PromptGDRO(PromptGDROConfig(), num_bins=3, seed=4)
    a.observe(torch.tensor([0, 1, 2, 2]), torch.tensor([0.5, -0.2, 0.1, 0.3]))
    a.sample_prompts(index, 10)
    torch.save({"pg": a.state_dict(), "index": index.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=False)
    b = PromptGDRO(PromptGDROConfig(), num_bins=3, seed=99)
    b.load_state_dict(saved["pg"])
    index_b = BinIndex(40, 3, 0)
    index_b.load_state_dict(saved["index"])
    for _ in range(3):
        ia, ba, pa = a.sample_prompts(index, 12)
        ib, bb, pb = b.sample_prompts(index_b, 12)
        assert torch.equal(ia, ib) and torch.equal(ba, bb) and torch.equal(pa, pb)


def test_yaml_defaults_match_the_dataclass():
    from dataclasses import fields

    from omegaconf import OmegaConf

    from nemo_gdro.trainer.config import compose

    yaml = OmegaConf.to_container(compose().algorithm.prompt_gdro, resolve=True)
    default = PromptGDROConfig()
    for f in fields(PromptGDROConfig):
        if f.name in yaml:
            assert yaml[f.name] == getattr(default, f.name), f.name
    assert {"normalize_over", "resample_base"} <= set(yaml)
