"""The algorithm stages of an RL step, chosen by name: the plugin's public API.

Build them from a typed :class:`AlgorithmSetup` and a :class:`StageContext`
with :func:`build_stages`, then per step::

    draw = stages.prompts.draw(P)                           # which prompts
    bins = classifier.classify(draw.ids)                    # history up to t-1
    alloc = stages.rollouts.allocate(draw, bins)            # n_i per prompt
    ... generate alloc.counts[i] rollouts of prompt i, verify, GRPO advantages ...
    w, w_bin = stages.weighting.weights(response_bins, raw_adv != 0)  # per-response weights (or None)
    ... optimizer steps: stages.loss.token_loss / stages.modulation.modulate per micro-batch,
        stages.loss.after_update once per optimizer step ...
    store.observe(...)                                      # per-prompt outcomes
    for obs in stages.observers: obs.observe(feedback)      # every controller, once

:mod:`nemo_gdro.trainer.step` is this sequence inside the Megatron trainer;
``examples/controllers_in_a_loop.py`` drives it without one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_gdro.stages.base import (
        AdvantageWeighting,
        Allocation,
        MinibatchView,
        Observer,
        PolicyLoss,
        PromptDraw,
        PromptScheduler,
        RolloutScheduler,
        StepFeedback,
        TokenModulation,
    )
    from nemo_gdro.stages.context import StageContext
    from nemo_gdro.stages.setup import AlgorithmSetup

# Public names -> defining submodule, imported on first use: the typed config
# (``nemo_gdro.stages.setup``) must import without torch, so that the CLI answers a
# bad config value before it pays for importing torch and Megatron.
_LAZY = {
    **{name: "nemo_gdro.stages.base" for name in (
        "AdvantageWeighting", "Allocation", "MinibatchView", "Observer", "PolicyLoss",
        "PromptDraw", "PromptScheduler", "RolloutScheduler", "StepFeedback", "TokenModulation",
    )},
    "StageContext": "nemo_gdro.stages.context",
    "AlgorithmSetup": "nemo_gdro.stages.setup",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlgorithmSetup",
    "StageContext",
    "Stages",
    "build_stages",
    "PromptDraw",
    "Allocation",
    "StepFeedback",
    "MinibatchView",
    "PromptScheduler",
    "RolloutScheduler",
    "AdvantageWeighting",
    "TokenModulation",
    "PolicyLoss",
    "Observer",
]


@dataclass
class Stages:
    """The five selected stages and the controllers that learn after each step.

    observers: every component with state that learns from
        :class:`StepFeedback`, each once, in order (Prompt-GDRO's scores, then
        the rollout scheduler, then the prompt scheduler, which re-bins the
        prompts just seen).
    """

    prompts: PromptScheduler
    rollouts: RolloutScheduler
    weighting: AdvantageWeighting
    modulation: TokenModulation
    loss: PolicyLoss
    observers: list[Observer] = field(default_factory=list)

    @property
    def needs_current_policy(self) -> bool:
        """A stage needs the pre-update policy's token statistics of each mini-batch."""
        return bool(self.modulation.needs_current_policy or self.loss.needs_current_policy)

    @property
    def needs_ebar(self) -> bool:
        """A stage reads ``ebar`` from the token statistics (the actor computes it only then)."""
        return bool(getattr(self.modulation, "needs_ebar", False) or getattr(self.loss, "needs_ebar", False))

    def stateful(self) -> dict[str, object]:
        """Checkpoint name -> component with ``state_dict``/``load_state_dict`` (replicated state)."""
        out: dict[str, object] = {}
        for part in (self.prompts, self.rollouts, self.weighting, self.modulation, self.loss, *self.observers):
            out.update(part.stateful())  # type: ignore[attr-defined]
        return out

    def describe(self) -> dict[str, str]:
        return {
            "prompt_scheduler": type(self.prompts).__name__,
            "rollout_scheduler": type(self.rollouts).__name__,
            "advantage_weighting": type(self.weighting).__name__,
            "token_modulation": type(self.modulation).__name__,
            "loss": type(self.loss).__name__,
        }


def build_stages(ctx: StageContext) -> Stages:
    """Instantiate the stages ``ctx.setup`` names through their registries."""
    from nemo_gdro.registries import STAGE_REGISTRIES
    from nemo_gdro.stages.advantage import PromptGDROFeedback

    setup = ctx.setup
    built = {key: STAGE_REGISTRIES[key].get(getattr(setup, key)).from_context(ctx) for key in STAGE_REGISTRIES}
    stages = Stages(
        prompts=built["prompt_scheduler"],
        rollouts=built["rollout_scheduler"],
        weighting=built["advantage_weighting"],
        modulation=built["token_modulation"],
        loss=built["loss"],
    )
    shared = ctx.shared_prompt_gdro
    stages.observers = ([PromptGDROFeedback(shared)] if shared is not None else []) + [stages.rollouts, stages.prompts]
    return stages
