"""Prompt schedulers: uniform epochs, or Prompt-GDRO's resampling by bin (gdro.md §2)."""

from __future__ import annotations

import torch

from nemo_gdro.algorithms.bin_index import BinIndex
from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.prompt_gdro import PromptGDRO
from nemo_gdro.stages.base import PromptDraw, StepFeedback
from nemo_gdro.stages.context import StageContext
from nemo_gdro.trainer.sampler import EpochSampler


class UniformPrompts:
    """Every prompt once per epoch, in a seeded permutation per epoch."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        self.sampler = EpochSampler(num_prompts, seed)

    @classmethod
    def from_context(cls, ctx: StageContext) -> UniformPrompts:
        return cls(ctx.num_prompts, ctx.seed)

    def draw(self, num_prompts: int) -> PromptDraw:
        ids, new_epoch = self.sampler.next(num_prompts)
        return PromptDraw(ids=ids, new_epoch=new_epoch)

    def response_weights(self, draw: PromptDraw, response_bins: torch.Tensor) -> torch.Tensor | None:
        return None

    def observe(self, feedback: StepFeedback) -> None:
        pass

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        return {}

    def stateful(self) -> dict[str, object]:
        return {"sampler": self.sampler}


class PromptGDROResample:
    """Draw the step's prompts by bin from Prompt-GDRO's weights (gdro.md §2, "resample").

    ``resample_base: data`` (default): bin b with probability ``p_b`` proportional
    to the bin's pool share x ``omega_b`` (mixed with ``gamma`` x pool share),
    prompts without replacement within a step, so a flat adversary is uniform
    sampling over the pool. ``bins`` (the first form): a bin from ``q`` (uniform
    over bins when flat), then a prompt in it, with replacement.

    Bin membership of every dataset prompt is kept in a :class:`BinIndex`
    (unseen prompts in the unseen bin) and refreshed for the prompts of each
    step once their outcomes are known. ``importance_correct`` multiplies the
    advantages by pool share / draw probability of the row's bin (see
    :meth:`PromptGDRO.importance_weights`) so the gradient stays unbiased for
    the average objective. The draws use the controller's generator, which
    the controller's checkpoint holds: a resumed run draws the same prompts.
    """

    def __init__(self, prompt_gdro: PromptGDRO, classifier: DifficultyClassifier, index: BinIndex) -> None:
        self.prompt_gdro = prompt_gdro
        self.classifier = classifier
        self.index = index

    @classmethod
    def from_context(cls, ctx: StageContext) -> PromptGDROResample:
        index = BinIndex(ctx.num_prompts, ctx.classifier.num_bins, ctx.setup.difficulty.unseen_bin_index)
        return cls(ctx.prompt_gdro(), ctx.classifier, index)

    def draw(self, num_prompts: int) -> PromptDraw:
        ids, _, q = self.prompt_gdro.sample_prompts(self.index, num_prompts)
        return PromptDraw(ids=ids, q=q)

    def response_weights(self, draw: PromptDraw, response_bins: torch.Tensor) -> torch.Tensor | None:
        if not self.prompt_gdro.config.importance_correct:
            return None
        return self.prompt_gdro.importance_weights(response_bins, draw.q, self.index)

    def observe(self, feedback: StepFeedback) -> None:
        # The store already holds this step's outcomes: re-bin the prompts just seen.
        ids = feedback.draw.ids
        self.index.move(ids, self.classifier.classify(ids))

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]:
        """Per bin, the draw probability of this step's draw (``prompt_gdro/draw_p/{b}``)."""
        q = feedback.draw.q
        if q is None:
            return {}
        return {f"prompt_gdro/draw_p/{b}": float(q[b]) for b in range(q.numel())}

    def stateful(self) -> dict[str, object]:
        return {"bin_index": self.index}
