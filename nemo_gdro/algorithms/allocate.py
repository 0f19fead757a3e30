"""Split an integer budget over units in proportion to weights, under per-unit bounds.

One operation serves DynaMO (units = prompts) and Rollout-GDRO ``sqrt`` mode
(units = the prompts of each bin, all carrying their bin's weight). They differ
only in the continuous rule that precedes the shared integer rounding:

- ``"excess"`` (DynaMO, dynamo.md §1): every unit starts at its lower bound and
  the rest of the budget is water-filled in proportion to the weights, capped at
  the upper bounds; what the caps leave is re-filled among the others.
- ``"scaled"`` (Rollout-GDRO, gdro.md §3): ``n_u = clip(t * w_u, lo_u, hi_u)``
  with the scale ``t`` found by bisection so the total meets the budget. With
  ``w = sqrt(v)`` this is the square-root (Neyman) law and ``mu = 1 / t**2`` is
  the shadow price of the budget constraint.

Both continuous solutions are then rounded by largest remainder so that the
total is exact and every unit stays within its bounds. Equal remainders go to
the lower unit position first, so the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Rule = Literal["excess", "scaled"]

# Remainders that differ only by float noise must tie, so that "lower position
# first" decides them and the result does not depend on summation order.
_REMAINDER_DECIMALS = 9
_BISECTION_ITERS = 200


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate_budget`.

    counts: integer allocation, int64 ``[U]``; ``counts.sum() == total``.
    continuous: the pre-rounding solution, float64 ``[U]``; sums to ``total``.
    scale: for rule ``"scaled"`` the multiplier ``t`` with
        ``continuous = clip(t * w, lo, hi)`` (``inf`` when every unit is at its
        upper bound, ``nan`` for rule ``"excess"``).
    """

    counts: torch.Tensor
    continuous: torch.Tensor
    scale: float


def _as_bounds(bound: int | torch.Tensor, num_units: int, name: str) -> torch.Tensor:
    b = torch.as_tensor(bound, dtype=torch.float64)
    if b.dim() == 0:
        b = b.expand(num_units).clone()
    if b.shape != (num_units,):
        raise ValueError(f"{name} must be a scalar or have shape [{num_units}], got {tuple(b.shape)}")
    if not torch.all(b == torch.floor(b)):
        raise ValueError(f"{name} must hold integers, got {b.tolist()}")
    return b


def _validate(weights: torch.Tensor, total: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D [U], got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if (lo < 0).any():
        raise ValueError("lower bounds must be >= 0")
    if (lo > hi).any():
        bad = torch.nonzero(lo > hi).flatten()[:5].tolist()
        raise ValueError(f"lower bound exceeds upper bound at units {bad}")
    lo_sum, hi_sum = int(lo.sum().item()), int(hi.sum().item())
    if not lo_sum <= total <= hi_sum:
        raise ValueError(
            f"budget {total} is infeasible: the bounds allow totals in [{lo_sum}, {hi_sum}]"
        )


def _excess_fill(w: torch.Tensor, total: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Water-fill ``total - sum(lo)`` above the lower bounds in proportion to ``w``."""
    x = lo.clone()
    free = hi > lo
    remaining = float(total) - float(lo.sum())
    # Each pass saturates at least one unit or places everything, so U passes suffice.
    for _ in range(w.numel() + 1):
        if remaining <= 0 or not free.any():
            break
        w_free = torch.where(free, w, torch.zeros_like(w))
        if w_free.sum() <= 0:
            # No positive weight left: spread the rest evenly (dynamo.md §1 step 3).
            w_free = free.to(torch.float64)
        share = remaining * w_free / w_free.sum()
        room = hi - x
        capped = free & (share >= room)
        if not capped.any():
            x = x + share
            remaining = 0.0
            break
        x = torch.where(capped, hi, x)
        remaining -= float(room[capped].sum())
        free = free & ~capped
    return x


def _scaled_fill(
    w: torch.Tensor, total: int, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Find ``t`` with ``sum(clip(t w, lo, hi)) == total`` by bisection."""

    def filled(t: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(t * w, lo), hi)

    if float(hi.sum()) == total:
        return hi.clone(), float("inf")
    if float(lo.sum()) == total:
        return lo.clone(), 0.0
    positive = w > 0
    # Units with zero weight sit at lo for every finite t; if the positive-weight
    # units cannot absorb the budget, no t exists and the rest is spread evenly.
    reachable = float(torch.where(positive, hi, lo).sum())
    if reachable < total:
        # t -> inf saturates every positive unit; the rest goes evenly to the others.
        saturated = torch.where(positive, hi, lo)
        return _excess_fill(positive.logical_not().to(torch.float64), total, saturated, hi), float("inf")
    t_lo = 0.0
    t_hi = float((hi[positive] / w[positive]).max())  # every positive unit at hi
    for _ in range(_BISECTION_ITERS):
        t_mid = 0.5 * (t_lo + t_hi)
        if float(filled(t_mid).sum()) < total:
            t_lo = t_mid
        else:
            t_hi = t_mid
        if t_hi - t_lo <= 1e-15 * max(1.0, t_hi):
            break
    x = filled(t_hi)
    # Bisection leaves a tiny residual; remove it from the units strictly inside
    # their bounds (proportionally to w, which keeps them on the same ray).
    residual = float(total) - float(x.sum())
    interior = (x > lo) & (x < hi)
    if residual != 0.0 and interior.any():
        x = x + torch.where(interior, w, torch.zeros_like(w)) * (residual / float(w[interior].sum()))
    return x, t_hi


def round_largest_remainder(
    continuous: torch.Tensor, total: int, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """Round a continuous allocation to integers with exactly ``total`` units.

    Floors every unit, then gives one extra unit to the largest remainders (lower
    position first on ties), never exceeding ``hi`` or going below ``lo``.
    """
    x = torch.minimum(torch.maximum(continuous.to(torch.float64), lo), hi)
    base = torch.floor(x)
    # Float noise can leave x a hair below an integer bound; never round below lo.
    base = torch.maximum(base, lo)
    deficit = int(total - int(base.sum().item()))
    remainder = torch.round((x - base) * 10**_REMAINDER_DECIMALS) / 10**_REMAINDER_DECIMALS
    eligible = base < hi
    if deficit > int(eligible.sum()):
        raise ValueError(f"cannot place {deficit} units: only {int(eligible.sum())} units have room")
    if deficit < 0:
        # Only possible through float noise pushing many floors up; take units back
        # from the smallest remainders among those above their lower bound.
        key = torch.where(base > lo, remainder, torch.full_like(remainder, float("inf")))
        order = _stable_argsort(key, descending=False)
        base[order[: -deficit]] -= 1
        return base.to(torch.int64)
    key = torch.where(eligible, remainder, torch.full_like(remainder, -1.0))
    order = _stable_argsort(key, descending=True)
    base[order[:deficit]] += 1
    return base.to(torch.int64)


def _stable_argsort(key: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.sort(key, descending=descending, stable=True).indices


def allocate_budget(
    weights: torch.Tensor,
    total: int,
    n_min: int | torch.Tensor,
    n_max: int | torch.Tensor,
    rule: Rule = "excess",
) -> Allocation:
    """Split ``total`` integer units over ``U`` units in proportion to ``weights``.

    Args:
        weights: non-negative float ``[U]``.
        total: the exact integer budget; must lie in ``[sum(n_min), sum(n_max)]``.
        n_min, n_max: per-unit integer bounds, scalars or ``[U]``.
        rule: ``"excess"`` (fill above the lower bounds in proportion to the
            weights) or ``"scaled"`` (``clip(t * w, lo, hi)``); see module doc.

    Returns:
        :class:`Allocation` with ``counts.sum() == total`` and
        ``n_min <= counts <= n_max``.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    num_units = w.numel()
    lo = _as_bounds(n_min, num_units, "n_min")
    hi = _as_bounds(n_max, num_units, "n_max")
    total = int(total)
    _validate(w, total, lo, hi)
    if num_units == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return Allocation(empty.to(torch.int64), empty, float("nan"))
    if rule == "excess":
        x, scale = _excess_fill(w, total, lo, hi), float("nan")
    elif rule == "scaled":
        x, scale = _scaled_fill(w, total, lo, hi)
    else:
        raise ValueError(f"unknown allocation rule {rule!r}; expected 'excess' or 'scaled'")
    counts = round_largest_remainder(x, total, lo, hi)
    return Allocation(counts=counts, continuous=x, scale=scale)
