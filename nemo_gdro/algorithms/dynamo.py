"""DynaMO: variance-minimising rollout allocation and gradient-aware advantage modulation.

Spec: ``shared/spec/dynamo.md`` (arXiv 2602.19208). Two independent parts:

1. Sequence level (§1): :class:`DynamoAllocator` splits a fixed rollout budget
   ``T = n_bar * P`` over the ``P`` prompts of a step in proportion to
   ``priority ** power``, where the priority is the (floored) unbiased Bernoulli
   variance of the prompt's success read from the shared
   :class:`~nemo_gdro.algorithms.stats.PromptStatsStore`. The integer split
   itself is :func:`~nemo_gdro.algorithms.allocate.allocate_budget` (rule
   ``"excess"``), the same routine Rollout-GDRO uses for its bins.
2. Token level (§2): :func:`modulate_advantages` rescales each token's
   advantage by a compensation factor (boost confident tokens of correct
   answers) and a stabilisation factor (brake the tokens whose update would
   move the policy entropy most, judged by the first-order entropy change
   :func:`entropy_change`). The normalisation statistics can span a whole
   optimizer mini-batch across micro-batches and data-parallel ranks through
   :class:`ModulationStats`.

Shapes follow ``CONVENTIONS.md``: per-prompt ``[P]``, token tensors ``[R, L]``
with a ``mask [R, L]``. Log-probabilities and entropies are in nats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.distributed as dist

from nemo_gdro.algorithms.allocate import allocate_budget
from nemo_gdro.algorithms.losses import policy_ratio
from nemo_gdro.algorithms.stats import PromptStatsStore

__all__ = [
    "DynamoAllocationConfig",
    "DynamoAllocation",
    "DynamoAllocator",
    "priority",
    "DynamoModulationConfig",
    "ModulationStats",
    "full_vocab_token_stats",
    "entropy_change",
    "compensation_factor",
    "stabilisation_factor",
    "modulation_stats",
    "modulate_advantages",
]

Refresh = Literal["every_step", "every_epoch"]
EbarMode = Literal["exact", "sequence_mean"]
Scope = Literal["minibatch", "microbatch"]

# dynamo.md §1: the tiny (1 - acc) term breaks ties between zero-variance
# prompts in favour of the less solved ones before the floor takes over.
_UNSOLVED_BONUS = 1e-6
# dynamo.md §2: guards of the two normalisations (ref-code constants).
_NORM_EPS = 1e-8
# Threshold for the "tokens braked" metric (dynamo.md §5).
_BRAKED_BELOW = 0.95


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# =========================================================================== #
# 1. Sequence level: rollout allocation
# =========================================================================== #
@dataclass(frozen=True)
class DynamoAllocationConfig:
    """``dynamo`` allocation options (dynamo.md §1).

    n_bar: mean rollouts per prompt; the step's budget is ``T = n_bar * P``.
    n_min, n_max: per-prompt bounds. ``n_min <= n_bar <= n_max`` is required so
        that clipping ``T`` to ``[P n_min, P n_max]`` never changes it (the
        spec rejects such a config instead of silently shrinking the budget).
    warmup: a prompt with fewer than ``warmup`` cumulative rollouts is in
        warm-up and first gets ``warmup - G`` rollouts (at most ``n_max`` per
        step: a larger demand is finished on the prompt's next draws);
        ``None`` means ``max(n_min, 4)`` (see :attr:`effective_warmup`).
    mastery: success rate at or above which a prompt gets the floor priority.
    floor: minimum priority (> 0): never-solved and mastered prompts keep it.
    power: weights are ``priority ** power``; 1.0 = ref-code (n grows with the
        variance), 0.5 = Neyman (n grows with the standard deviation).
    refresh: ``every_step`` reads the live counters; ``every_epoch`` reads a
        snapshot taken by :meth:`DynamoAllocator.refresh_epoch`.
    """

    n_bar: int = 16
    n_min: int = 8
    n_max: int = 24
    warmup: int | None = None
    mastery: float = 0.85
    floor: float = 0.01
    power: float = 1.0
    refresh: Refresh = "every_step"

    def __post_init__(self) -> None:
        for key in ("n_bar", "n_min", "n_max"):
            value = getattr(self, key)
            if not _is_int(value):
                raise ValueError(f"dynamo.{key} must be an integer, got {value!r}")
        if self.n_min < 1:
            raise ValueError(f"dynamo.n_min must be >= 1, got {self.n_min}")
        if self.n_max < self.n_min:
            raise ValueError(f"dynamo.n_max must be >= n_min ({self.n_min}), got {self.n_max}")
        if not self.n_min <= self.n_bar <= self.n_max:
            # T = n_bar * P clipped to [P n_min, P n_max] would differ from
            # n_bar * P: the run would not spend the compute it was configured for.
            raise ValueError(
                f"dynamo.n_bar must lie in [n_min, n_max] = [{self.n_min}, {self.n_max}] so the "
                f"budget n_bar * P is feasible as configured, got {self.n_bar}"
            )
        if self.warmup is not None:
            if not _is_int(self.warmup) or self.warmup < 1:
                raise ValueError(f"dynamo.warmup must be a positive integer or null, got {self.warmup!r}")
        if not _is_real(self.mastery) or not 0.0 < self.mastery <= 1.0:
            raise ValueError(f"dynamo.mastery must be in (0, 1], got {self.mastery!r}")
        if not _is_real(self.floor) or self.floor <= 0.0:
            raise ValueError(f"dynamo.floor must be a finite number > 0, got {self.floor!r}")
        if not _is_real(self.power) or self.power <= 0.0:
            raise ValueError(f"dynamo.power must be a finite number > 0, got {self.power!r}")
        if self.refresh not in ("every_step", "every_epoch"):
            raise ValueError(f"dynamo.refresh must be 'every_step' or 'every_epoch', got {self.refresh!r}")

    @property
    def effective_warmup(self) -> int:
        """Warm-up threshold in rollouts: ``warmup`` or ``max(n_min, 4)``."""
        return self.warmup if self.warmup is not None else max(self.n_min, 4)


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


# =========================================================================== #
# 2. Token level: advantage modulation
# =========================================================================== #
@dataclass(frozen=True)
class DynamoModulationConfig:
    """``dynamo`` token-level options (dynamo.md §2).

    alpha: compensation strength (``beta_comp`` in ``[1, 1 + alpha]``).
    lam_min: floor of the stabilisation factor (``beta_stab`` in ``(lam_min, 1]``).
    gamma, tau: steepness and centre of the brake's sigmoid in ``x = |dH| / max|dH|``.
    eps_low, eps_high: the clip range of the policy loss; a token outside it
        gets no gradient and so no entropy change.
    ebar: ``exact`` (``sum_a pi_a^2 (log pi_a + H)`` from the vocabulary pass)
        or ``sequence_mean`` (per-sequence mean of ``u``, ref-code option).
    scope: ``minibatch`` (H_min, H_max, max|dH| over the optimizer mini-batch
        across DP ranks: pass merged/reduced :class:`ModulationStats`) or
        ``microbatch`` (ref-code: statistics of each call's tokens).
    """

    alpha: float = 0.2
    lam_min: float = 0.6
    gamma: float = 50.0
    tau: float = 0.99
    eps_low: float = 0.2
    eps_high: float = 0.28
    ebar: EbarMode = "exact"
    scope: Scope = "minibatch"

    def __post_init__(self) -> None:
        if not _is_real(self.alpha) or self.alpha < 0.0:
            raise ValueError(f"dynamo.alpha must be a finite number >= 0, got {self.alpha!r}")
        if not _is_real(self.lam_min) or not 0.0 <= self.lam_min <= 1.0:
            raise ValueError(f"dynamo.lam_min must be in [0, 1], got {self.lam_min!r}")
        if not _is_real(self.gamma) or self.gamma <= 0.0:
            raise ValueError(f"dynamo.gamma must be a finite number > 0, got {self.gamma!r}")
        if not _is_real(self.tau) or self.tau <= 0.0:
            raise ValueError(f"dynamo.tau must be a finite number > 0, got {self.tau!r}")
        if not _is_real(self.eps_low) or not 0.0 < self.eps_low < 1.0:
            raise ValueError(f"dynamo.eps_low must be in (0, 1), got {self.eps_low!r}")
        if not _is_real(self.eps_high) or self.eps_high <= 0.0:
            raise ValueError(f"dynamo.eps_high must be a finite number > 0, got {self.eps_high!r}")
        if self.ebar not in ("exact", "sequence_mean"):
            raise ValueError(f"dynamo.ebar must be 'exact' or 'sequence_mean', got {self.ebar!r}")
        if self.scope not in ("minibatch", "microbatch"):
            raise ValueError(f"dynamo.scope must be 'minibatch' or 'microbatch', got {self.scope!r}")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # At least fp32 (bf16 entropies/log-probs are too coarse for the
    # normalisations); float64 inputs stay float64 (tests, reference checks).
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[R]`` advantages to ``[R, L]``; pass ``[R, L]`` through."""
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1).expand_as(like)
    if advantages.shape == like.shape:
        return advantages
    raise ValueError(f"advantages must have shape [R] or [R, L] = {tuple(like.shape)}, got {tuple(advantages.shape)}")


def _check_tokens(**tensors: torch.Tensor | None) -> torch.Size:
    shape = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 2:
            raise ValueError(f"{name} must be a [R, L] token tensor, got shape {tuple(t.shape)}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    assert shape is not None
    return shape


def full_vocab_token_stats(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference per-token statistics from full-vocabulary logits.

    With ``pi = softmax(logits / temperature)`` (computed in at least fp32):

    Args:
        logits: ``[..., V]`` raw logits.
        tokens: ``[...]`` int sampled token ids.
        temperature: the sampling temperature (> 0).
    Returns:
        ``(logp, entropy, ebar_exact)``, each ``[...]`` in nats:
        ``logp = log pi(token)``, ``entropy = H = -sum_a pi_a log pi_a`` and
        ``ebar_exact = sum_a pi_a^2 (log pi_a + H)``.

    This materialises ``[..., V]`` probabilities; it is the reference the
    vocabulary-parallel version is tested against.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    z = logits.to(_compute_dtype(logits)) / temperature
    log_pi = torch.log_softmax(z, dim=-1)
    pi = log_pi.exp()
    logp = torch.gather(log_pi, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    # pi * log pi -> 0 as pi -> 0; exp underflow gives pi = 0 with finite log_pi, so no NaN.
    entropy = -(pi * log_pi).sum(dim=-1)
    ebar = (pi * pi * (log_pi + entropy.unsqueeze(-1))).sum(dim=-1)
    return logp, entropy, ebar


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
    _check_tokens(logp=logp, logp_old=logp_old, entropy=entropy, mask=mask, ebar_exact=ebar_exact)
    if ebar_mode not in ("exact", "sequence_mean"):
        raise ValueError(f"ebar_mode must be 'exact' or 'sequence_mean', got {ebar_mode!r}")
    if ebar_mode == "exact" and ebar_exact is None:
        raise ValueError("ebar_mode='exact' needs ebar_exact (sum_a pi_a^2 (log pi_a + H) per token)")
    dtype = _compute_dtype(advantages, logp, logp_old, entropy, ebar_exact)
    valid = _bool_mask(mask)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    with torch.no_grad():
        # Padding may hold garbage; select (not multiply) so it cannot leak NaN/inf.
        lp = torch.where(valid, logp.detach().to(dtype), zero)
        lp_old = torch.where(valid, logp_old.detach().to(dtype), zero)
        h = torch.where(valid, entropy.detach().to(dtype), zero)
        adv = torch.where(valid, _token_advantages(advantages.detach().to(dtype), lp), zero)
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
        _check_tokens(entropy=entropy, dH=dH, mask=mask)
        valid = _bool_mask(mask)
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

    def reduce(self, group: Any = None, device: torch.device | str | None = None) -> ModulationStats:
        """All-reduce over a ``torch.distributed`` group (``None``: the default group).

        One ``all_reduce(MAX)`` of a float64 triple ``(-h_min, h_max,
        dh_absmax)``. ``device`` is where the buffer lives (a CUDA device for
        NCCL; CPU by default). Returns ``self`` unchanged when
        torch.distributed is not initialised and no group was given (one
        process is its own scope).
        """
        if not (dist.is_available() and dist.is_initialized()):
            if group is None:
                return self
            raise RuntimeError("ModulationStats.reduce: a group was given but torch.distributed is not initialised")
        buf = torch.tensor([-self.h_min, self.h_max, self.dh_absmax], dtype=torch.float64, device=device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        neg_h_min, h_max, dh_absmax = buf.tolist()
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
    valid = _bool_mask(mask)
    zero = torch.zeros((), dtype=dtype, device=dh.device)
    one = torch.ones((), dtype=dtype, device=dh.device)
    with torch.no_grad():
        h = torch.where(valid, entropy.detach().to(dtype), zero)
        if stats is None:
            stats = ModulationStats.from_tokens(h, dh, valid)
        adv = torch.where(valid, _token_advantages(advantages.detach().to(dtype), h), zero)

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
