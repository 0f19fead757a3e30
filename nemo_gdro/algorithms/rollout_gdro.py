"""Rollout-GDRO: the compute adversary that splits a fixed rollout budget over bins.

Spec: ``shared/spec/gdro.md`` §3 (controller), §4 (diagnostics), §6 (bugs of the
authors' release that this module must not have).

Every step the batch holds ``P`` prompts, each labelled with a difficulty bin
``b in [0, B)`` by the online classifier (``bins [P]``, computed for THIS step's
prompts). ``c_b`` is the number of the batch's prompts in bin ``b``. The
controller chooses rollouts per prompt ``n_i in [n_min, n_max]`` with the exact
budget ``sum_i n_i == P * n_bar`` ("compute neutral": as many rollouts as
uniform GRPO with ``n_bar`` rollouts per prompt).

Two modes (``rollout_gdro.mode``):

- ``sqrt`` (default): the square-root (Neyman) law. With a per-bin variance
  proxy ``v_b`` the continuous optimum of ``min sum_b c_b v_b / n_b`` under the
  budget is ``n_b = clip(sqrt(v_b / mu), n_min, n_max)``; the shadow price
  ``mu`` is found by bisection (:func:`~nemo_gdro.algorithms.allocate.allocate_budget`,
  rule ``"scaled"`` with ``w = sqrt(v)`` and ``mu = 1 / scale**2``), then the
  per-prompt values are rounded by largest remainder so the total is exact.
  All prompts of a bin carry the same continuous value, so each gets its
  floor or its ceil.
- ``bandit`` (the paper's controller): per bin, exponential weights over the
  arms ``n_min..n_max``; the joint plan maximises ``sum_b log p_b(n_b)`` under
  the exact budget by dynamic programming over bins on the integer total
  (multiple-choice knapsack, :func:`solve_arm_plan`). After the actor step the
  chosen arm's score moves towards the bin's utility minus the price of the
  compute it used, and the shadow price ``mu`` follows how far the
  unconstrained best arms are from the budget.

Shapes: per-prompt tensors ``[P]``, per-response ``[R]``, per-bin ``[B]``, arm
scores ``[B, K]`` with ``K = n_max - n_min + 1`` (arm ``k`` means ``n_min + k``
rollouts per prompt). Controller state lives on the CPU in float64: it is
tiny (``B * K`` numbers) and replicated on every rank; inputs on another device
are copied to the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nemo_gdro.algorithms._validation import is_int
from nemo_gdro.algorithms.allocate import allocate_budget
from nemo_gdro.algorithms.configs import MODES, PROXIES, SIGNS, RolloutGDROConfig
from nemo_gdro.algorithms.segments import (
    check_segment_index,
    segment_count,
    segment_mean,
    segment_sum,
)
from nemo_gdro.algorithms.stats import PromptStatsStore

__all__ = [
    "MODES",
    "PROXIES",
    "SIGNS",
    "RolloutGDROConfig",
    "RolloutPlan",
    "RolloutGDRO",
    "arm_log_probs",
    "solve_arm_plan",
]


# Variance used for a loss_var bin when no bin was ever observed: the largest
# Bernoulli variance p(1-p), i.e. "assume maximal uncertainty" (spec §3 brief).
_LOSS_VAR_PRIOR = 0.25

# Tie-break key for the largest-remainder rounding in sqrt mode (see
# ``_tie_order``): an affine map modulo the Mersenne prime 2**31 - 1. Both
# multipliers are below 2**31, so every product fits in int64 without overflow.
_HASH_MOD = 2_147_483_647
_HASH_MUL_ID = 48_271
_HASH_MUL_STEP = 69_621


# --------------------------------------------------------------------------- #
# plan
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class RolloutPlan:
    """One step's allocation (all tensors on the CPU).

    counts: rollouts per prompt, int64 ``[P]``; ``counts.sum() == P * n_bar`` and
        ``n_min <= counts <= n_max``.
    per_bin_n: mean rollouts per prompt of each bin, float64 ``[B]`` (nan where
        the bin has no prompt in the batch).
    mu: shadow price of the budget: ``1 / scale**2`` of the bisection in
        ``sqrt`` mode (0 when ``n_bar == n_max``, ``max_b v_b / n_min**2`` when
        ``n_bar == n_min``: there every prompt sits at one bound and the price
        is not unique), the controller's dual variable at allocation time in
        ``bandit`` mode.
    continuous: pre-rounding ``n_b``, float64 ``[B]`` (``sqrt`` mode); in
        ``bandit`` mode the chosen integer arm as float. nan for absent bins.
    bins: the bins this plan was made for, int64 ``[P]``.
    bin_counts: ``c_b``, prompts of the batch per bin, int64 ``[B]``.
    variance: the variance proxy ``v_b`` (floored) of present bins, float64
        ``[B]`` (nan for absent bins); ``sqrt(v_b)`` is the ``sigma_b`` of the
        standard-error diagnostic.
    arms: ``bandit`` mode: the chosen ``n_b`` per bin, int64 ``[B]`` (0 for absent
        bins); ``None`` in ``sqrt`` mode.
    plan_id: serial number issued by the controller; ``observe`` accepts each
        plan once.
    mode: the mode that produced the plan.
    """

    counts: torch.Tensor
    per_bin_n: torch.Tensor
    mu: float
    continuous: torch.Tensor
    bins: torch.Tensor
    bin_counts: torch.Tensor
    variance: torch.Tensor
    arms: torch.Tensor | None
    plan_id: int
    mode: str

    @property
    def active(self) -> torch.Tensor:
        """Bool ``[B]``: bins with at least one prompt in the batch."""
        return self.bin_counts > 0


# --------------------------------------------------------------------------- #
# bandit helpers
# --------------------------------------------------------------------------- #
def arm_log_probs(scores: torch.Tensor, eta: float, gamma: float) -> torch.Tensor:
    """``log p_b(n)`` with ``p_b = (1 - gamma) softmax(eta s_b) + gamma / K``.

    Args:
        scores: arm scores, float ``[B, K]``.
    Returns:
        float64 ``[B, K]``. Computed in log space (``logaddexp``) so that an arm
        whose softmax mass underflows keeps a finite log-probability: with
        ``gamma = 0`` a plan is never declared infeasible by underflow.
    """
    s = scores.to(torch.float64)
    k = s.shape[-1]
    log_soft = torch.log_softmax(eta * s, dim=-1)
    # log(0) = -inf is fine here: logaddexp(x, -inf) == x.
    log_mix = torch.tensor(math.log1p(-gamma) if gamma < 1 else -math.inf, dtype=torch.float64)
    log_unif = torch.tensor(math.log(gamma / k) if gamma > 0 else -math.inf, dtype=torch.float64)
    return torch.logaddexp(log_mix + log_soft, log_unif.expand_as(log_soft))


def solve_arm_plan(
    log_probs: torch.Tensor, bin_counts: torch.Tensor, n_min: int, n_bar: int, total: int
) -> torch.Tensor:
    """Joint arm choice of the bandit: a multiple-choice knapsack solved exactly.

    Maximises ``sum_a log_probs[a, k_a]`` subject to
    ``sum_a bin_counts[a] * (n_min + k_a) == total`` by dynamic programming over
    the bins ``a`` on the integer total ``t in [0, total]``; each bin's step is
    vectorised over ``[K, total + 1]``.

    Tie-breaking is deterministic and lexicographic: among plans with exactly
    equal objective, the one closest to uniform (smallest
    ``sum_a c_a (n_a - n_bar)**2``, an integer so it compares exactly) wins; any
    tie left goes to the smaller arm of the later bin. With equal scores in
    every bin this picks the uniform plan ``n_a = n_bar``.

    Args:
        log_probs: float64 ``[A, K]``, the arm log-probabilities of the A bins
            that take part (every bin with ``c_a > 0``).
        bin_counts: int64 ``[A]``, ``c_a > 0``.
        n_min: value of arm 0.
        n_bar: the budget per prompt (for the tie-break only).
        total: the exact budget in rollouts.
    Returns:
        int64 ``[A]``: the chosen ``n_a`` (not the arm index).
    Raises:
        ValueError: if no plan meets the budget exactly.
    """
    num_bins, num_arms = log_probs.shape
    arms = torch.arange(n_min, n_min + num_arms, dtype=torch.int64)
    if bin_counts.shape != (num_bins,) or (bin_counts <= 0).any():
        raise ValueError(f"bin_counts must be [{num_bins}] positive integers, got {bin_counts.tolist()}")
    # Every prompt gets at least n_min, so the DP only tracks the units above it:
    # the state axis shrinks from P * n_bar to P * (n_bar - n_min) + 1 entries.
    excess_total = total - n_min * int(bin_counts.sum())
    if excess_total < 0:
        raise ValueError(f"no plan meets the budget {total} exactly with bin counts {bin_counts.tolist()}")
    steps = arms - n_min
    t_axis = torch.arange(excess_total + 1, dtype=torch.int64)
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
    pos_inf = torch.tensor(math.inf, dtype=torch.float64)
    # value[t]: best objective of the bins processed so far spending exactly t;
    # dev[t]: the tie-break (squared deviation from uniform) of that best plan.
    value = torch.full((excess_total + 1,), -math.inf, dtype=torch.float64)
    value[0] = 0.0
    dev = torch.zeros(excess_total + 1, dtype=torch.float64)
    choice = torch.zeros(num_bins, excess_total + 1, dtype=torch.int64)
    for a in range(num_bins):
        c = int(bin_counts[a])
        src = t_axis[None, :] - c * steps[:, None]  # [K, T+1]: excess before this bin
        valid = src >= 0
        src = src.clamp_min(0)
        cand_v = torch.where(valid, value[src] + log_probs[a].to(torch.float64)[:, None], neg_inf)
        cand_d = torch.where(
            valid, dev[src] + float(c) * (arms - n_bar).to(torch.float64)[:, None] ** 2, pos_inf
        )
        best_v = cand_v.max(dim=0).values
        # Exact ties on the objective are decided by closeness to uniform; argmin
        # returns the first (smallest) arm when that ties too.
        tied = (cand_v == best_v[None, :]) & torch.isfinite(cand_v)
        k_star = torch.where(tied, cand_d, pos_inf).argmin(dim=0)
        choice[a] = k_star
        feasible = torch.isfinite(best_v)
        value = best_v
        dev = torch.where(feasible, cand_d.gather(0, k_star[None, :])[0], pos_inf)
    if not math.isfinite(float(value[excess_total])):
        raise ValueError(f"no plan meets the budget {total} exactly with bin counts {bin_counts.tolist()}")
    # Walk back from the full budget.
    plan = torch.zeros(num_bins, dtype=torch.int64)
    t = excess_total
    for a in range(num_bins - 1, -1, -1):
        k = int(choice[a, t])
        plan[a] = int(arms[k])
        t -= int(bin_counts[a]) * int(steps[k])
    assert t == 0, "DP backtrack did not end at zero budget"
    return plan


def _free_best_arms(log_probs: torch.Tensor, arms: torch.Tensor, n_bar: int) -> torch.Tensor:
    """Unconstrained best arm ``argmax_n p_b(n)`` per bin, int64 ``[B]``.

    Exact ties go to the arm closest to ``n_bar`` (then the smaller one), the
    same preference as the DP, so untrained (equal) scores give ``n_bar`` and
    leave ``mu`` where it is.
    """
    best = log_probs.max(dim=-1, keepdim=True).values
    tied = log_probs == best
    distance = (arms - n_bar).abs().to(torch.float64).expand_as(log_probs)
    k = torch.where(tied, distance, torch.full_like(distance, math.inf)).argmin(dim=-1)
    return arms[k]


# --------------------------------------------------------------------------- #
# controller
# --------------------------------------------------------------------------- #
class RolloutGDRO:
    """Rollout-GDRO controller (gdro.md §3).

    Use per step: ``plan = ctl.allocate(prompt_ids, bins)`` before generation;
    generate ``plan.counts[i]`` rollouts for prompt ``i``; after the actor update
    ``ctl.observe(response_bins, signal, plan, bins, group_index=...)`` exactly
    once; log ``ctl.diagnostics(plan)``.

    Args:
        config: :class:`RolloutGDROConfig`.
        num_bins: ``B``, the number of difficulty bins.
        store: the per-prompt statistics store, read (never written) for the
            ``bernoulli`` proxy; may be ``None`` with ``proxy="loss_var"``.
    """

    _STATE_KEYS = (
        "scores",
        "mu",
        "loss_var_ema",
        "loss_var_seen",
        "next_plan_id",
        "last_observed_plan_id",
        "num_updates",
    )

    def __init__(self, config: RolloutGDROConfig, num_bins: int, store: PromptStatsStore | None) -> None:
        if not (is_int(num_bins) and num_bins >= 1):
            raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
        if config.proxy == "bernoulli" and store is None:
            raise ValueError("rollout_gdro.proxy 'bernoulli' reads success rates from a PromptStatsStore; got store=None")
        self.config = config
        self.num_bins = int(num_bins)
        self.store = store
        self.arms = config.arms
        # Arm scores s [B, K]; zeros = uniform arm distribution.
        self.scores = torch.zeros(self.num_bins, config.num_arms, dtype=torch.float64)
        self.mu = float(config.mu_init)
        self.loss_var_ema = torch.zeros(self.num_bins, dtype=torch.float64)
        self.loss_var_seen = torch.zeros(self.num_bins, dtype=torch.bool)
        # Plan serial numbers: each plan may be observed once, and only plans
        # newer than the last observed one (no state updated twice per step).
        self.next_plan_id = 0
        self.last_observed_plan_id = -1
        self.num_updates = 0

    # ---------------------------------------------------------------- helpers
    def arm_log_probs(self) -> torch.Tensor:
        """``log p_b(n)`` of the current scores, float64 ``[B, K]``."""
        return arm_log_probs(self.scores, self.config.eta, self.config.gamma)

    def _check_bins(self, bins: torch.Tensor, name: str) -> torch.Tensor:
        b = torch.as_tensor(bins).detach().cpu()
        if b.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(b.shape)}")
        if b.dtype.is_floating_point or b.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {b.dtype}")
        b = b.to(torch.int64)
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= self.num_bins):
            raise ValueError(f"{name} values must lie in [0, {self.num_bins}), got [{int(b.min())}, {int(b.max())}]")
        return b

    def bin_variance(self, prompt_ids: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Variance proxy ``v_b`` of this batch, float64 ``[B]`` (nan for absent bins).

        ``bernoulli``: mean over the batch's prompts in bin b of ``p (1 - p)``,
        p the per-rollout success rate from the store's cumulative counters
        (``unseen_success`` for unseen prompts). ``loss_var``: the EMA state;
        a never-observed bin takes the mean of the observed bins (0.25 if none).
        Both are floored at ``v_floor``.
        """
        cfg = self.config
        present = segment_count(bins, self.num_bins) > 0
        if cfg.proxy == "bernoulli":
            assert self.store is not None
            p = self.store.success_rate(prompt_ids, unseen=cfg.unseen_success)
            v = segment_mean(p * (1.0 - p), bins, self.num_bins)
        else:
            if self.loss_var_seen.any():
                fallback = float(self.loss_var_ema[self.loss_var_seen].mean())
            else:
                fallback = _LOSS_VAR_PRIOR
            v = torch.where(self.loss_var_seen, self.loss_var_ema, torch.full_like(self.loss_var_ema, fallback))
        v = v.clamp_min(cfg.v_floor)
        return torch.where(present, v, torch.full_like(v, math.nan))

    def _tie_order(self, prompt_ids: torch.Tensor, plan_id: int) -> torch.Tensor:
        """Order in which prompts receive the leftover units of the rounding.

        ``allocate_budget`` gives equal remainders to the lower position first.
        Within a bin all remainders are equal, so the batch order would decide
        which prompts get the ceil: permuting the batch would change the plan
        and the first positions would always win. Ordering the units by a key
        of ``(prompt_id, step)`` instead makes the plan a function of the
        prompts (a permuted batch gets the permuted counts) and rotates the
        winners from step to step.
        """
        ids = prompt_ids.remainder(_HASH_MOD)
        key = (ids * _HASH_MUL_ID + (plan_id % _HASH_MOD) * _HASH_MUL_STEP) % _HASH_MOD
        return torch.sort(key, stable=True).indices

    # --------------------------------------------------------------- allocate
    def allocate(self, prompt_ids: torch.Tensor, bins: torch.Tensor) -> RolloutPlan:
        """Rollouts per prompt for this step's batch.

        ``sqrt`` mode: weights ``sqrt(v_b)`` per prompt go to ``allocate_budget``
        (rule ``"scaled"``), which finds the scale ``t`` of
        ``sum_i clip(t sqrt(v_{b(i)}), n_min, n_max) = P * n_bar`` by bisection
        (the sum is monotone in ``t``) and rounds by largest remainder. All
        prompts of a bin share one continuous ``n_b``, so each gets its floor
        or ceil and the total is exact; which prompts of a bin get the ceil is
        decided by :meth:`_tie_order`. ``bandit`` mode: the DP of
        :func:`solve_arm_plan` over the bins present in the batch.

        Args:
            prompt_ids: int ``[P]`` dataset ids of this step's prompts.
            bins: int64 ``[P]`` difficulty bins of THESE prompts (classified from
                statistics up to the previous step), values in ``[0, B)``.
        Returns:
            :class:`RolloutPlan` with ``counts.sum() == P * n_bar`` exactly.
        """
        cfg = self.config
        ids = torch.as_tensor(prompt_ids).detach().cpu().to(torch.int64)
        b = self._check_bins(bins, "bins")
        if ids.dim() != 1 or ids.shape != b.shape:
            raise ValueError(f"prompt_ids and bins must both be [P], got {tuple(ids.shape)} and {tuple(b.shape)}")
        num_prompts = b.numel()
        if num_prompts == 0:
            raise ValueError("allocate needs at least one prompt")
        total = num_prompts * cfg.n_bar
        bin_counts = segment_count(b, self.num_bins)
        present = bin_counts > 0
        nan_b = torch.full((self.num_bins,), math.nan, dtype=torch.float64)
        variance = self.bin_variance(ids, b)
        plan_id = self.next_plan_id

        if cfg.mode == "sqrt":
            # Neyman weight per prompt: sqrt of its bin's variance proxy.
            weights = variance.sqrt()[b]
            order = self._tie_order(ids, plan_id)
            alloc = allocate_budget(weights[order], total, cfg.n_min, cfg.n_max, rule="scaled")
            counts = torch.empty_like(alloc.counts)
            counts[order] = alloc.counts
            cont = torch.empty_like(alloc.continuous)
            cont[order] = alloc.continuous
            # n_b = sqrt(v_b / mu) <=> n_b = scale * sqrt(v_b): mu = 1/scale^2.
            # The price is unique while some bin lies strictly inside its bounds.
            # The degenerate budgets n_bar == n_max / n_min put every prompt at
            # one bound; any mu in [0, v_min / n_max^2] resp. [v_max / n_min^2,
            # inf) supports them, and we report the least extreme end (0 resp.
            # v_max / n_min^2; the bisection itself would run to scale 0).
            if cfg.n_bar == cfg.n_max or not math.isfinite(alloc.scale):
                mu = 0.0
            elif cfg.n_bar == cfg.n_min:
                mu = float(variance[present].max()) / cfg.n_min**2
            else:
                mu = 1.0 / alloc.scale**2
            continuous = torch.where(present, segment_mean(cont, b, self.num_bins), nan_b)
            arms = None
        else:
            active = torch.nonzero(present).flatten()
            log_p = self.arm_log_probs()[active]
            chosen = solve_arm_plan(log_p, bin_counts[active], cfg.n_min, cfg.n_bar, total)
            arms = torch.zeros(self.num_bins, dtype=torch.int64)
            arms[active] = chosen
            counts = arms[b]
            mu = float(self.mu)
            continuous = torch.where(present, arms.to(torch.float64), nan_b)

        per_bin_n = torch.where(
            present, segment_sum(counts.to(torch.float64), b, self.num_bins) / bin_counts.clamp_min(1), nan_b
        )
        self.next_plan_id += 1
        return RolloutPlan(
            counts=counts,
            per_bin_n=per_bin_n,
            mu=float(mu),
            continuous=continuous,
            bins=b.clone(),
            bin_counts=bin_counts,
            variance=variance,
            arms=arms,
            plan_id=plan_id,
            mode=cfg.mode,
        )

    # ---------------------------------------------------------------- observe
    def observe(
        self,
        bins: torch.Tensor,
        signal: torch.Tensor,
        plan: RolloutPlan,
        prompt_bins: torch.Tensor,
        *,
        group_index: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Update the controller once after the actor step of ``plan``'s step.

        Args:
            bins: int64 ``[R]`` bin of each response's prompt.
            signal: float ``[R]`` detached per-response loss signal
                (``prompt_gdro.signal``; lower is better for the ``utility`` sign).
            plan: the plan this step's rollouts were generated with.
            prompt_bins: int64 ``[P]`` bins of the step's prompts; must be the
                bins the plan was made for (guards against labels of another
                step, gdro.md §6.1).
            group_index: int64 ``[R]`` response -> prompt position; required by
                the ``loss_var`` proxy (per-prompt mean signals) and, when given,
                checked against ``bins``.
        Returns:
            Scalars for logging: ``mu``, ``n_free`` (bandit) and the number of
            bins updated.
        Raises:
            RuntimeError: if ``plan`` was already observed, is older than the
                last observed plan, or was not issued by this controller.
        """
        cfg = self.config
        if not (0 <= plan.plan_id < self.next_plan_id):
            raise RuntimeError(
                f"rollout_gdro.observe: plan {plan.plan_id} was not issued by this controller "
                f"(next plan id {self.next_plan_id})"
            )
        if plan.plan_id <= self.last_observed_plan_id:
            raise RuntimeError(
                f"rollout_gdro.observe: plan {plan.plan_id} is already observed (last observed plan "
                f"{self.last_observed_plan_id}); each step's state is updated exactly once"
            )
        if plan.mode != cfg.mode:
            raise ValueError(f"plan was made in mode {plan.mode!r}, controller is in mode {cfg.mode!r}")
        r_bins = self._check_bins(bins, "bins")
        p_bins = self._check_bins(prompt_bins, "prompt_bins")
        if not torch.equal(p_bins, plan.bins):
            raise ValueError(
                "prompt_bins differ from the bins the plan was allocated with: the plan must be "
                "observed with the labels of its own step's prompts"
            )
        sig = torch.as_tensor(signal).detach().cpu().to(torch.float64)
        if sig.shape != r_bins.shape:
            raise ValueError(f"signal and bins must both be [R], got {tuple(sig.shape)} and {tuple(r_bins.shape)}")
        if not torch.isfinite(sig).all():
            raise ValueError("signal must be finite")
        if r_bins.numel() and not bool(plan.active[r_bins].all()):
            raise ValueError("responses carry bins that have no prompt in the plan")
        gi = None
        if group_index is not None:
            gi = torch.as_tensor(group_index).detach().cpu().to(torch.int64)
            if gi.shape != r_bins.shape:
                raise ValueError(f"group_index must be [R]={tuple(r_bins.shape)}, got {tuple(gi.shape)}")
            check_segment_index(gi, p_bins.numel())
            if not torch.equal(p_bins[gi], r_bins):
                raise ValueError("bins of the responses disagree with prompt_bins[group_index]")
        elif cfg.proxy == "loss_var":
            raise ValueError("rollout_gdro.proxy 'loss_var' needs group_index [R] to form per-prompt mean signals")

        out: dict[str, float] = {}
        resp_per_bin = segment_count(r_bins, self.num_bins)
        if cfg.mode == "bandit":
            out.update(self._observe_bandit(r_bins, sig, plan, resp_per_bin))
        if cfg.proxy == "loss_var":
            assert gi is not None
            out["rollout_gdro/loss_var_updated_bins"] = float(self._observe_loss_var(sig, gi, p_bins))
        self.last_observed_plan_id = plan.plan_id
        self.num_updates += 1
        out["rollout_gdro/mu"] = float(self.mu)
        return out

    def _observe_bandit(
        self, r_bins: torch.Tensor, sig: torch.Tensor, plan: RolloutPlan, resp_per_bin: torch.Tensor
    ) -> dict[str, float]:
        cfg = self.config
        assert plan.arms is not None
        mean_signal = segment_mean(sig, r_bins, self.num_bins)
        # J_b = -mean loss (paper "utility"); the ref-code's "adversarial" sign
        # rewards the arms of bins whose loss is high.
        utility = -mean_signal if cfg.sign == "utility" else mean_signal
        # Only bins that had prompts AND returned responses carry information.
        updated = plan.active & (resp_per_bin > 0)
        idx = torch.nonzero(updated).flatten()
        n_b = plan.arms[idx]
        k_b = n_b - cfg.n_min
        # arm loss = -J_b + mu (n_b - n_bar): compute above the budget is priced at mu.
        arm_loss = -utility[idx] + self.mu * (n_b - cfg.n_bar).to(torch.float64)
        old = self.scores[idx, k_b]
        self.scores[idx, k_b] = (1.0 - cfg.score_decay) * old + cfg.score_decay * (-arm_loss)

        # Shadow price from the UPDATED scores. The literal residual
        # "realised minus budget" is identically 0 under the exact DP, so mu
        # follows how far the unconstrained best arms sit from n_bar [choice].
        active = plan.active
        free = _free_best_arms(self.arm_log_probs(), self.arms, cfg.n_bar)
        c = plan.bin_counts.to(torch.float64)
        n_free = float((c[active] * free[active].to(torch.float64)).sum() / c[active].sum())
        self.mu = float(min(max(self.mu + cfg.alpha_mu * (n_free - cfg.n_bar), 0.0), cfg.mu_max))
        return {"rollout_gdro/n_free": n_free, "rollout_gdro/score_updated_bins": float(idx.numel())}

    def _observe_loss_var(self, sig: torch.Tensor, gi: torch.Tensor, p_bins: torch.Tensor) -> int:
        """EMA of the across-prompt variance of per-prompt mean signals, per bin."""
        num_prompts = p_bins.numel()
        per_prompt = segment_mean(sig, gi, num_prompts)
        has = segment_count(gi, num_prompts) > 0
        pb = p_bins[has]
        x = per_prompt[has]
        k = segment_count(pb, self.num_bins).to(torch.float64)
        mean = segment_sum(x, pb, self.num_bins) / k.clamp_min(1)
        sq = segment_sum((x - mean[pb]) ** 2, pb, self.num_bins)
        # Unbiased (Bessel) variance: bins hold few prompts, and a single prompt
        # says nothing about the spread, so bins with < 2 prompts are skipped.
        ok = k >= 2
        var = sq / (k - 1).clamp_min(1)
        beta = self.config.loss_var_beta
        blended = torch.where(self.loss_var_seen, (1 - beta) * self.loss_var_ema + beta * var, var)
        self.loss_var_ema = torch.where(ok, blended, self.loss_var_ema)
        self.loss_var_seen = self.loss_var_seen | ok
        return int(ok.sum())

    # ------------------------------------------------------------ diagnostics
    def diagnostics(self, plan: RolloutPlan, bins: torch.Tensor | None = None) -> dict[str, float]:
        """Scalars to log for ``plan`` (gdro.md §4).

        Keys (``rollout_gdro/`` prefix): ``mu``; ``alloc_entropy`` (nats, of
        the budget shares); ``frac_at_n_min`` / ``frac_at_n_max`` (of prompts);
        per bin ``n_b/{b}`` (nan if absent), ``budget_share/{b}`` (rollouts of
        bin b / budget), ``prompt_share/{b}``, ``v_b/{b}``; ``se_proxy`` =
        ``(1/P) sum_i sigma_{b(i)} / sqrt(n_i)`` (= ``sum_b share_b sigma_b /
        sqrt(n_b)`` when a bin's prompts share n), ``se_proxy_uniform`` (the same
        at ``n_i = n_bar``) and their ratio ``se_ratio``; ``var_ratio`` =
        ``sum_i v_{b(i)} / n_i`` over its uniform value (the objective of the
        square-root law, < 1 means better than uniform).

        Args:
            plan: the step's plan.
            bins: optional ``[P]`` bins; must equal ``plan.bins`` if given.
        """
        cfg = self.config
        b = plan.bins if bins is None else self._check_bins(bins, "bins")
        if not torch.equal(b, plan.bins):
            raise ValueError("diagnostics: bins differ from the bins the plan was allocated with")
        counts = plan.counts.to(torch.float64)
        total = float(counts.sum())
        num_prompts = b.numel()
        budget = segment_sum(counts, b, self.num_bins) / total
        nz = budget[budget > 0]
        out: dict[str, float] = {
            "rollout_gdro/mu": float(plan.mu),
            "rollout_gdro/alloc_entropy": float(-(nz * nz.log()).sum()),
            "rollout_gdro/frac_at_n_min": float((plan.counts == cfg.n_min).to(torch.float64).mean()),
            "rollout_gdro/frac_at_n_max": float((plan.counts == cfg.n_max).to(torch.float64).mean()),
        }
        for j in range(self.num_bins):
            out[f"rollout_gdro/n_b/{j}"] = float(plan.per_bin_n[j])
            out[f"rollout_gdro/budget_share/{j}"] = float(budget[j])
            out[f"rollout_gdro/prompt_share/{j}"] = float(plan.bin_counts[j]) / num_prompts
            out[f"rollout_gdro/v_b/{j}"] = float(plan.variance[j])
        v_i = plan.variance[b]
        sigma_i = v_i.sqrt()
        se = float((sigma_i / counts.sqrt()).mean())
        se_uni = float(sigma_i.mean() / math.sqrt(cfg.n_bar))
        var = float((v_i / counts).sum())
        var_uni = float(v_i.sum() / cfg.n_bar)
        out["rollout_gdro/se_proxy"] = se
        out["rollout_gdro/se_proxy_uniform"] = se_uni
        out["rollout_gdro/se_ratio"] = se / se_uni
        out["rollout_gdro/var_ratio"] = var / var_uni
        return out

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars only (``torch.save``-able)."""
        return {
            "scores": self.scores.clone(),
            "mu": float(self.mu),
            "loss_var_ema": self.loss_var_ema.clone(),
            "loss_var_seen": self.loss_var_seen.clone(),
            "next_plan_id": int(self.next_plan_id),
            "last_observed_plan_id": int(self.last_observed_plan_id),
            "num_updates": int(self.num_updates),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; validates keys, shapes and ranges first."""
        name = "RolloutGDRO.load_state_dict"
        missing = [k for k in self._STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"{name}: missing keys {missing} (expected {list(self._STATE_KEYS)})")
        expected = {
            "scores": (self.num_bins, self.config.num_arms),
            "loss_var_ema": (self.num_bins,),
            "loss_var_seen": (self.num_bins,),
        }
        tensors = {}
        for key, shape in expected.items():
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: {key!r} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{name}: {key!r} has shape {tuple(value.shape)}, expected {shape} "
                    f"(num_bins={self.num_bins}, arms {self.config.n_min}..{self.config.n_max})"
                )
            tensors[key] = value.detach().cpu()
        if not torch.isfinite(tensors["scores"].to(torch.float64)).all():
            raise ValueError(f"{name}: 'scores' must be finite")
        mu = float(state["mu"])
        if not (math.isfinite(mu) and 0.0 <= mu <= self.config.mu_max):
            raise ValueError(f"{name}: 'mu' must be in [0, {self.config.mu_max}], got {mu}")
        next_id, last_id = int(state["next_plan_id"]), int(state["last_observed_plan_id"])
        # Every observed plan was issued before: -1 <= last observed < next id.
        if not -1 <= last_id < next_id:
            raise ValueError(
                f"{name}: inconsistent plan counters next_plan_id={next_id}, last_observed_plan_id={last_id}"
            )
        self.scores = tensors["scores"].to(torch.float64).clone()
        self.loss_var_ema = tensors["loss_var_ema"].to(torch.float64).clone()
        self.loss_var_seen = tensors["loss_var_seen"].to(torch.bool).clone()
        self.mu = mu
        self.next_plan_id = next_id
        self.last_observed_plan_id = last_id
        self.num_updates = int(state["num_updates"])
