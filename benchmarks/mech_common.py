"""What M1 and M2 share: the cached pool, replicate draws with common random numbers, the estimators
as the trainer forms them, the project's controllers built from the run's config, and paired statistics.

Notation: the pool has ``N`` prompts with ``K`` cached rollouts each; rollout ``j`` of
prompt ``i`` is row ``i * K + j`` of the cache. A replicate is one simulated step:
a uniform draw of prompts (the walk order ``order``) and, per pool prompt, one
random permutation of its ``K`` rollouts (``perm [N, K]``); a method that gives
prompt ``i`` ``n`` rollouts takes the first ``n`` of ``perm[i]`` (an occurrence
``o`` of a prompt drawn twice takes the next ``n``), so methods are compared on
the same draws (common random numbers) and differences are paired per replicate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nemo_gdro.algorithms.advantages import grpo_advantages
from nemo_gdro.algorithms.stats import PromptStatsStore

Z95 = 1.959963984540054


# ------------------------------------------------------------------ the pool
@dataclass
class Pool:
    """The cache of one checkpoint, in the shapes the parts use."""

    cache: dict[str, Any]
    rewards: torch.Tensor  # float64 [N, K]
    correct: torch.Tensor  # bool [N, K]
    tokens: torch.Tensor  # float64 [N, K] response tokens (the token-mean normaliser)
    masked: torch.Tensor  # bool [N, K] rows the run's loss masks (reward.mask_truncated and truncated)
    sketch: torch.Tensor  # float32 [N*K, D]
    setup: Any  # AlgorithmSetup of the run (its own stages)
    n_bar: int
    prompts_per_step: int
    bins: torch.Tensor  # int64 [N] the classifier's bins of the pool at the checkpoint
    seed: int

    @property
    def num_prompts(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def k(self) -> int:
        return int(self.rewards.shape[1])

    def store(self) -> PromptStatsStore:
        """A fresh copy of the checkpoint's pass-rate store (controllers read it; nothing here writes it)."""
        s = PromptStatsStore(int(self.cache["pool_size"]), self.setup.stats)
        s.load_state_dict(self.cache["store_state"])
        return s

    def setup_with(self, **stages: str) -> Any:
        """The run's ``AlgorithmSetup`` with other stages selected (so their sections are built and checked)."""
        from nemo_gdro.stages.setup import AlgorithmSetup

        algorithm = {**self.cache["algorithm"], **stages}
        return AlgorithmSetup.from_dict(algorithm, n_bar=self.n_bar, reward_range=tuple(self.cache["reward_range"]))


def load_pool(cache: dict[str, Any]) -> Pool:
    from nemo_gdro.stages.setup import AlgorithmSetup

    n_bar = int(cache["n_bar"])
    setup = AlgorithmSetup.from_dict(cache["algorithm"], n_bar=n_bar, reward_range=tuple(cache["reward_range"]))
    rewards = cache["train_rewards"].to(torch.float64)
    if cache["pool_size"] != rewards.shape[0]:
        raise ValueError(
            f"the cache holds {rewards.shape[0]} of the pool's {cache['pool_size']} prompts: the parts need the whole pool"
        )
    return Pool(
        cache=cache,
        rewards=rewards,
        correct=cache["train_correct"].to(torch.bool),
        tokens=cache["train_tokens"].to(torch.float64),
        masked=(cache["train_truncated"].to(torch.bool) if cache.get("mask_truncated") else
                torch.zeros(rewards.shape, dtype=torch.bool)),
        sketch=cache["train_sketch"],
        setup=setup,
        n_bar=n_bar,
        prompts_per_step=int(cache["prompts_per_step"]),
        bins=cache["pool_bins"].to(torch.int64),
        seed=int(cache["seed"]),
    )


# ------------------------------------------------------------- replicates
@dataclass
class Replicate:
    """One simulated step's random numbers: the prompt walk order ``[N]`` and rollout permutations ``[N, K]``."""

    index: int
    order: np.ndarray
    perm: np.ndarray
    rng: np.random.Generator  # for the methods' own draws (resampling, exploration), after order and perm

    def batch(self, num: int) -> np.ndarray:
        """The first ``num`` prompts of the walk: what the uniform sampler draws for a step of ``num`` prompts."""
        return self.order[:num]


def replicate(pool: Pool, seed: int, index: int) -> Replicate:
    rng = np.random.default_rng([int(seed), int(index), 7919])
    order = rng.permutation(pool.num_prompts)
    perm = np.argsort(rng.random((pool.num_prompts, pool.k)), axis=1)
    return Replicate(index, order, perm, rng)


@dataclass
class Selection:
    """The rollouts a method trains on: groups (prompt id, the rows of its rollouts), and a weight per group.

    rows: int64 ``[R]`` cache rows; group: int64 ``[R]`` group position in ``[0, G)``;
    prompt: int64 ``[G]`` pool id of each group; mult: float64 ``[G]`` advantage multiplier
    (Prompt-GDRO's weight; 1 otherwise); generated: rollouts generated to get it
    (more than ``R`` for dynamic sampling).
    """

    rows: np.ndarray
    group: np.ndarray
    prompt: np.ndarray
    mult: np.ndarray
    generated: int
    reused: int = 0  # rollouts taken a second time (a prompt drawn more than K / n times in one step)

    @property
    def num_groups(self) -> int:
        return int(self.prompt.size)


def select(pool: Pool, rep: Replicate, prompts: Sequence[int], counts: Sequence[int],
           mult: Sequence[float] | None = None, generated: int | None = None) -> Selection:
    """Groups of ``counts[g]`` rollouts of ``prompts[g]``: the first of the prompt's permutation (the next ones
    for a later occurrence of the same prompt in the list); groups with 0 rollouts are dropped.

    A prompt drawn so often that its occurrences need more than the ``K`` cached rollouts wraps around
    (its rollouts are reused, counted in ``reused``); a single group may not exceed ``K``.
    """
    k = pool.k
    seen: dict[int, int] = {}
    reused = 0
    rows, group, kept, kept_mult = [], [], [], []
    m = np.ones(len(prompts)) if mult is None else np.asarray(mult, dtype=np.float64)
    for g, (p, n) in enumerate(zip(prompts, counts)):
        p, n = int(p), int(n)
        start = seen.get(p, 0)
        seen[p] = start + n
        if n <= 0:
            continue
        if n > k:
            raise ValueError(f"a group of prompt {p} needs {n} rollouts, the cache holds {k}")
        take = (start + np.arange(n)) % k
        reused += max(0, start + n - max(start, k))  # indices past K are second uses
        rows.append(p * k + rep.perm[p, take])
        group.append(np.full(n, len(kept)))
        kept.append(p)
        kept_mult.append(m[g])
    total = int(sum(int(c) for c in counts))
    return Selection(
        rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
        group=np.concatenate(group) if group else np.zeros(0, np.int64),
        prompt=np.asarray(kept, dtype=np.int64),
        mult=np.asarray(kept_mult, dtype=np.float64),
        generated=total if generated is None else int(generated),
        reused=reused,
    )


# -------------------------------------------------------------- estimators
def flat(pool: Pool, sel: Selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards [R] float64, group_index [R] int64, tokens [R] float64)`` of a selection."""
    rows = torch.from_numpy(sel.rows)
    return pool.rewards.reshape(-1)[rows], torch.from_numpy(sel.group), pool.tokens.reshape(-1)[rows]


def informative_groups(rewards: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """bool ``[G]``: the group's rewards are not all equal (it has a non-zero GRPO advantage)."""
    hi = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce(0, group, rewards, "amax")
    lo = torch.full((num_groups,), math.inf, dtype=torch.float64).scatter_reduce(0, group, rewards, "amin")
    return hi > lo


def grpo_weights(pool: Pool, sel: Selection, *, drop_zero_variance: bool = False) -> torch.Tensor:
    """Row weights ``[R]`` of the trainer's estimate: ``sum_r w_r g_r = sum_ij A_ij m_i g_ij / tokens``.

    ``A`` are the run's GRPO advantages (``algorithm.advantage``: std normalisation,
    eps, clip) on each group's own rewards; ``m`` the method's advantage multiplier;
    the token-mean (``loss_agg_mode=token-mean``) denominator counts every trained
    response token, of zero-variance groups too, unless they are dropped from
    training (``drop_zero_variance``: filter / dynamic sampling). One optimizer step
    on the whole batch (the trainer splits it into mini-batches, each normalised by
    its own tokens), at ratio 1 (on-policy: clipping does not act). Rows the run's loss masks
    (``reward.mask_truncated``) have no loss and no tokens.
    """
    r, gi, tok = flat(pool, sel)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    adv = grpo_advantages(r.to(torch.float32), gi, sel.num_groups, pool.setup.advantage).to(torch.float64)
    adv = adv * torch.from_numpy(sel.mult)[gi]
    keep = ~pool.masked.reshape(-1)[torch.from_numpy(sel.rows)]
    if drop_zero_variance:
        keep = keep & informative_groups(r, gi, sel.num_groups)[gi]
    denom = float(tok[keep].sum())
    return torch.where(keep, adv, torch.zeros_like(adv)) / max(denom, 1.0)


def mean_centred_weights(pool: Pool, sel: Selection, num_prompts: int | None = None) -> torch.Tensor:
    """Row weights ``[R]`` of the mean-centred (Dr.GRPO-style) estimate with equal prompt weights:
    ``(1/P) sum_i 1/(n_i - 1) sum_j (r_ij - mean_i) g_ij`` (per prompt the leave-one-out estimate,
    unbiased for the gradient of that prompt's expected reward; a group of one rollout gives 0).
    This is the estimator whose variance ``sum_i sigma_i^2 / n_i`` the square-root (Neyman)
    allocation minimises exactly. ``P`` (``num_prompts``, default: the groups of the selection) is
    the number of prompts the step allocated over, those given no rollout included, so that the
    estimate's scale does not depend on how many got some."""
    r, gi, _ = flat(pool, sel)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    g = sel.num_groups
    n = torch.bincount(gi, minlength=g).to(torch.float64)
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, gi, r) / n.clamp_min(1)
    scale = torch.where(n > 1, 1.0 / (n - 1).clamp_min(1), torch.zeros_like(n))
    return (r - mean[gi]) * scale[gi] / (g if num_prompts is None else int(num_prompts))


def combine(pool: Pool, parts: Sequence[tuple[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    """Sketches ``[M, D]`` of ``sum_r w_r g_r`` for every ``(rows, weights)`` of ``parts`` (one gather of their union)."""
    if not parts:
        return torch.zeros(0, pool.sketch.shape[1])
    union, inverse = np.unique(np.concatenate([rows for rows, _ in parts]), return_inverse=True)
    total = pool.sketch.shape[0]
    if union.size > total // 4:  # most of the cache: multiply in place rather than copy the rows out
        dense = torch.zeros(len(parts), total, dtype=torch.float32)
        for m, (rows, weights) in enumerate(parts):
            dense[m].index_add_(0, torch.from_numpy(rows), weights.to(torch.float32))
        return dense @ pool.sketch
    w = torch.zeros(len(parts), union.size, dtype=torch.float32)
    start = 0
    for m, (rows, weights) in enumerate(parts):
        idx = torch.from_numpy(inverse[start : start + rows.size])
        w[m].index_add_(0, idx, weights.to(torch.float32))
        start += rows.size
    return w @ pool.sketch[torch.from_numpy(union)]


def reference(pool: Pool) -> torch.Tensor:
    """Sketch ``[D]`` of the train objective's gradient: mean over the pool of the expected reward, from all
    ``K`` rollouts per prompt with the leave-one-out baseline (unbiased; see ``mech_policy.loo_weights``)."""
    from benchmarks.mech_policy import loo_weights

    return loo_weights(pool.rewards).reshape(-1).to(torch.float32) @ pool.sketch


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of ``a [M, D]`` with ``b [D]`` (NaN for a zero row)."""
    na, nb = a.double().norm(dim=-1), b.double().norm()
    dot = a.double() @ b.double()
    return torch.where(na > 0, dot / (na * nb).clamp_min(1e-300), torch.full_like(na, math.nan))


# ------------------------------------------------------------- statistics
def mean_ci(x: np.ndarray) -> dict[str, float]:
    """Mean and a 95% normal interval over replicates (NaNs dropped)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return {"mean": m, "lo": m - Z95 * se, "hi": m + Z95 * se, "n": int(x.size)}


def paired(x: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Mean paired difference ``x - base`` (same replicates) with its 95% normal interval."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return mean_ci(d)


class SnrAccumulator:
    """Block sums of estimates for the signal-to-noise ratio ``||E g||^2 / E||g - E g||^2`` and a jackknife.

    ``||E g||^2`` is estimated without bias as ``(||sum g||^2 - sum ||g||^2) / (m (m - 1))``.
    Intervals come from the delete-one-block jackknife over ``blocks`` blocks of replicates.
    """

    def __init__(self, num_estimates: int, dim: int, blocks: int) -> None:
        self.blocks = int(blocks)
        self.sums = torch.zeros(self.blocks, num_estimates, dim, dtype=torch.float64)
        self.sq = torch.zeros(self.blocks, num_estimates, dtype=torch.float64)
        self.count = torch.zeros(self.blocks, dtype=torch.float64)

    def add(self, index: int, estimates: torch.Tensor) -> None:
        b = index % self.blocks
        e = estimates.double()
        self.sums[b] += e
        self.sq[b] += (e * e).sum(-1)
        self.count[b] += 1

    @staticmethod
    def _snr(s: torch.Tensor, q: torch.Tensor, m: float) -> torch.Tensor:
        mu2 = ((s * s).sum(-1) - q) / (m * (m - 1))
        return mu2 / (q / m - mu2)

    def mean_direction(self) -> torch.Tensor:
        """``[M, D]`` the sum of all estimates (its direction is ``E g``'s)."""
        return self.sums.sum(0)

    def snr(self) -> torch.Tensor:
        return self._snr(self.sums.sum(0), self.sq.sum(0), float(self.count.sum()))

    def jackknife(self) -> torch.Tensor:
        """``[blocks, M]`` SNR with each block left out."""
        s, q, m = self.sums.sum(0), self.sq.sum(0), float(self.count.sum())
        return torch.stack([self._snr(s - self.sums[b], q - self.sq[b], m - float(self.count[b]))
                            for b in range(self.blocks)])

    def ratio_ci(self, base: int) -> list[dict[str, float]]:
        """Per estimate: ``SNR / SNR[base]`` with a 95% jackknife interval (on the log scale)."""
        full = self.snr()
        jk = self.jackknife()
        out = []
        for m in range(full.numel()):
            theta = math.log(float(full[m] / full[base])) if full[m] > 0 and full[base] > 0 else math.nan
            th = torch.log(jk[:, m] / jk[:, base]).numpy()
            b = self.blocks
            se = math.sqrt((b - 1) / b * float(((th - th.mean()) ** 2).sum())) if np.isfinite(th).all() else math.nan
            out.append({"mean": math.exp(theta) if math.isfinite(theta) else math.nan,
                        "lo": math.exp(theta - Z95 * se) if math.isfinite(se) else math.nan,
                        "hi": math.exp(theta + Z95 * se) if math.isfinite(se) else math.nan})
        return out


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def fmt_ci(d: dict[str, float], digits: int = 3, scale: float = 1.0) -> str:
    if not math.isfinite(d.get("mean", math.nan)):
        return "-"
    return f"{d['mean'] * scale:+.{digits}f} [{d['lo'] * scale:+.{digits}f}, {d['hi'] * scale:+.{digits}f}]"


def replace_config(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
