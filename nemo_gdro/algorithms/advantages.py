"""Group-relative (GRPO / Dr.GRPO) advantages over ragged groups, and pass@k / mean@k.

grpo_base.md §3 and §6. Rows of a step are rollouts; ``group_index [R]`` maps
each row to its prompt position in ``[0, P)``. Groups may have any size
``n_i >= 1``; nothing here assumes rows are contiguous or equally many.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_gdro.algorithms.configs import AdvantageConfig, StdKind
from nemo_gdro.algorithms.segments import (
    check_segment_index,
    segment_count,
    segment_mean,
    segment_sum,
)


@dataclass(frozen=True)
class GroupStats:
    """Per-group reward statistics, each ``[P]``: size, mean, std (0 where undefined)."""

    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def group_reward_stats(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, std: StdKind = "unbiased"
) -> GroupStats:
    """Mean and std of ``rewards [R]`` per group, vectorised with segment sums.

    Two-pass (centre, then square) for accuracy. Groups of one row have std 0
    under either definition, so they yield zero advantage.
    """
    check_segment_index(group_index, num_groups)
    r = rewards.to(torch.float64)
    count = segment_count(group_index, num_groups)
    mean = segment_mean(r, group_index, num_groups)
    centred = r - mean[group_index]
    sq = segment_sum(centred * centred, group_index, num_groups)
    denom = (count - 1) if std == "unbiased" else count
    var = torch.where(denom > 0, sq / denom.clamp_min(1).to(torch.float64), torch.zeros_like(sq))
    return GroupStats(count=count, mean=mean, std=var.sqrt())


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    config: AdvantageConfig | None = None,
) -> torch.Tensor:
    """Per-rollout advantage ``A_ij = (r_ij - mean_i) / (std_i + eps)`` (float32 ``[R]``).

    Broadcast to tokens by the caller. A group with one rollout or all-equal
    rewards gets exactly 0 (its centred rewards are 0).
    """
    cfg = config or AdvantageConfig()
    stats = group_reward_stats(rewards, group_index, num_groups, cfg.std)
    centred = rewards.to(torch.float64) - stats.mean[group_index]
    if cfg.normalize_by_std:
        adv = centred / (stats.std[group_index] + cfg.eps)
    else:
        adv = centred
    # Exact zeros for degenerate groups, even if float noise left a residue.
    degenerate = (stats.count[group_index] < 2) | (stats.std[group_index] == 0)
    adv = torch.where(degenerate, torch.zeros_like(adv), adv)
    if cfg.adv_clip is not None:
        adv = adv.clamp(-cfg.adv_clip, cfg.adv_clip)
    return adv.to(torch.float32)


def zero_variance_group_fraction(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int
) -> float:
    """Fraction of groups whose rewards are all equal (or that have one rollout).

    These groups carry no policy gradient: the rollouts spent on them are wasted.
    """
    stats = group_reward_stats(rewards, group_index, num_groups, "population")
    present = stats.count > 0
    if not bool(present.any()):
        return 0.0
    return float(((stats.std == 0) & present).sum()) / float(present.sum())


def pass_at_k(num_samples: torch.Tensor, num_correct: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k per problem: ``1 - C(n-c, k) / C(n, k)`` (float64 ``[P]``).

    Evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, in log space over a
    ragged expansion of the factors, so it never forms large binomials. When
    ``n - c < k`` every draw of k samples holds a correct one: pass@k = 1.

    Args:
        num_samples: ``n [P]``, samples drawn per problem (each ``>= k``).
        num_correct: ``c [P]``, correct ones among them.
    """
    n = torch.as_tensor(num_samples, dtype=torch.int64)
    c = torch.as_tensor(num_correct, dtype=torch.int64)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    if (n < k).any():
        bad = torch.nonzero(n < k).flatten()[:5].tolist()
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; problems {bad} have fewer")
    if (c < 0).any() or (c > n).any():
        raise ValueError("num_correct must lie in [0, num_samples]")
    certain = (n - c) < k
    # Factors i = n-c+1 .. n; only problems with n - c >= k need them, and there
    # every factor 1 - k/i lies in (0, 1).
    c_f = torch.where(certain, torch.zeros_like(c), c)
    problem = torch.repeat_interleave(torch.arange(n.numel()), c_f)
    offset = torch.arange(problem.numel()) - torch.repeat_interleave(torch.cumsum(c_f, 0) - c_f, c_f)
    i = (n - c + 1)[problem] + offset
    log_factor = torch.log1p(-k / i.to(torch.float64))
    log_fail = segment_sum(log_factor, problem, n.numel())
    return torch.where(certain, torch.ones_like(log_fail), 1.0 - torch.exp(log_fail))


def pass_at_k_from_rows(
    correct: torch.Tensor, group_index: torch.Tensor, num_groups: int, k: int
) -> torch.Tensor:
    """pass@k per problem from per-sample correctness ``[R]`` (bool or 0/1) and ``group_index``."""
    check_segment_index(group_index, num_groups)
    n = segment_count(group_index, num_groups)
    c = segment_sum(correct.to(torch.int64), group_index, num_groups)
    return pass_at_k(n, c, k)


def mean_at_k(correct: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean correctness per problem over its samples (float64 ``[P]``)."""
    check_segment_index(group_index, num_groups)
    return segment_mean(correct.to(torch.float64), group_index, num_groups)
