"""Rollout schedulers: a fixed ``n`` per prompt, Rollout-GDRO (gdro.md §3), DynaMO's allocator (dynamo.md §1)."""

from __future__ import annotations

import torch

from nemo_gdro.algorithms.dynamo_allocation import DynamoAllocator
from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO
from nemo_gdro.stages.base import Allocation, PromptDraw, StepFeedback
from nemo_gdro.stages.context import StageContext


class FixedRollouts:
    """``n_bar`` rollouts for every prompt (GRPO)."""

    def __init__(self, n_bar: int) -> None:
        self.n_bar = int(n_bar)

    @classmethod
    def from_context(cls, ctx: StageContext) -> FixedRollouts:
        return cls(ctx.setup.n_bar)

    def allocate(self, draw: PromptDraw, bins: torch.Tensor) -> Allocation:
        return Allocation(torch.full((draw.ids.numel(),), self.n_bar, dtype=torch.int64))

    def observe(self, feedback: StepFeedback) -> None:
        pass

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return {}

    def stateful(self) -> dict[str, object]:
        return {}


class RolloutGDROScheduler:
    """Rollouts per difficulty bin under the exact mean budget (``sqrt`` or ``bandit`` mode)."""

    def __init__(self, controller: RolloutGDRO) -> None:
        self.controller = controller

    @classmethod
    def from_context(cls, ctx: StageContext) -> RolloutGDROScheduler:
        assert ctx.setup.rollout_gdro is not None
        return cls(RolloutGDRO(ctx.setup.rollout_gdro, ctx.classifier.num_bins, ctx.store))

    def allocate(self, draw: PromptDraw, bins: torch.Tensor) -> Allocation:
        plan = self.controller.allocate(draw.ids, bins)
        return Allocation(plan.counts, plan)

    def observe(self, feedback: StepFeedback) -> None:
        self.controller.observe(
            feedback.response_bins, feedback.loss_signal, feedback.allocation.plan, feedback.bins,
            group_index=feedback.group_index,
        )

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return self.controller.diagnostics(feedback.allocation.plan, feedback.bins)

    def stateful(self) -> dict[str, object]:
        return {"rollout_gdro": self.controller}


class DynamoScheduler:
    """Per-prompt variance-minimising allocation from the shared counters.

    The counters are updated by the step (the store), so nothing is observed
    here; under ``refresh=every_epoch`` the snapshot is retaken when the
    prompt scheduler starts an epoch.
    """

    def __init__(self, allocator: DynamoAllocator) -> None:
        self.allocator = allocator

    @classmethod
    def from_context(cls, ctx: StageContext) -> DynamoScheduler:
        assert ctx.setup.dynamo_allocation is not None
        return cls(DynamoAllocator(ctx.setup.dynamo_allocation, ctx.store))

    def allocate(self, draw: PromptDraw, bins: torch.Tensor) -> Allocation:
        if draw.new_epoch:
            self.allocator.refresh_epoch()  # a no-op under refresh=every_step
        alloc = self.allocator.allocate(draw.ids)
        return Allocation(alloc.counts, alloc)

    def observe(self, feedback: StepFeedback) -> None:
        pass

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return {f"dynamo/{k}": v for k, v in self.allocator.diagnostics(feedback.allocation.plan).items()}

    def stateful(self) -> dict[str, object]:
        return {"dynamo": self.allocator}
