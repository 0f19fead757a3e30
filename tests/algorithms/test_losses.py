"""Tests of nemo_gdro.algorithms.losses (grpo_base.md §4-§5, r2vpo.md §5)."""

from __future__ import annotations

import io
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.losses import (
    LOSS_AGG_MODES,
    DualVariableController,
    PolicyLossConfig,
    R2VPOConfig,
    abs_advantage_share,
    aggregate_token_loss,
    clip_regions,
    clipped_policy_loss,
    k3_kl,
    per_sequence_mean,
    policy_ratio,
    r2vpo_token_loss,
    ratio_variance,
)
from nemo_gdro.algorithms.configs import ReplayConfig

F64 = torch.float64


# --------------------------------------------------------------------------- #
# A tiny real policy: linear softmax over a small vocabulary, float64.
# --------------------------------------------------------------------------- #
@dataclass
class Batch:
    feats: torch.Tensor  # [R, L, D] per-token features
    tokens: torch.Tensor  # [R, L] sampled token ids
    mask: torch.Tensor  # [R, L] bool
    adv: torch.Tensor  # [R]
    W: torch.Tensor  # [V, D] current policy parameters
    logp_mu: torch.Tensor  # [R, L] behaviour log-probs (detached)


def policy_logp(W: torch.Tensor, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = feats @ W.T
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_batch(seed: int = 0, R: int = 8, L: int = 5, V: int = 7, D: int = 4, drift: float = 0.3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(R, L, D, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (R, L), generator=g)
    lengths = torch.randint(1, L + 1, (R,), generator=g)
    mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(R, generator=g, dtype=F64)
    W = 0.5 * torch.randn(V, D, generator=g, dtype=F64)
    W_mu = W + drift * torch.randn(V, D, generator=g, dtype=F64)
    logp_mu = policy_logp(W_mu, feats, tokens).detach()
    return Batch(feats, tokens, mask, adv, W, logp_mu)


def from_ratios(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, logp_old) in float64 whose policy ratio is `ratios`."""
    logp = torch.tensor(ratios, dtype=F64).log().requires_grad_()
    return logp, torch.zeros_like(logp)


# --------------------------------------------------------------------------- #
# Ratio, clipped loss, k3 KL
# --------------------------------------------------------------------------- #
def test_policy_ratio_values_and_clamp():
    logp = torch.tensor([[0.0, math.log(2.0), 50.0, -50.0]], dtype=F64)
    r = policy_ratio(logp, torch.zeros_like(logp))
    expected = torch.tensor([[1.0, 2.0, math.exp(20.0), math.exp(-20.0)]], dtype=F64)
    torch.testing.assert_close(r, expected, rtol=1e-14, atol=0)


def test_clipped_loss_hand_values():
    # rho per token; row 0 has A = +1, row 1 has A = -1; last token of row 0 is padding.
    logp, logp_old = from_ratios([[1.5, 0.5, 1.0, 5.0], [0.5, 5.0, 2.0, 1.1]])
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    loss, m = clipped_policy_loss(logp, logp_old, adv, mask)
    expected = torch.tensor(
        [
            # max(-1.5, -1.28); max(-0.5, -0.8); -1; masked
            [-1.28, -0.5, -1.0, 0.0],
            # max(0.5, 0.8); min(max(5, 1.28), 3); min(2, 3); max(1.1, 1.1)
            [0.8, 3.0, 2.0, 1.1],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    # 7 valid tokens: clipped at (0,0) and (1,0); dual clip at (1,1).
    assert float(m["clip_frac"]) == pytest.approx(2 / 7, abs=1e-12)
    assert float(m["dual_clip_frac"]) == pytest.approx(1 / 7, abs=1e-12)
    assert float(m["ratio_mean"]) == pytest.approx((1.5 + 0.5 + 1.0 + 0.5 + 5.0 + 2.0 + 1.1) / 7, abs=1e-12)
    assert not any(v.requires_grad for v in m.values())

    # Gradient: zero on clipped / dual-clipped / masked tokens, -A * rho elsewhere.
    loss.sum().backward()
    expected_grad = torch.tensor([[0.0, -0.5, -1.0, 0.0], [0.0, 0.0, 2.0, 1.1]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected_grad, rtol=0, atol=1e-12)


def test_clipped_loss_without_dual_clip_and_token_advantages():
    logp, logp_old = from_ratios([[1.5, 0.5, 1.0, 5.0], [0.5, 5.0, 2.0, 1.1]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, m = clipped_policy_loss(logp, logp_old, torch.tensor([1.0, -1.0], dtype=F64), mask, dual_clip=None)
    assert loss[1, 1].item() == pytest.approx(5.0, abs=1e-12)
    assert float(m["dual_clip_frac"]) == 0.0
    # [R, L] advantages with mixed signs inside a row.
    adv_tok = torch.tensor([[1.0, -1.0, 2.0, -1.0], [-1.0, 1.0, 0.0, 1.0]], dtype=F64)
    loss2, _ = clipped_policy_loss(logp, logp_old, adv_tok, mask, eps_low=0.1, eps_high=0.1, dual_clip=2.0)
    expected = torch.tensor(
        [
            # A=1,rho=1.5: max(-1.5,-1.1); A=-1,rho=0.5: max(0.5,0.9); A=2,rho=1: -2; A=-1,rho=5: min(5, 2)
            [-1.1, 0.9, -2.0, 2.0],
            # A=-1,rho=0.5: 0.9; A=1,rho=5: max(-5,-1.1); A=0: 0; A=1,rho=1.1: max(-1.1,-1.1)
            [0.9, -1.1, 0.0, -1.1],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(loss2, expected, rtol=0, atol=1e-12)


@given(
    adv=st.lists(st.floats(-5, 5, allow_nan=False, allow_subnormal=False), min_size=1, max_size=6),
    L=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_clipped_loss_on_policy_is_minus_advantage(adv, L, seed):
    R = len(adv)
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(R, L, generator=g, dtype=F64) * 5).requires_grad_()
    mask = torch.rand(R, L, generator=g) < 0.7
    A = torch.tensor(adv, dtype=F64)
    loss, m = clipped_policy_loss(logp, logp.detach().clone(), A, mask)
    expected = torch.where(mask, -A.unsqueeze(1).expand(R, L), torch.zeros(R, L, dtype=F64))
    assert torch.equal(loss, expected)
    assert float(m["clip_frac"]) == 0.0 and float(m["dual_clip_frac"]) == 0.0
    # On policy, the gradient w.r.t. log pi is -A on valid tokens (rho = 1).
    loss.sum().backward()
    assert torch.equal(logp.grad, expected)


def test_clipped_loss_rejects_bad_shapes_and_dual_clip():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(logp, logp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), dual_clip=1.0)


def test_k3_kl_hand_values():
    logp = torch.tensor([[0.0, 0.0, -1.0, -3.0]], dtype=F64)
    logp_ref = torch.tensor([[math.log(2.0), -1.0, -1.0, 40.0]], dtype=F64)
    kl = k3_kl(logp, logp_ref)
    expected = torch.tensor(
        [[2.0 - math.log(2.0) - 1.0, math.exp(-1.0) + 1.0 - 1.0, 0.0, math.exp(20.0) - 20.0 - 1.0]], dtype=F64
    )
    torch.testing.assert_close(kl, expected, rtol=1e-14, atol=1e-15)
    assert kl[0, 2].item() == 0.0


@given(
    vals=st.lists(
        st.tuples(st.floats(-30, 0, allow_nan=False, allow_subnormal=False), st.floats(-30, 0, allow_nan=False, allow_subnormal=False)), min_size=1, max_size=30
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_k3_kl_nonnegative_and_zero_when_equal(vals, dtype):
    logp = torch.tensor([[a for a, _ in vals]], dtype=dtype)
    logp_ref = torch.tensor([[b for _, b in vals]], dtype=dtype)
    assert bool((k3_kl(logp, logp_ref) >= 0).all())
    assert bool((k3_kl(logp, logp.clone()) == 0).all())


# --------------------------------------------------------------------------- #
# Aggregation
# --------------------------------------------------------------------------- #
def _agg_example():
    # Masked positions hold garbage (incl. inf) that must not leak.
    token_loss = torch.tensor(
        [[1.0, 2.0, 3.0], [4.0, 100.0, float("inf")], [7.0, 8.0, 9.0]], dtype=F64, requires_grad=True
    )
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    return token_loss, mask


def test_aggregation_hand_values():
    tl, mask = _agg_example()
    assert aggregate_token_loss(tl, mask).item() == pytest.approx(10 / 4)
    assert aggregate_token_loss(tl, mask, global_num_tokens=8).item() == pytest.approx(10 / 8)
    # Sequence means 2 and 4; the fully masked row is not a sequence.
    assert aggregate_token_loss(tl, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_token_loss(tl, mask, "seq-mean-token-mean", global_num_seqs=4).item() == pytest.approx(1.5)
    # Dr.GRPO: (6/4 + 4/4) / 2.
    got = aggregate_token_loss(tl, mask, "seq-mean-token-sum-norm", norm_constant=4.0)
    assert got.item() == pytest.approx(1.25)
    got.backward()
    torch.testing.assert_close(tl.grad, torch.tensor([[0.125] * 3, [0.125, 0, 0], [0, 0, 0]], dtype=F64))
    # Tensor global counts (as produced by an all-reduce) work too.
    assert aggregate_token_loss(tl, mask, global_num_tokens=torch.tensor(5)).item() == pytest.approx(2.0)
    torch.testing.assert_close(per_sequence_mean(tl.detach(), mask), torch.tensor([2.0, 4.0, 0.0], dtype=F64))
    # No valid tokens at all: 0, not NaN.
    assert aggregate_token_loss(tl, torch.zeros_like(mask)).item() == 0.0


def test_informative_token_mean_hand_values():
    """Sum over every valid token / valid tokens of rows with a non-zero advantage."""
    tl, mask = _agg_example()
    informative = torch.tensor([False, True, True])  # row 0 (3 tokens) is of a zero-variance group
    got = aggregate_token_loss(tl, mask, "informative-token-mean", informative=informative)
    assert got.item() == pytest.approx(10 / 1)  # numerator 1+2+3+4, N = row 1's one token
    got.backward()
    torch.testing.assert_close(tl.grad, torch.tensor([[1.0] * 3, [1.0, 0, 0], [0, 0, 0]], dtype=F64))
    assert aggregate_token_loss(tl, mask, "informative-token-mean", global_num_informative_tokens=4).item() == pytest.approx(2.5)
    # No informative token: a zero loss (the trainer skips such an update), never NaN.
    assert aggregate_token_loss(tl, mask, "informative-token-mean", informative=torch.zeros(3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="informative"):
        aggregate_token_loss(tl, mask, "informative-token-mean")
    with pytest.raises(ValueError, match=r"\[R\] row mask"):
        aggregate_token_loss(tl, mask, "informative-token-mean", informative=torch.ones(2, dtype=torch.bool))


def test_clip_regions_and_abs_advantage_share():
    """Zero-gradient tokens of the clipped loss (ordinary and dual clip) and their |A|-weighted share."""
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 4.0, 1.0, 1.28]], dtype=F64)
    adv = torch.tensor([[2.0, -1.0, -3.0, 1.0, -0.5, 1.0, 1.0]], dtype=F64)
    clip, dual = clip_regions(ratio, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    # A>0 r>1.28 clipped; A<0 r>1 unclipped (r<c); A<0 r<0.8 clipped; A>0 r<1 unclipped; A<0 r>c dual; ties unclipped.
    assert clip.tolist() == [[True, False, True, False, False, False, False]]
    assert dual.tolist() == [[False, False, False, False, True, False, False]]
    no_dual = clip_regions(ratio, adv, eps_low=0.2, eps_high=0.28, dual_clip=None)[1]
    assert not no_dual.any()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    part, total = abs_advantage_share(adv, clip | dual, mask)
    assert float(part) == pytest.approx(2.0 + 3.0 + 0.5) and float(total) == pytest.approx(8.5)
    # The same zero-gradient tokens as clipped_policy_loss's, whose gradient there is exactly zero.
    logp_old = torch.zeros_like(ratio)
    logp = ratio.log().requires_grad_()
    tl, m = clipped_policy_loss(logp, logp_old, adv, mask)
    assert torch.equal(m["zero_grad_mask"], (clip | dual) & mask)
    (grad,) = torch.autograd.grad(tl.sum(), logp)
    assert torch.equal(grad == 0, ~mask | m["zero_grad_mask"])


def test_aggregation_errors():
    tl, mask = _agg_example()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_token_loss(tl, mask, "seq-sum")
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate_token_loss(tl, mask, "seq-mean-token-sum-norm")


@given(
    R=st.integers(1, 9),
    L=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 8), min_size=0, max_size=4),
    mode=st.sampled_from(LOSS_AGG_MODES),
)
def test_aggregation_micro_batch_invariance(R, L, seed, cuts, mode):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(R, L, generator=g, dtype=F64) * 3
    logp = (logp_old + 0.4 * torch.randn(R, L, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(R, generator=g, dtype=F64)
    adv[torch.rand(R, generator=g) < 0.3] = 0.0  # rows of zero-variance groups
    mask = torch.rand(R, L, generator=g) < 0.75
    kw = {"norm_constant": 3.0} if mode == "seq-mean-token-sum-norm" else {}
    informative = adv != 0

    tl, _ = clipped_policy_loss(logp, logp_old, adv, mask)
    tl = tl + 0.1 * (logp - logp_old) ** 2  # a term (KL-like) that zero-advantage rows contribute too
    full = aggregate_token_loss(tl, mask, mode, informative=informative, **kw)
    (full_grad,) = torch.autograd.grad(full, logp)

    # Global counts, as the trainer would all-reduce them before the step.
    n_tok, n_seq = mask.sum(), mask.any(dim=-1).sum()
    n_inf = (mask & informative[:, None]).sum()
    bounds = sorted({c for c in cuts if c < R} | {0, R})
    total = torch.zeros((), dtype=F64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        tl_mb, _ = clipped_policy_loss(logp[lo:hi], logp_old[lo:hi], adv[lo:hi], mask[lo:hi])
        tl_mb = tl_mb + 0.1 * (logp[lo:hi] - logp_old[lo:hi]) ** 2
        total = total + aggregate_token_loss(
            tl_mb, mask[lo:hi], mode, global_num_tokens=n_tok, global_num_seqs=n_seq,
            global_num_informative_tokens=n_inf, **kw
        )
    (mb_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(mb_grad, full_grad, rtol=1e-12, atol=1e-13)


def test_policy_loss_config_validation():
    assert PolicyLossConfig().eps_high == 0.28
    PolicyLossConfig(dual_clip=None, loss_agg_mode="seq-mean-token-sum-norm", norm_constant=1024.0)
    cases = [
        ({"eps_low": 1.5}, r"policy_loss\.eps_low must be in \[0, 1\), got 1.5"),
        ({"eps_low": -0.1}, r"policy_loss\.eps_low"),
        ({"eps_high": -1.0}, r"policy_loss\.eps_high"),
        ({"dual_clip": 0.5}, r"policy_loss\.dual_clip"),
        ({"kl_coef": -1e-3}, r"policy_loss\.kl_coef"),
        ({"loss_agg_mode": "sum"}, r"policy_loss\.loss_agg_mode"),
        ({"norm_constant": 0.0}, r"policy_loss\.norm_constant"),
        ({"loss_agg_mode": "seq-mean-token-sum-norm"}, r"policy_loss\.norm_constant is required"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            PolicyLossConfig(**kwargs)


# --------------------------------------------------------------------------- #
# R²VPO
# --------------------------------------------------------------------------- #
def r2vpo_step_loss(W: torch.Tensor, b: Batch, lam: float, **kw) -> tuple[torch.Tensor, dict]:
    logp = policy_logp(W, b.feats, b.tokens)
    tl, stats = r2vpo_token_loss(logp, b.logp_mu, b.adv, b.mask, lam, **kw)
    return aggregate_token_loss(tl, b.mask), stats


def test_r2vpo_lam_zero_is_unclipped_importance_weighted_pg():
    b = make_batch(seed=1, drift=0.8)
    W = b.W.clone().requires_grad_()
    loss, _ = r2vpo_step_loss(W, b, lam=0.0)
    (g_r2vpo,) = torch.autograd.grad(loss, W)

    # Reference: (1/N) sum_t -r_t A_t grad log pi_t, with r_t a constant weight.
    logp = policy_logp(W, b.feats, b.tokens)
    r = torch.exp(logp.detach() - b.logp_mu)
    surrogate = (-(r * b.adv.unsqueeze(1) * logp) * b.mask).sum() / b.mask.sum()
    (g_ref,) = torch.autograd.grad(surrogate, W)
    torch.testing.assert_close(g_r2vpo, g_ref, rtol=1e-12, atol=1e-14)
    # ...and it is unclipped: with this much drift the clipped loss's gradient differs.
    tl_clip, m = clipped_policy_loss(policy_logp(W, b.feats, b.tokens), b.logp_mu, b.adv, b.mask)
    assert float(m["clip_frac"]) > 0
    (g_clip,) = torch.autograd.grad(aggregate_token_loss(tl_clip, b.mask), W)
    assert not torch.allclose(g_clip, g_ref)


@pytest.mark.parametrize("lam", [0.0, 0.7, 5.0])
@pytest.mark.parametrize("center", ["one", "batch_mean"])
def test_r2vpo_per_token_gradient_formula(lam, center):
    b = make_batch(seed=2, drift=0.5)
    logp = policy_logp(b.W, b.feats, b.tokens).detach().requires_grad_()
    c = 1.0 if center == "one" else 1.13
    kw = {"ratio_mean": c} if center == "batch_mean" else {}
    tl, _ = r2vpo_token_loss(logp, b.logp_mu, b.adv, b.mask, lam, center=center, **kw)
    tl.sum().backward()
    r = torch.exp(logp.detach() - b.logp_mu)
    A = b.adv.unsqueeze(1)
    expected = torch.where(b.mask, -r * (A - 2 * lam * (r - c)), torch.zeros_like(r))
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-14)
    # The loss value itself, token by token.
    expected_loss = torch.where(b.mask, -r * A + lam * (r - c) ** 2, torch.zeros_like(r))
    torch.testing.assert_close(tl.detach(), expected_loss, rtol=1e-12, atol=1e-14)


def test_r2vpo_finite_difference_on_tiny_model():
    b = make_batch(seed=3, drift=0.5)
    lam = 1.7
    W = b.W.clone().requires_grad_()
    loss, _ = r2vpo_step_loss(W, b, lam)
    (g_auto,) = torch.autograd.grad(loss, W)

    h = 1e-6
    g_fd = torch.zeros_like(b.W)
    with torch.no_grad():
        for idx in range(b.W.numel()):
            Wp, Wm = b.W.clone(), b.W.clone()
            Wp.view(-1)[idx] += h
            Wm.view(-1)[idx] -= h
            g_fd.view(-1)[idx] = (r2vpo_step_loss(Wp, b, lam)[0] - r2vpo_step_loss(Wm, b, lam)[0]) / (2 * h)
    assert g_auto.abs().max() > 1e-2  # a non-trivial gradient
    torch.testing.assert_close(g_auto, g_fd, rtol=1e-6, atol=1e-8)


def test_r2vpo_lam_is_a_constant():
    b = make_batch(seed=4)
    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    W = b.W.clone().requires_grad_()
    loss, _ = r2vpo_step_loss(W, b, lam)
    loss.backward()
    assert lam.grad is None and W.grad is not None


def test_r2vpo_on_policy_variance_zero_and_lam_decreases():
    b = make_batch(seed=5)
    logp = policy_logp(b.W, b.feats, b.tokens).detach()
    tl, stats = r2vpo_token_loss(logp, logp.clone(), b.adv, b.mask, lam=3.0)
    assert stats["sum_sq_dev"].item() == 0.0
    assert stats["num_tokens"].item() == int(b.mask.sum())
    assert stats["ratio_sum"].item() == float(b.mask.sum())
    v = ratio_variance(stats["sum_sq_dev"], stats["num_tokens"])
    assert v == 0.0
    # On policy the penalty vanishes: loss = -A per valid token.
    torch.testing.assert_close(tl, torch.where(b.mask, -b.adv.unsqueeze(1).expand_as(tl), torch.zeros_like(tl)))

    ctrl = DualVariableController(R2VPOConfig())
    assert ctrl.lam == 0.0
    assert ctrl.update(v) == 0.0  # stays at the floor

    ctrl = DualVariableController(R2VPOConfig(lam_init=1.0))
    assert ctrl.update(v) == pytest.approx(1.0 - 10 * 0.04, abs=1e-15)  # 0.6
    assert ctrl.update(v) == pytest.approx(0.2, abs=1e-15)
    assert ctrl.update(v) == 0.0
    assert ctrl.num_updates == 3 and ctrl.last_v_hat == 0.0

    mult = DualVariableController(R2VPOConfig(dual_update="multiplicative"))
    assert mult.lam == 0.1
    assert mult.update(v) == pytest.approx(0.1 * math.exp(-0.2), rel=1e-14)


@given(
    v_hats=st.lists(
        st.one_of(st.floats(0, 1, allow_nan=False, allow_subnormal=False), st.floats(0, 1e6, allow_nan=False, allow_subnormal=False)), min_size=1, max_size=40
    ),
    rule=st.sampled_from(["additive", "multiplicative"]),
    lam_max=st.sampled_from([1.0, 100.0]),
)
def test_dual_variable_bounds_and_direction(v_hats, rule, lam_max):
    cfg = R2VPOConfig(dual_update=rule, lam_max=lam_max)
    ctrl = DualVariableController(cfg)
    floor = 0.0 if rule == "additive" else cfg.lam_min
    for v in v_hats:
        before = ctrl.lam
        after = ctrl.update(v)
        assert floor <= after <= lam_max
        if v > cfg.delta:
            assert after > before or after == lam_max
        elif v < cfg.delta:
            assert after < before or after == floor
        else:
            assert after == before


def test_dual_variable_hand_values():
    add = DualVariableController(R2VPOConfig())
    assert add.update(0.09) == pytest.approx(10 * 0.05, abs=1e-15)  # 0 + 10 (0.09 - 0.04)
    assert add.update(0.04) == pytest.approx(0.5, abs=1e-15)
    assert add.update(100.0) == 100.0  # clipped at lam_max

    mult = DualVariableController(R2VPOConfig(dual_update="multiplicative"))
    assert mult.update(0.08) == pytest.approx(0.1 * math.exp(0.2), rel=1e-14)  # 0.12214...
    assert mult.update(0.02) == pytest.approx(0.1 * math.exp(0.2) * math.exp(-0.1), rel=1e-14)
    assert mult.update(1e9) == 100.0  # no overflow, clipped at lam_max
    for _ in range(200):
        mult.update(0.0)
    assert mult.lam == 1e-3  # floor lam_min

    with pytest.raises(ValueError, match="v_hat"):
        add.update(float("nan"))
    with pytest.raises(ValueError, match="v_hat"):
        add.update(-1.0)


@given(
    eps=st.floats(1e-3, 0.5),
    u=st.lists(st.floats(-1, 1, allow_nan=False, allow_subnormal=False), min_size=1, max_size=40),
)
def test_clip_feasible_ratios_have_variance_at_most_eps_squared(eps, u):
    ratios = torch.tensor([[1.0 + eps * x for x in u]], dtype=F64)
    logp_mu = -torch.rand(ratios.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    logp = logp_mu + ratios.log()
    mask = torch.ones_like(ratios, dtype=torch.bool)
    _, stats = r2vpo_token_loss(logp, logp_mu, torch.zeros(1, dtype=F64), mask, 0.0)
    v = ratio_variance(stats["sum_sq_dev"], stats["num_tokens"])
    assert v <= eps**2 * (1 + 1e-9)


def test_r2vpo_batch_mean_center_and_max_ratio_mask():
    logp, logp_mu = from_ratios([[0.5, 1.0, 3.0, 10.0], [1.5, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0], dtype=F64)

    # batch_mean: the penalty and the statistics use the given centre.
    tl, stats = r2vpo_token_loss(logp, logp_mu, adv, mask, 2.0, center="batch_mean", ratio_mean=1.2)
    assert stats["sum_sq_dev"].item() == pytest.approx(0.7**2 + 0.2**2 + 1.8**2 + 0.3**2, abs=1e-12)
    assert stats["ratio_sum"].item() == pytest.approx(0.5 + 1.0 + 3.0 + 1.5, abs=1e-12)
    assert tl[1, 0].item() == pytest.approx(-1.5 * -2.0 + 2.0 * 0.3**2, abs=1e-12)
    with pytest.raises(ValueError, match="ratio_mean"):
        r2vpo_token_loss(logp, logp_mu, adv, mask, 2.0, center="batch_mean")
    with pytest.raises(ValueError, match="center"):
        r2vpo_token_loss(logp, logp_mu, adv, mask, 2.0, center="median")

    # max_ratio: the r = 3 token is excluded; the padded r = 10 token never counted.
    tl, stats = r2vpo_token_loss(logp, logp_mu, adv, mask, 1.0, max_ratio=2.0)
    assert stats["max_ratio_fired"].item() == pytest.approx(1 / 4)
    assert stats["num_tokens"].item() == 4 and stats["num_kept"].item() == 3
    assert stats["sum_sq_dev"].item() == pytest.approx(0.25 + 0.0 + 0.25, abs=1e-12)
    assert torch.equal(stats["mask"], torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool))
    expected = torch.tensor(
        [[-0.5 + 0.25, -1.0, 0.0, 0.0], [3.0 + 0.25, 0.0, 0.0, 0.0]], dtype=F64
    )
    torch.testing.assert_close(tl.detach(), expected, rtol=0, atol=1e-12)
    tl.sum().backward()
    assert logp.grad[0, 2].item() == 0.0 and logp.grad[0, 3].item() == 0.0
    # Off by default: nothing fires even for huge ratios.
    _, stats = r2vpo_token_loss(logp, logp_mu, adv, mask, 1.0)
    assert stats["max_ratio_fired"].item() == 0.0 and stats["num_kept"].item() == 4


def test_ratio_variance_local_and_errors():
    assert ratio_variance(torch.tensor(0.3, dtype=F64), torch.tensor(12)) == pytest.approx(0.025)
    assert ratio_variance(0.0, 0) == 0.0
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            ratio_variance(1.0, 2, group=object())


def test_r2vpo_config_validation():
    cfg = R2VPOConfig()
    assert (cfg.delta, cfg.dual_update, cfg.eta_lam, cfg.eta_mult) == (0.04, "additive", 10.0, 0.2)
    assert cfg.initial_lam == 0.0 and R2VPOConfig(dual_update="multiplicative").initial_lam == 0.1
    assert (cfg.lam_max, cfg.lam_min, cfg.center, cfg.max_ratio) == (100.0, 1e-3, "one", None)
    cases = [
        ({"delta": -1.0}, r"r2vpo\.delta must be > 0, got -1.0"),
        ({"delta": 0.0}, r"r2vpo\.delta"),
        ({"dual_update": "exp"}, r"r2vpo\.dual_update"),
        ({"eta_lam": -1.0}, r"r2vpo\.eta_lam"),
        ({"eta_mult": float("inf")}, r"r2vpo\.eta_mult"),
        ({"lam_init": -0.1}, r"r2vpo\.lam_init"),
        ({"lam_init": 200.0}, r"r2vpo\.lam_init"),
        ({"dual_update": "multiplicative", "lam_init": 0.0}, r"r2vpo\.lam_init"),
        ({"lam_max": 0.0}, r"r2vpo\.lam_max"),
        ({"lam_min": 0.0}, r"r2vpo\.lam_min"),
        ({"lam_min": 200.0}, r"r2vpo\.lam_min"),
        ({"center": "median"}, r"r2vpo\.center"),
        ({"max_ratio": 0.5}, r"r2vpo\.max_ratio"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            R2VPOConfig(**kwargs)


def test_replay_config_validation():
    cfg = ReplayConfig()
    assert (cfg.ratio, cfg.staleness) == (0.0, 1)
    assert ReplayConfig(ratio=1.5, staleness=0) == ReplayConfig(1.5, 0)
    cases = [
        ({"ratio": -0.5}, r"replay\.ratio must be a finite number >= 0"),
        ({"ratio": float("inf")}, r"replay\.ratio"),
        ({"ratio": True}, r"replay\.ratio"),
        ({"staleness": -1}, r"replay\.staleness must be an integer >= 0"),
        ({"staleness": 1.5}, r"replay\.staleness"),
        ({"staleness": True}, r"replay\.staleness"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ReplayConfig(**kwargs)


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
def test_controller_state_dict_round_trip(rule):
    cfg = R2VPOConfig(dual_update=rule, lam_init=0.3)
    a = DualVariableController(cfg)
    for v in [0.1, 0.01, 0.05]:
        a.update(v)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = DualVariableController(cfg)
    b.load_state_dict(torch.load(buf))
    assert (b.lam, b.num_updates, b.last_v_hat) == (a.lam, a.num_updates, a.last_v_hat)
    for v in [0.2, 0.0, 0.04, 0.07, 3.0]:
        assert a.update(v) == b.update(v)
    assert a.state_dict() == b.state_dict()

    fresh = DualVariableController(cfg)
    assert math.isnan(fresh.state_dict()["last_v_hat"])
    with pytest.raises(KeyError, match="num_updates"):
        fresh.load_state_dict({"lam": 0.5, "last_v_hat": 0.1})
    with pytest.raises(ValueError, match="lam"):
        fresh.load_state_dict({"lam": -1.0, "num_updates": 0, "last_v_hat": 0.0})


# --------------------------------------------------------------------------- #
# DP=1 vs DP=2 with real torch.distributed (gloo, 2 CPU processes)
# --------------------------------------------------------------------------- #
DP_LAM_INIT = 0.5
DP_LR = 0.1


def _dp_batch(mode: str) -> Batch:
    b = make_batch(seed=7, R=8)
    if mode == "informative-token-mean":
        b.adv[[1, 5, 6]] = 0.0  # rows of zero-variance groups, on both ranks
    return b


def _dp_step(b: Batch, rows: slice, micro_batches: list[slice], group, mode: str = "token-mean") -> dict:
    """One R²VPO optimizer step on `rows` of `b`: loss, reduced gradient, new lam.

    The loss and V share one N (r2vpo.md §4): the valid tokens, or with ``informative-token-mean``
    the valid tokens of rows with a non-zero advantage; either is all-reduced before the step."""
    ctrl = DualVariableController(R2VPOConfig(lam_init=DP_LAM_INIT))
    W = b.W.clone().requires_grad_()
    mask = b.mask[rows]
    informative = b.adv[rows] != 0
    n_global = mask.sum().to(F64)
    n_inf = (mask & informative[:, None]).sum().to(F64)
    if group is not None:
        dist.all_reduce(n_global, group=group)
        dist.all_reduce(n_inf, group=group)
    loss_sum = torch.zeros((), dtype=F64)
    sq_dev, n_tok = torch.zeros((), dtype=F64), torch.zeros((), dtype=F64)
    for mb in micro_batches:
        feats, tokens, m = b.feats[rows][mb], b.tokens[rows][mb], mask[mb]
        logp = policy_logp(W, feats, tokens)
        tl, stats = r2vpo_token_loss(logp, b.logp_mu[rows][mb], b.adv[rows][mb], m, ctrl.lam)
        loss = aggregate_token_loss(tl, m, mode, global_num_tokens=n_global, global_num_informative_tokens=n_inf)
        loss.backward()  # gradient accumulation over micro-batches
        loss_sum += loss.detach()
        sq_dev += stats["sum_sq_dev"]
        n_tok += (m & informative[mb][:, None]).sum() if mode == "informative-token-mean" else stats["num_tokens"]
    grad = W.grad.detach().clone()
    if group is not None:
        dist.all_reduce(grad, group=group)
        dist.all_reduce(loss_sum, group=group)
    v_hat = ratio_variance(sq_dev, n_tok, group=group)
    lam = ctrl.update(v_hat)
    return {"loss": loss_sum, "grad": grad, "W_new": b.W - DP_LR * grad, "v_hat": v_hat, "lam": lam}


def _dp_worker(rank: int, world_size: int, port: int, out_dir: str, mode: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        b = _dp_batch(mode)
        half = b.mask.shape[0] // world_size
        rows = slice(rank * half, (rank + 1) * half)
        # Different micro-batching on each rank: layout must not matter.
        mbs = [slice(0, 1), slice(1, 4)] if rank == 0 else [slice(0, half)]
        out = _dp_step(b, rows, mbs, dist.group.WORLD, mode)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token-mean", "informative-token-mean"])
def test_r2vpo_dp1_equals_dp2_gloo(mode):
    b = _dp_batch(mode)
    ref = _dp_step(b, slice(0, 8), [slice(0, 8)], group=None, mode=mode)
    assert ref["lam"] != DP_LAM_INIT  # the dual step did something
    if mode == "informative-token-mean":
        # A real difference from token-mean: the smaller N scales the whole step up.
        tm = _dp_step(b, slice(0, 8), [slice(0, 8)], group=None)
        n, n_inf = float(b.mask.sum()), float((b.mask & (b.adv != 0)[:, None]).sum())
        assert n_inf < n
        torch.testing.assert_close(ref["grad"] * (n_inf / n), tm["grad"])

    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_dp_worker, args=(world_size, _free_port(), out_dir, mode), nprocs=world_size, join=False)
        deadline = time.monotonic() + 90
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                pytest.fail("DP workers did not finish in time")
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]

    for res in results:
        torch.testing.assert_close(res["loss"], ref["loss"], rtol=0, atol=1e-10)
        torch.testing.assert_close(res["grad"], ref["grad"], rtol=0, atol=1e-10)
        torch.testing.assert_close(res["W_new"], ref["W_new"], rtol=0, atol=1e-10)
        assert res["v_hat"] == pytest.approx(ref["v_hat"], abs=1e-10)
        assert res["lam"] == pytest.approx(ref["lam"], abs=1e-10)
