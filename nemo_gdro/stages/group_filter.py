"""Group filters: train on every group, drop zero-variance groups, or refill them (DAPO dynamic sampling).

A group whose shaped rewards are all equal has advantage 0 for every rollout
(grpo_base.md §3): it adds no policy gradient, only tokens to the loss's
denominator. ``algorithm.group_filter`` chooses what a step does with such
groups:

- ``none``: train on every generated group (GRPO as before).
- ``filter``: drop them; the step trains on fewer prompts (none at all when
  every group is uninformative: no update, the step still counts).
- ``dynamic_sampling`` (DAPO; NeMo-RL ``grpo.use_dynamic_sampling``, verl
  ``algorithm.filter_groups``): drop them and draw more rounds of ``P``
  prompts until ``P`` informative groups are kept or
  ``algorithm.dynamic_sampling.max_generation_batches`` rounds are done; the
  first ``P`` informative groups in (round, position) order are trained.

The step (:mod:`nemo_gdro.trainer.step`) runs the rounds; the filter only
decides, from global tensors that every data-parallel rank holds identically.
"""

from __future__ import annotations

import torch

from nemo_gdro.stages.context import StageContext

__all__ = ["informative_groups", "NoFilter", "ZeroVarianceFilter", "DynamicSampling"]


def informative_groups(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Bool ``[P]``: the groups whose rewards are not all equal (exactly: max != min).

    A group of one rollout, or of identical rewards, is uninformative; so is a
    prompt position without rows.

    Args:
        rewards: float ``[R]`` shaped rewards (those that feed the advantages).
        group_index: int64 ``[R]`` row -> group in ``[0, num_groups)``.
        num_groups: ``P``.
    """
    r = rewards.to(torch.float64)
    hi = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, group_index, r, "amax")
    lo = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, group_index, r, "amin")
    return hi > lo


class NoFilter:
    """Train on every generated group; one round per step."""

    @classmethod
    def from_context(cls, ctx: StageContext) -> NoFilter:
        return cls()

    def select(self, informative: torch.Tensor, num_kept: int, target: int) -> torch.Tensor:
        return torch.ones_like(informative, dtype=torch.bool)

    def another_round(self, num_kept: int, target: int, rounds_done: int) -> bool:
        return False

    def stateful(self) -> dict[str, object]:
        return {}


class ZeroVarianceFilter:
    """Drop the groups whose rewards are all equal; no refill (one round per step)."""

    @classmethod
    def from_context(cls, ctx: StageContext) -> ZeroVarianceFilter:
        return cls()

    def select(self, informative: torch.Tensor, num_kept: int, target: int) -> torch.Tensor:
        return informative.to(torch.bool).clone()

    def another_round(self, num_kept: int, target: int, rounds_done: int) -> bool:
        return False

    def stateful(self) -> dict[str, object]:
        return {}


class DynamicSampling:
    """DAPO dynamic sampling: keep informative groups until ``target`` are kept, at most ``max_rounds`` rounds.

    Stateless: the rounds' draws advance the prompt scheduler (checkpointed
    there), so a resumed run makes the same decisions.
    """

    def __init__(self, max_rounds: int) -> None:
        if max_rounds < 1:
            raise ValueError(f"algorithm.dynamic_sampling.max_generation_batches must be >= 1, got {max_rounds}")
        self.max_rounds = int(max_rounds)

    @classmethod
    def from_context(cls, ctx: StageContext) -> DynamicSampling:
        return cls(ctx.setup.dynamic_sampling.max_generation_batches)

    def select(self, informative: torch.Tensor, num_kept: int, target: int) -> torch.Tensor:
        """The round's informative groups in position order, up to the ``target - num_kept`` still wanted."""
        inf = informative.to(torch.bool)
        return inf & (torch.cumsum(inf.to(torch.int64), 0) <= max(target - num_kept, 0))

    def another_round(self, num_kept: int, target: int, rounds_done: int) -> bool:
        return num_kept < target and rounds_done < self.max_rounds

    def stateful(self) -> dict[str, object]:
        return {}
