"""DynaMO, token level: gradient-aware advantage modulation (dynamo.md §2).

:func:`modulate_advantages` rescales each token's advantage by a compensation
factor (boost confident tokens of correct answers) and a stabilisation factor
(brake the tokens whose update would move the policy entropy most, judged by
the first-order entropy change :func:`entropy_change`). The normalisation
statistics can span a whole optimizer mini-batch across micro-batches and
data-parallel ranks through :class:`ModulationStats`.

Shapes follow ``CONVENTIONS.md``: token tensors ``[R, L]`` with a ``mask [R, L]``.
Log-probabilities and entropies are in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_gdro.algorithms._validation import (
    bool_mask,
    check_token_tensors,
    compute_dtype,
    token_advantages,
)
from nemo_gdro.algorithms.configs import DynamoModulationConfig, EbarMode
from nemo_gdro.algorithms.losses import policy_ratio
from nemo_gdro.parallel import comm

__all__ = [
    "DynamoModulationConfig",
    "ModulationStats",
    "entropy_change",
    "compensation_factor",
    "stabilisation_factor",
    "modulation_stats",
    "modulate_advantages",
]


# dynamo.md §2: guards of the two normalisations (ref-code constants).
_NORM_EPS = 1e-8
# Threshold for the "tokens braked" metric (dynamo.md §5).
_BRAKED_BELOW = 0.95


def entropy_change(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    ebar_exact: torch.Tensor | None = None,
    ebar_mode: EbarMode = "exact",
) -> torch.Tensor:
    """First-order entropy change ``dH [R, L]`` of each token's policy-gradient update.

    A step of size ``eta`` on the logits of position t along
    ``xi_t * grad log pi(a_t)`` changes that position's entropy by
    ``eta * dH_t + O(eta^2)`` with ``dH_t = -xi_t (u_t - Ebar_t)``, where
    ``rho = exp(logp - logp_old)`` (log-ratio clamped as in the policy loss),
    ``I = 1[A>0] 1[rho <= 1+eps_high] + 1[A<0] 1[rho >= 1-eps_low]`` (the token
    still gets gradient), ``xi = I rho A``, ``u = pi (logp + H)`` with
    ``pi = exp(logp)``, and ``Ebar = sum_a pi_a^2 (log pi_a + H)`` (``exact``,
    from ``ebar_exact``) or the per-sequence mean of ``u`` over valid tokens
    (``sequence_mean``; a row without valid tokens gets 0).

    Args:
        advantages: ``[R]`` or ``[R, L]``.
        logp, logp_old, entropy: ``[R, L]`` (nats).
        mask: ``[R, L]`` bool or 0/1.
        ebar_exact: ``[R, L]``, required for ``ebar_mode="exact"``.
    Returns:
        ``dH [R, L]`` detached, 0 at masked entries.
    """
    check_token_tensors(logp=logp, logp_old=logp_old, entropy=entropy, mask=mask, ebar_exact=ebar_exact)
    if ebar_mode not in ("exact", "sequence_mean"):
        raise ValueError(f"ebar_mode must be 'exact' or 'sequence_mean', got {ebar_mode!r}")
    if ebar_mode == "exact" and ebar_exact is None:
        raise ValueError("ebar_mode='exact' needs ebar_exact (sum_a pi_a^2 (log pi_a + H) per token)")
    dtype = compute_dtype(advantages, logp, logp_old, entropy, ebar_exact)
    valid = bool_mask(mask)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    with torch.no_grad():
        # Padding may hold garbage; select (not multiply) so it cannot leak NaN/inf.
        lp = torch.where(valid, logp.detach().to(dtype), zero)
        lp_old = torch.where(valid, logp_old.detach().to(dtype), zero)
        h = torch.where(valid, entropy.detach().to(dtype), zero)
        adv = torch.where(valid, token_advantages(advantages.detach().to(dtype), lp), zero)
        rho = policy_ratio(lp, lp_old)
        gets_grad = ((adv > 0) & (rho <= 1.0 + eps_high)) | ((adv < 0) & (rho >= 1.0 - eps_low))
        xi = torch.where(gets_grad, rho * adv, zero)
        u = lp.exp() * (lp + h)
        if ebar_mode == "exact":
            ebar = torch.where(valid, ebar_exact.detach().to(dtype), zero)
        else:
            u_sum = torch.where(valid, u, zero).sum(dim=-1, keepdim=True)
            count = valid.sum(dim=-1, keepdim=True).to(dtype).clamp_min(1.0)
            ebar = (u_sum / count).expand_as(u)
        dh = -xi * (u - ebar)
        return torch.where(valid, dh, zero)


@dataclass(frozen=True)
class ModulationStats:
    """Normalisation statistics of the modulation scope (dynamo.md §2).

    h_min, h_max: min / max token entropy over the scope's valid tokens.
    dh_absmax: max ``|dH|`` over the scope's valid tokens.

    The empty scope is ``(inf, -inf, 0)``, the identity of :meth:`merge`.
    Build mini-batch scope statistics with ``from_tokens`` per micro-batch,
    ``merge`` them, then ``reduce`` over the data-parallel group.
    """

    h_min: float = math.inf
    h_max: float = -math.inf
    dh_absmax: float = 0.0

    @classmethod
    def from_tokens(cls, entropy: torch.Tensor, dH: torch.Tensor, mask: torch.Tensor) -> ModulationStats:
        """Statistics of one batch of tokens (``[R, L]`` each); one host sync."""
        check_token_tensors(entropy=entropy, dH=dH, mask=mask)
        valid = bool_mask(mask)
        h = entropy.detach()
        inf = torch.full((), math.inf, dtype=h.dtype, device=h.device)
        if h.numel() == 0:
            return cls()
        buf = torch.stack(
            [
                torch.where(valid, h, inf).amin(),
                torch.where(valid, h, -inf).amax(),
                torch.where(valid, dH.detach().abs().to(h.dtype), torch.zeros_like(inf)).amax(),
            ]
        )
        h_min, h_max, dh_absmax = buf.tolist()
        return cls(h_min=h_min, h_max=h_max, dh_absmax=dh_absmax)

    def merge(self, other: ModulationStats) -> ModulationStats:
        """Statistics of the union of two token sets (e.g. two micro-batches)."""
        return ModulationStats(
            h_min=min(self.h_min, other.h_min),
            h_max=max(self.h_max, other.h_max),
            dh_absmax=max(self.dh_absmax, other.dh_absmax),
        )

    def reduce(self, group: Any = None) -> ModulationStats:
        """All-reduce over a ``torch.distributed`` group (``None``: the default group).

        One ``all_reduce(MAX)`` of a float64 triple ``(-h_min, h_max,
        dh_absmax)`` on the group's backend device (CUDA for NCCL, CPU for
        gloo). Returns ``self`` unchanged when torch.distributed is not
        initialised and no group was given (one process is its own scope).
        """
        if not comm.is_distributed():
            if group is None:
                return self
            raise RuntimeError("ModulationStats.reduce: a group was given but torch.distributed is not initialised")
        buf = torch.tensor([-self.h_min, self.h_max, self.dh_absmax], dtype=torch.float64)
        neg_h_min, h_max, dh_absmax = comm.all_reduce(buf, op=dist.ReduceOp.MAX, group=group).tolist()
        return ModulationStats(h_min=-neg_h_min, h_max=h_max, dh_absmax=dh_absmax)

    @property
    def empty(self) -> bool:
        return self.h_max < self.h_min


def compensation_factor(
    entropy: torch.Tensor, advantages: torch.Tensor, *, h_min: float, h_max: float, alpha: float
) -> torch.Tensor:
    """``beta_comp = 1 + alpha (H_max - H) / (H_max - H_min + 1e-8)`` where ``A > 0``, else 1.

    Confident tokens (low H) of positively rewarded answers get the largest
    boost because their softmax gradient shrinks like ``1 - pi``. Shapes:
    ``entropy`` and ``advantages`` broadcastable, result of their shape.
    """
    comp = 1.0 + alpha * (h_max - entropy) / (h_max - h_min + _NORM_EPS)
    return torch.where(advantages > 0, comp, torch.ones_like(comp))


def stabilisation_factor(x: torch.Tensor, *, lam_min: float, gamma: float, tau: float) -> torch.Tensor:
    """``beta_stab = lam_min + (1 - lam_min) / (1 + exp(gamma (x - tau)))``, elementwise.

    ``x = |dH| / max|dH|`` in ``[0, 1]``; with the default ``gamma = 50,
    tau = 0.99`` only tokens near the scope's maximum entropy change are braked.
    """
    # sigmoid(-z) == 1 / (1 + exp(z)) without overflow for large z.
    return lam_min + (1.0 - lam_min) * torch.sigmoid(-gamma * (x - tau))


def modulation_stats(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    config: DynamoModulationConfig,
    *,
    ebar_exact: torch.Tensor | None = None,
) -> ModulationStats:
    """:class:`ModulationStats` of one micro-batch (convenience: runs :func:`entropy_change`).

    For ``scope="minibatch"`` call it on every micro-batch of the optimizer
    mini-batch (the policy does not change within a mini-batch, so a no-grad
    pre-pass gives the same ``logp``), ``merge`` the results, ``reduce`` over
    the DP group and pass the result to :func:`modulate_advantages`.
    """
    dh = entropy_change(
        advantages, logp, logp_old, entropy, mask,
        eps_low=config.eps_low, eps_high=config.eps_high, ebar_exact=ebar_exact, ebar_mode=config.ebar,
    )
    return ModulationStats.from_tokens(entropy.to(dh.dtype), dh, mask)


def modulate_advantages(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    config: DynamoModulationConfig,
    *,
    ebar_exact: torch.Tensor | None = None,
    stats: ModulationStats | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DynaMO token-level advantages ``A~ = A * beta_comp * beta_stab`` (dynamo.md §2).

    ``beta_comp = 1 + alpha (H_max - H) / (H_max - H_min + 1e-8)`` where
    ``A > 0``, else 1; ``beta_stab = lam_min + (1 - lam_min) / (1 + exp(gamma
    (x - tau)))`` with ``x = |dH| / (max|dH| + 1e-8)`` and ``dH`` from
    :func:`entropy_change`.

    Args:
        advantages: ``[R]`` or ``[R, L]``.
        logp, logp_old, entropy: ``[R, L]`` (entropy with the sampling temperature applied).
        mask: ``[R, L]`` bool or 0/1.
        config: :class:`DynamoModulationConfig`.
        ebar_exact: ``[R, L]``, needed when ``config.ebar == "exact"``.
        stats: H_min, H_max, max|dH| of the normalisation scope (mini-batch
            scope: merged over micro-batches and reduced over DP ranks).
            ``None`` computes them from the given tokens, which is the
            microbatch scope, or the mini-batch scope when the call holds the
            whole mini-batch. Passing stats with ``config.scope ==
            "microbatch"`` is an error (it would silently change the scope).
    Returns:
        ``(A~ [R, L], metrics)``. ``A~`` is detached, in at least fp32, and 0 at
        masked entries. ``metrics`` holds detached 0-dim tensors (no host
        sync): ``beta_comp/{mean,min,max}``, ``beta_stab/{mean,min,max}`` over
        valid tokens, ``frac_beta_stab_below_0.95``, ``adv_ratio_mean`` (mean
        ``|A~| / |A|`` over valid tokens with ``A != 0``) and ``num_tokens``.
        Without valid tokens the factors report 1 and the fraction 0.
    """
    if stats is not None and config.scope == "microbatch":
        raise ValueError("dynamo.scope is 'microbatch': do not pass mini-batch ModulationStats")
    dh = entropy_change(
        advantages, logp, logp_old, entropy, mask,
        eps_low=config.eps_low, eps_high=config.eps_high, ebar_exact=ebar_exact, ebar_mode=config.ebar,
    )
    dtype = dh.dtype
    valid = bool_mask(mask)
    zero = torch.zeros((), dtype=dtype, device=dh.device)
    one = torch.ones((), dtype=dtype, device=dh.device)
    with torch.no_grad():
        h = torch.where(valid, entropy.detach().to(dtype), zero)
        if stats is None:
            stats = ModulationStats.from_tokens(h, dh, valid)
        adv = torch.where(valid, token_advantages(advantages.detach().to(dtype), h), zero)

        # An empty scope (inf, -inf) only occurs without valid tokens, whose
        # results are masked below anyway.
        beta_comp = compensation_factor(h, adv, h_min=stats.h_min, h_max=stats.h_max, alpha=config.alpha)
        x = dh.abs() / (stats.dh_absmax + _NORM_EPS)
        beta_stab = stabilisation_factor(x, lam_min=config.lam_min, gamma=config.gamma, tau=config.tau)
        beta_comp = torch.where(valid, beta_comp, one)
        beta_stab = torch.where(valid, beta_stab, one)
        a_tilde = torch.where(valid, adv * beta_comp * beta_stab, zero)

        metrics = _modulation_metrics(adv, a_tilde, beta_comp, beta_stab, valid)
    return a_tilde, metrics


def _modulation_metrics(
    adv: torch.Tensor, a_tilde: torch.Tensor, beta_comp: torch.Tensor, beta_stab: torch.Tensor, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    n = valid.sum()
    nf = n.to(adv.dtype).clamp_min(1.0)
    one = torch.ones((), dtype=adv.dtype, device=adv.device)
    has = n > 0
    out: dict[str, torch.Tensor] = {"num_tokens": n}
    for name, beta in (("beta_comp", beta_comp), ("beta_stab", beta_stab)):
        # Masked entries hold 1, so min/max need the where to ignore them.
        out[f"{name}/mean"] = torch.where(has, torch.where(valid, beta, 0 * one).sum() / nf, one)
        # The appended sentinel keeps amin/amax defined for an empty [0, L] batch.
        lo = torch.cat([torch.where(valid, beta, math.inf * one).flatten(), math.inf * one.reshape(1)]).amin()
        hi = torch.cat([torch.where(valid, beta, -math.inf * one).flatten(), -math.inf * one.reshape(1)]).amax()
        out[f"{name}/min"] = torch.where(has, lo, one)
        out[f"{name}/max"] = torch.where(has, hi, one)
    out[f"frac_beta_stab_below_{_BRAKED_BELOW}"] = (valid & (beta_stab < _BRAKED_BELOW)).sum().to(adv.dtype) / nf
    nonzero = valid & (adv != 0)
    ratio = torch.where(nonzero, a_tilde.abs() / torch.where(nonzero, adv.abs(), one), 0 * one)
    n_nonzero = nonzero.sum()
    out["adv_ratio_mean"] = torch.where(
        n_nonzero > 0, ratio.sum() / n_nonzero.to(adv.dtype).clamp_min(1.0), one
    )
    return out
