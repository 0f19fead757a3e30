"""DynaMO, sequence level: variance-minimising rollout allocation (dynamo.md §1).

:class:`DynamoAllocator` splits a fixed rollout budget ``T = n_bar * P`` over
the ``P`` prompts of a step in proportion to ``priority ** power``, where the
priority is the (floored) unbiased Bernoulli variance of the prompt's success
read from the shared :class:`~nemo_gdro.algorithms.stats.PromptStatsStore`.
The integer split itself is :func:`~nemo_gdro.algorithms.allocate.allocate_budget`
(rule ``"excess"``), the same routine Rollout-GDRO uses for its bins.

Shapes follow ``CONVENTIONS.md``: per-prompt tensors are ``[P]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from nemo_gdro.algorithms.allocate import allocate_budget
from nemo_gdro.algorithms.configs import DynamoAllocationConfig
from nemo_gdro.algorithms.stats import PromptStatsStore

__all__ = ["DynamoAllocationConfig", "DynamoAllocation", "DynamoAllocator", "priority"]


# dynamo.md §1: the tiny (1 - acc) term breaks ties between zero-variance
# prompts in favour of the less solved ones before the floor takes over.
_UNSOLVED_BONUS = 1e-6


def priority(
    correct: torch.Tensor, rollouts: torch.Tensor, *, mastery: float = 0.85, floor: float = 0.01
) -> torch.Tensor:
    """DynaMO priority of each prompt from its counters (dynamo.md §1), float64 ``[P]``.

    ``acc = K / G``; mastered prompts (``acc >= mastery``) get ``floor``;
    otherwise ``max(v + 1e-6 (1 - acc), floor)`` with the unbiased Bernoulli
    variance ``v = K (G - K) / (G (G - 1))``.

    Args:
        correct: ``K [P]``, correct rollouts (may be fractional under counter decay).
        rollouts: ``G [P]``, rollouts generated.
    Returns:
        float64 ``[P]``, every value ``>= floor``. Prompts with ``G < 2`` have
        no variance estimate: ``v`` is taken as 0 there (and ``acc`` as 0 when
        ``G == 0``), so they get ``max(1e-6 (1 - acc), floor)``. The allocator
        never uses these values: such prompts are in warm-up.
    """
    k = torch.as_tensor(correct, dtype=torch.float64)
    g = torch.as_tensor(rollouts, dtype=torch.float64)
    if k.shape != g.shape:
        raise ValueError(f"correct and rollouts must have the same shape, got {tuple(k.shape)} and {tuple(g.shape)}")
    acc = torch.where(g > 0, k / g.clamp_min(1e-12), torch.zeros_like(g))
    # G (G - 1) is 0 for G in {0, 1}; the clamp only guards the unused branch.
    has_var = g >= 2
    v = torch.where(has_var, k * (g - k) / (g * (g - 1.0)).clamp_min(1e-12), torch.zeros_like(g))
    p = torch.clamp_min(v + _UNSOLVED_BONUS * (1.0 - acc), floor)
    return torch.where(acc >= mastery, torch.full_like(p, floor), p)


@dataclass(frozen=True)
class DynamoAllocation:
    """Result of :meth:`DynamoAllocator.allocate` (all tensors on CPU).

    counts: rollouts per batch position, int64 ``[P]``; sums to ``P * n_bar``.
    priorities: :func:`priority` of each position, float64 ``[P]`` (reported
        for warm-up prompts too, where they carry no weight).
    weights: the water-fill weights, float64 ``[P]``: ``priority ** power``,
        0 for warm-up prompts.
    in_warmup: bool ``[P]``, ``G < warmup``.
    rollouts_seen, correct_seen: the counters ``G``, ``K`` the decision used,
        float64 ``[P]`` (the epoch snapshot under ``refresh="every_epoch"``).
    warmup_oversubscribed: the warm-up demands exceeded the budget and were
        served in batch order (only possible when ``n_bar < warmup``).
    """

    counts: torch.Tensor
    priorities: torch.Tensor
    weights: torch.Tensor
    in_warmup: torch.Tensor
    rollouts_seen: torch.Tensor
    correct_seen: torch.Tensor
    warmup_oversubscribed: bool


class DynamoAllocator:
    """Per-step rollout allocation from the shared per-prompt counters (dynamo.md §1).

    The allocator only reads ``store``; the training loop calls
    ``store.observe`` once per step with the rollouts actually generated (keyed
    by ``prompt_id``, so credit follows the prompt whatever the batch order).

    With ``refresh="every_epoch"`` the counters are read from a snapshot of the
    store. A snapshot is taken at construction (the start of the first epoch:
    on a fresh store every prompt is unseen, i.e. in warm-up) and again by each
    :meth:`refresh_epoch` call, which the loop makes at every epoch start.
    Warm-up status is read from the same snapshot, so within an epoch a prompt
    drawn a second time is warmed up again; that costs some rollouts of the
    fixed budget but keeps every decision a function of the epoch-start view.
    The snapshot holds the store's float32 counters (8 bytes per local prompt).
    """

    def __init__(self, config: DynamoAllocationConfig, store: PromptStatsStore) -> None:
        self.config = config
        self.store = store
        self._snap_g: torch.Tensor | None = None
        self._snap_k: torch.Tensor | None = None
        if config.refresh == "every_epoch":
            self.refresh_epoch()

    # ------------------------------------------------------------- counters
    def _owned_ids(self) -> torch.Tensor:
        s = self.store
        return torch.arange(s.shard_rank, s.num_prompts, s.num_shards, dtype=torch.int64)

    def refresh_epoch(self) -> None:
        """Snapshot the store's counters for ``every_epoch`` refresh (no-op for ``every_step``)."""
        if self.config.refresh != "every_epoch":
            return
        g, k = self.store.counters(self._owned_ids())
        # The store keeps float32 counters, so the down-cast is exact.
        self._snap_g, self._snap_k = g.to(torch.float32), k.to(torch.float32)

    def counters(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, K)`` float64 ``[P]`` the next decision uses (live or snapshot)."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64).cpu()
        if self.config.refresh == "every_step":
            return self.store.counters(ids)
        assert self._snap_g is not None and self._snap_k is not None
        rows = self.store.local_index(ids)  # validates range and shard ownership
        return self._snap_g[rows].to(torch.float64), self._snap_k[rows].to(torch.float64)

    # ------------------------------------------------------------ allocation
    def allocate(self, prompt_ids: torch.Tensor) -> DynamoAllocation:
        """Rollouts per batch position for this step's prompts.

        Args:
            prompt_ids: int ``[P]`` stable prompt ids of the step (duplicates
                allowed: each position is allocated separately from the same
                counters).
        Returns:
            :class:`DynamoAllocation`; ``counts.sum() == P * n_bar`` exactly and
            ``n_min <= counts <= n_max``.

        Warm-up prompts (``G < warmup``) get the lower bound
        ``min(max(n_min, ceil(warmup - G)), n_max)`` and zero weight; the others get
        ``n_min`` and weight ``priority ** power``; every upper bound is
        ``n_max``. The rest of the budget is water-filled by
        :func:`allocate_budget` (rule ``"excess"``). If the warm-up bounds alone
        exceed the budget (only when ``n_bar < warmup``), everyone starts at
        ``n_min`` and the warm-up demands are served in batch order (lower
        position first) until the budget is spent, so the total stays exact.

        With ``warmup_compete`` a warm-up prompt instead gets the lower bound
        ``n_min`` and weight ``1.0`` when unseen (``G == 0``), else
        ``priority ** power``, and joins the water-fill.
        """
        cfg = self.config
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64).cpu()
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D [P], got shape {tuple(ids.shape)}")
        g, k = self.counters(ids)
        num = ids.numel()
        total = num * cfg.n_bar
        warmup = cfg.effective_warmup
        prio = priority(k, g, mastery=cfg.mastery, floor=cfg.floor)
        in_warmup = g < warmup
        if cfg.warmup_compete:
            # The release's behaviour: warm-up prompts compete, an unseen one at priority 1.0.
            weights = torch.where(g <= 0, torch.ones_like(prio), prio.pow(cfg.power))
            counts = allocate_budget(weights, total, cfg.n_min, cfg.n_max, rule="excess").counts
            return DynamoAllocation(
                counts=counts, priorities=prio, weights=weights, in_warmup=in_warmup, rollouts_seen=g,
                correct_seen=k, warmup_oversubscribed=False,
            )
        weights = torch.where(in_warmup, torch.zeros_like(prio), prio.pow(cfg.power))
        # ceil: decayed counters can be fractional; a warm-up prompt needs whole rollouts.
        # The cap at n_max keeps the bounds feasible when warmup > n_max (e.g. the
        # default max(n_min, 4) with n_max < 4); the prompt finishes warm-up later.
        need = torch.ceil(warmup - g).clamp(min=float(cfg.n_min), max=float(cfg.n_max))
        lo = torch.where(in_warmup, need, torch.full_like(g, float(cfg.n_min)))
        oversubscribed = bool(float(lo.sum()) > total)
        if oversubscribed:
            counts = self._serve_warmup_in_order(lo, total)
        else:
            counts = allocate_budget(weights, total, lo, cfg.n_max, rule="excess").counts
        return DynamoAllocation(
            counts=counts,
            priorities=prio,
            weights=weights,
            in_warmup=in_warmup,
            rollouts_seen=g,
            correct_seen=k,
            warmup_oversubscribed=oversubscribed,
        )

    def _serve_warmup_in_order(self, lo: torch.Tensor, total: int) -> torch.Tensor:
        """Everyone at ``n_min``; extra warm-up demand ``lo - n_min`` served by position."""
        n_min = self.config.n_min
        extra = (lo - n_min).to(torch.int64)
        spare = total - n_min * lo.numel()  # >= 0 since n_bar >= n_min
        # Demand served before position i is the exclusive prefix sum; each
        # position gets what is left of the spare budget, up to its demand.
        before = torch.cumsum(extra, 0) - extra
        served = torch.clamp(spare - before, min=0)
        served = torch.minimum(served, extra)
        return n_min + served

    # ----------------------------------------------------------- diagnostics
    def diagnostics(self, alloc: DynamoAllocation) -> dict[str, float]:
        """Scalars to log for one allocation (dynamo.md §5).

        ``n/min|max|mean|std`` (population std), ``budget_share/<band>`` = share
        of the step's rollouts given to prompts whose success rate ``K / G``
        lies in ``[0, .1)``, ``[.1, .9]``, ``(.9, 1]`` or that are unseen
        (``G == 0``), ``frac_at_n_min`` / ``frac_at_n_max`` (fraction of
        prompts at the bounds), ``frac_warmup`` and ``warmup_oversubscribed``.
        """
        cfg = self.config
        n = alloc.counts.to(torch.float64)
        if n.numel() == 0:
            return {}
        g, k = alloc.rollouts_seen, alloc.correct_seen
        unseen = g <= 0
        acc = torch.where(unseen, torch.zeros_like(g), k / g.clamp_min(1e-12))
        bands = {
            "budget_share/acc_lt_0.1": ~unseen & (acc < 0.1),
            "budget_share/acc_0.1_0.9": ~unseen & (acc >= 0.1) & (acc <= 0.9),
            "budget_share/acc_gt_0.9": ~unseen & (acc > 0.9),
            "budget_share/unseen": unseen,
        }
        total = float(n.sum())
        out = {
            "n/min": float(n.min()),
            "n/max": float(n.max()),
            "n/mean": float(n.mean()),
            "n/std": float(n.std(unbiased=False)),
        }
        for name, sel in bands.items():
            out[name] = float(n[sel].sum()) / total if total > 0 else 0.0
        out["frac_at_n_min"] = float((alloc.counts == cfg.n_min).double().mean())
        out["frac_at_n_max"] = float((alloc.counts == cfg.n_max).double().mean())
        out["frac_warmup"] = float(alloc.in_warmup.double().mean())
        out["warmup_oversubscribed"] = float(alloc.warmup_oversubscribed)
        return out

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Config and, under ``every_epoch``, the counter snapshot (the store saves itself)."""
        state: dict[str, Any] = {"config": asdict(self.config)}
        if self._snap_g is not None:
            state["snapshot_rollouts"] = self._snap_g.clone()
            state["snapshot_correct"] = self._snap_k.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "config" not in state:
            raise KeyError("dynamo allocator checkpoint is missing 'config'")
        saved = state["config"]
        known = {f.name for f in fields(DynamoAllocationConfig)}
        if set(saved) != known or DynamoAllocationConfig(**saved) != self.config:
            raise ValueError(
                f"dynamo allocator checkpoint was written with {saved}, this run uses {asdict(self.config)}"
            )
        if self.config.refresh != "every_epoch":
            return
        for key in ("snapshot_rollouts", "snapshot_correct"):
            if key not in state:
                raise KeyError(f"dynamo allocator checkpoint is missing {key!r}")
            if tuple(state[key].shape) != (self.store.num_local,):
                raise ValueError(
                    f"dynamo allocator {key!r} has shape {tuple(state[key].shape)}, "
                    f"the store holds {self.store.num_local} prompts"
                )
        self._snap_g = state["snapshot_rollouts"].to(torch.float32).clone()
        self._snap_k = state["snapshot_correct"].to(torch.float32).clone()
