"""Prompt scheduler ``skip_zero_variance``: the uniform epochs, minus prompts predicted zero-variance.

GRESO (arXiv 2506.02177) as a prompt scheduler: it walks the same seeded epoch
permutation as ``uniform`` and skips the prompts whose recent visits were all
zero-variance (:mod:`nemo_gdro.algorithms.zero_variance_skip`), with a small
chance of exploring them anyway. A skipped prompt is consumed for this epoch
(as the paper's filter drops it from the data loader's batch). The step's
rollout budget is unchanged: the draw is still ``P`` prompts.
"""

from __future__ import annotations

import math

import torch

from nemo_gdro.algorithms.zero_variance_skip import SkipSelection, ZeroVarianceSkip, explored_precision
from nemo_gdro.stages.base import PromptDraw, StepFeedback
from nemo_gdro.stages.context import StageContext
from nemo_gdro.trainer.sampler import EpochSampler

__all__ = ["ZeroVarianceSkipPrompts"]


class ZeroVarianceSkipPrompts:
    """Uniform epochs with GRESO's pre-rollout skip; checkpointed as ``prompt_skip``."""

    def __init__(self, controller: ZeroVarianceSkip, sampler: EpochSampler) -> None:
        if controller.num_prompts != sampler.num_prompts:
            raise ValueError(f"controller has {controller.num_prompts} prompts, sampler {sampler.num_prompts}")
        self.controller = controller
        self.sampler = sampler
        # This step's draw and its zero-variance outcome [P], for the diagnostics only (not state).
        self._last: SkipSelection | None = None
        self._zero: torch.Tensor | None = None

    @classmethod
    def from_context(cls, ctx: StageContext) -> ZeroVarianceSkipPrompts:
        wrong, correct = ctx.reward_range
        controller = ZeroVarianceSkip(ctx.setup.prompt_skip, ctx.num_prompts, ctx.seed, 0.5 * (wrong + correct))
        return cls(controller, EpochSampler(ctx.num_prompts, ctx.seed))

    def draw(self, num_prompts: int) -> PromptDraw:
        new_epoch = False

        def source(k: int) -> torch.Tensor:
            nonlocal new_epoch
            ids, began = self.sampler.next(k)
            new_epoch = new_epoch or began
            return ids

        self._last = self.controller.select(source, num_prompts)
        return PromptDraw(ids=self._last.ids, new_epoch=new_epoch)

    def response_weights(self, draw: PromptDraw, response_bins: torch.Tensor) -> torch.Tensor | None:
        return None  # a filter, not a reweighting: the skipped prompts carried no gradient to correct for

    def observe(self, feedback: StepFeedback) -> None:
        # Global rows (StepFeedback is the same on every rank), so every rank's table stays identical.
        # The paper adapts p_e from the second epoch on: before it no prompt has a history to act on.
        zero, _ = self.controller.observe(
            feedback.draw.ids, feedback.group_index, feedback.rewards, adapt=self.sampler.epoch >= 1
        )
        self._zero = zero

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        """``prompt_skip/*``: this draw's skipped / explored counts and fallback flag, the share of
        explored candidates that were indeed zero-variance (``precision``, NaN when none was
        explored), the share of the pool now predicted zero-variance and the current ``p_e``."""
        c, last, zero = self.controller, self._last, self._zero
        fresh = last is not None and zero is not None and last.ids.numel() == zero.numel()
        return {
            "prompt_skip/skipped": float(last.skipped) if fresh else math.nan,
            "prompt_skip/explored": float(last.explored.sum()) if fresh else math.nan,
            "prompt_skip/precision": explored_precision(last.explored, zero) if fresh else math.nan,
            "prompt_skip/fallback": float(last.fallback) if fresh else math.nan,
            "prompt_skip/predicted_zero_share": c.predicted_zero_share(),
            "prompt_skip/explore_easy": c.explore_easy,
            "prompt_skip/explore_hard": c.explore_hard,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**self.controller.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" not in state:
            raise KeyError("prompt skip checkpoint is missing 'sampler'")
        self.controller.load_state_dict({k: v for k, v in state.items() if k != "sampler"})
        self.sampler.load_state_dict(state["sampler"])

    def stateful(self) -> dict[str, object]:
        return {"prompt_skip": self}
