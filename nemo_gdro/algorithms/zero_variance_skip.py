"""GRESO-style prompt skipping: predict zero-variance prompts from their history (arXiv 2506.02177).

A group whose rewards are all equal has zero GRPO advantage and gives no
gradient; the paper observes that a prompt zero-variance at one visit tends to
stay so at the next. The controller keeps, per dataset prompt, the number of
its most recent visits in a row that were zero-variance (``streak``, int16
``[N]``) and whether the last was "easy" (all rewards high) or "hard" (all
low). Walking a prompt order it skips a candidate (``streak >= min_streak``)
unless a seeded uniform falls below its exploration probability
``p_e ** (streak - min_streak + 1)``; ``p_e`` is one per kind and, with
``adapt``, follows the paper's rule towards a target share of zero-variance
groups per step.

Everything here is a deterministic function of the config, the seed and the
observed (global) feedback, so every data-parallel rank holding the same state
makes the same draw. The prompt order itself comes from the caller (the stage
walks the uniform epoch sampler).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_gdro.algorithms.configs import MAX_SKIP_STREAK, PromptSkipConfig
from nemo_gdro.algorithms.segments import check_segment_index, segment_mean

__all__ = [
    "PromptSkipConfig",
    "SkipSelection",
    "ZeroVarianceSkip",
    "zero_variance_groups",
    "explored_precision",
]

#: Share of ``target_zero_variance`` aimed at easy groups; the rest is hard. The authors' release
#: explores hard prompts more (2/3) since a rising reward makes them the likelier to turn informative.
EASY_TARGET_FRACTION = 1.0 / 3.0


@dataclass(frozen=True)
class SkipSelection:
    """One draw of the skip rule.

    ids: int64 ``[P]`` the kept prompt ids, in walk order.
    explored: bool ``[P]`` the id was a skip candidate kept by exploration.
    skipped: candidates skipped during the walk.
    examined: ids the rule looked at (kept or skipped; the fallback's ids are not counted).
    fallback: the walk looked at ``num_prompts`` ids without filling the draw and took the
        rest without skipping (the pool is (nearly) all predicted zero-variance).
    """

    ids: torch.Tensor
    explored: torch.Tensor
    skipped: int
    examined: int
    fallback: bool


def zero_variance_groups(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, midpoint: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which groups have all rewards equal, and which of those are easy.

    Args:
        rewards: float ``[R]``; group_index: int64 ``[R]`` in ``[0, num_groups)``.
        midpoint: a zero-variance group is easy when its reward is above it (hard otherwise).
    Returns:
        ``(zero bool [P], easy bool [P])``; ``easy`` implies ``zero``. A group of one
        row is zero-variance (its advantage is 0), an empty group is not.
    """
    check_segment_index(group_index, num_groups)
    r = rewards.to(torch.float64)
    hi = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce(0, group_index, r, "amax")
    lo = torch.full((num_groups,), math.inf, dtype=torch.float64).scatter_reduce(0, group_index, r, "amin")
    present = torch.bincount(group_index, minlength=num_groups) > 0
    zero = present & (hi == lo)  # exact equality: the advantage is exactly 0 only then
    easy = zero & (segment_mean(r, group_index, num_groups) > midpoint)
    return zero, easy


def explored_precision(explored: torch.Tensor, zero: torch.Tensor) -> float:
    """Share of the explored candidates ``[P]`` that were indeed zero-variance (NaN if none was explored)."""
    n = int(explored.sum())
    return float((explored & zero).sum()) / n if n else math.nan


class ZeroVarianceSkip:
    """The per-prompt zero-variance streak table and the skip rule.

    Args:
        config: the ``prompt_skip`` section.
        num_prompts: size of the prompt pool ``N``.
        seed: the run seed (the skip rule's generator derives from it).
        reward_midpoint: easy / hard boundary of a zero-variance group's reward
            (the midpoint of the verifier's wrong and correct rewards).
    """

    def __init__(self, config: PromptSkipConfig, num_prompts: int, seed: int, reward_midpoint: float = 0.5) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.config = config
        self.num_prompts = int(num_prompts)
        self.reward_midpoint = float(reward_midpoint)
        self.streak = torch.zeros(self.num_prompts, dtype=torch.int16)
        self.easy = torch.zeros(self.num_prompts, dtype=torch.bool)
        self.explore_easy = float(config.explore)
        self.explore_hard = float(config.explore)
        self.num_updates = 0
        # A stream of its own: the draw does not shift any other controller's random numbers.
        self.rng = torch.Generator().manual_seed(int(seed) * 7_919 + 2_506_021_77)

    # ------------------------------------------------------------------ the rule
    def candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """bool ``[k]``: the prompts predicted zero-variance (``streak >= min_streak``)."""
        return self.streak[ids] >= self.config.min_streak

    def keep_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """float64 ``[k]``: 1 for a non-candidate, ``p_e ** (streak - min_streak + 1)`` for a candidate."""
        streak = self.streak[ids].to(torch.float64)
        base = torch.where(self.easy[ids], self.explore_easy, self.explore_hard).to(torch.float64)
        power = (streak - self.config.min_streak + 1).clamp_min(1.0)
        return torch.where(self.candidates(ids), base.pow(power), torch.ones_like(streak))

    def select(self, source: Callable[[int], torch.Tensor], count: int) -> SkipSelection:
        """Walk ``source`` (``k -> the next k prompt ids``, every id it returns consumed) until
        ``count`` ids are kept; after ``num_prompts`` ids without filling the draw, take the rest
        without skipping, so the walk always ends.
        """
        kept: list[torch.Tensor] = []
        explored: list[torch.Tensor] = []
        skipped = examined = 0
        need = int(count)
        fallback = False
        while need > 0:
            budget = self.num_prompts - examined
            if budget <= 0:
                rest = source(need).to(torch.int64)
                kept.append(rest)
                explored.append(torch.zeros(rest.numel(), dtype=torch.bool))
                fallback = True
                break
            # Never more than still needed: each examined id is consumed, kept or skipped.
            chunk = source(min(need, budget)).to(torch.int64)
            examined += chunk.numel()
            prob = self.keep_probability(chunk)
            u = torch.rand(chunk.numel(), generator=self.rng, dtype=torch.float64)
            keep = u < prob
            kept.append(chunk[keep])
            explored.append((self.candidates(chunk) & keep)[keep])
            skipped += int((~keep).sum())
            need -= int(keep.sum())
        empty = torch.zeros(0, dtype=torch.int64)
        return SkipSelection(
            ids=torch.cat(kept) if kept else empty,
            explored=torch.cat(explored) if explored else empty.bool(),
            skipped=skipped,
            examined=examined,
            fallback=fallback,
        )

    # --------------------------------------------------------------- learning
    def observe(
        self, ids: torch.Tensor, group_index: torch.Tensor, rewards: torch.Tensor, adapt: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the streaks from one step's global outcomes; returns ``(zero [P], easy [P])``.

        Args:
            ids: int64 ``[P]`` the step's prompt ids (an id may repeat: it counts as
                zero-variance only if all its groups were).
            group_index: int64 ``[R]`` prompt position of every row; rewards: float ``[R]``.
            adapt: apply the ``adapt`` rule this step (the stage passes "not the first epoch").
        """
        num_groups = ids.numel()
        zero, easy = zero_variance_groups(rewards, group_index, num_groups, self.reward_midpoint)
        unique, inverse = torch.unique(ids, return_inverse=True)
        all_zero = torch.ones(unique.numel(), dtype=torch.int64).scatter_reduce(0, inverse, zero.long(), "amin")
        last = torch.full((unique.numel(),), -1, dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(num_groups), "amax"
        )
        hit = all_zero.bool()
        grown = (self.streak[unique].to(torch.int32) + 1).clamp_max(MAX_SKIP_STREAK).to(torch.int16)
        self.streak[unique] = torch.where(hit, grown, torch.zeros_like(grown))
        self.easy[unique] = hit & easy[last]
        if adapt and self.config.adapt and num_groups:
            cfg = self.config
            easy_share = float(easy.sum()) / num_groups
            hard_share = float((zero & ~easy).sum()) / num_groups
            target_easy = cfg.target_zero_variance * EASY_TARGET_FRACTION
            target_hard = cfg.target_zero_variance - target_easy
            self.explore_easy = self._step(self.explore_easy, easy_share >= target_easy)
            self.explore_hard = self._step(self.explore_hard, hard_share >= target_hard)
        self.num_updates += 1
        return zero, easy

    def _step(self, p: float, above_target: bool) -> float:
        """Too many zero-variance groups of this kind: explore less (skip more); too few: explore more."""
        cfg = self.config
        moved = p - cfg.adapt_step if above_target else p + cfg.adapt_step
        return min(max(moved, cfg.explore_min), cfg.explore_max)

    # ------------------------------------------------------------ diagnostics
    def predicted_zero_share(self) -> float:
        """Share of the pool currently predicted zero-variance (skip candidates)."""
        return float((self.streak >= self.config.min_streak).double().mean())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "num_prompts": self.num_prompts,
            "streak": self.streak.clone(),
            "easy": self.easy.clone(),
            "explore_easy": self.explore_easy,
            "explore_hard": self.explore_hard,
            "num_updates": self.num_updates,
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_prompts", "streak", "easy", "explore_easy", "explore_hard", "num_updates", "rng"):
            if key not in state:
                raise KeyError(f"prompt skip checkpoint is missing {key!r}")
        if int(state["num_prompts"]) != self.num_prompts or state["streak"].shape != (self.num_prompts,):
            raise ValueError(
                f"prompt skip checkpoint is for {state['num_prompts']} prompts, this run has {self.num_prompts}"
            )
        self.streak = state["streak"].to(torch.int16).clone()
        self.easy = state["easy"].to(torch.bool).clone()
        self.explore_easy = float(state["explore_easy"])
        self.explore_hard = float(state["explore_hard"])
        self.num_updates = int(state["num_updates"])
        self.rng.set_state(state["rng"])
