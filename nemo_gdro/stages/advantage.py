"""Advantage weighting: none, or Prompt-GDRO's per-bin weights (gdro.md §2, the paper's mode)."""

from __future__ import annotations

import torch

from nemo_gdro.algorithms.prompt_gdro import PromptGDRO
from nemo_gdro.stages.base import StepFeedback
from nemo_gdro.stages.context import StageContext


class NoWeighting:
    """Advantages as GRPO computes them."""

    @classmethod
    def from_context(cls, ctx: StageContext) -> NoWeighting:
        return cls()

    def weights(
        self, response_bins: torch.Tensor, informative: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def observe(self, feedback: StepFeedback) -> None:
        pass

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return {}

    def stateful(self) -> dict[str, object]:
        return {}


class PromptGDROWeighting:
    """Every rollout of a prompt in bin ``b`` has its advantage scaled by ``w_b``.

    The bin scores are the shared Prompt-GDRO controller's; it is observed
    (once) by :class:`PromptGDROFeedback`, not here.
    """

    def __init__(self, controller: PromptGDRO) -> None:
        self.controller = controller

    @classmethod
    def from_context(cls, ctx: StageContext) -> PromptGDROWeighting:
        return cls(ctx.prompt_gdro())

    def weights(
        self, response_bins: torch.Tensor, informative: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.controller.response_weights(response_bins, informative)

    def observe(self, feedback: StepFeedback) -> None:
        pass

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return {}

    def stateful(self) -> dict[str, object]:
        return {}


class PromptGDROFeedback:
    """Feeds the shared Prompt-GDRO controller its step signal (once) and reports its diagnostics."""

    def __init__(self, controller: PromptGDRO) -> None:
        self.controller = controller

    def observe(self, feedback: StepFeedback) -> None:
        self.controller.observe(feedback.response_bins, feedback.loss_signal)

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return self.controller.diagnostics(feedback.response_bins, feedback.bin_weights)

    def stateful(self) -> dict[str, object]:
        return {"prompt_gdro": self.controller}
