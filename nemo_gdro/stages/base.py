"""The stage protocols of one RL step and the records they exchange.

A step is ``draw prompts -> classify -> allocate rollouts -> generate ->
verify -> advantages x weights -> optimizer steps (loss, token modulation) ->
controllers observe``. The algorithm plug-ins are the five stages below; each
is a small object chosen by name (:mod:`nemo_gdro.registries`) and called
through its protocol, so a step never asks which algorithm is on:

==========================  ==========================================  ================================
stage                       protocol                                    names
==========================  ==========================================  ================================
prompt scheduler            :class:`PromptScheduler`                    ``uniform``, ``prompt_gdro_resample``, ``skip_zero_variance``
rollout scheduler           :class:`RolloutScheduler`                   ``fixed``, ``rollout_gdro``, ``dynamo``
advantage weighting         :class:`AdvantageWeighting`                 ``none``, ``prompt_gdro``
token modulation            :class:`TokenModulation`                    ``none``, ``dynamo``
policy loss                 :class:`PolicyLoss`                         ``clipped``, ``r2vpo``
==========================  ==========================================  ================================

Everything here is framework-free (torch only): a trainer other than ours
can drive the stages with its own model and engine (README, "Using the stages
in another trainer").

Shapes: per-prompt ``[P]`` (the step's prompt positions), per-row ``[R]``
(rows in canonical order: by prompt position, then rollout index), per-bin
``[B]``, token tensors ``[b, L]`` with a response mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
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


@dataclass(frozen=True)
class PromptDraw:
    """The prompts of one step.

    ids: int64 ``[P]`` dataset prompt ids (a resampler may repeat an id: the ``bins``
        form of Prompt-GDRO resampling, or any draw larger than the pool).
    new_epoch: an epoch of the uniform sampler began during this draw.
    q: float64 ``[B]`` the bin distribution the draw used (resampling), else ``None``.
    """

    ids: torch.Tensor
    new_epoch: bool = False
    q: torch.Tensor | None = None


@dataclass(frozen=True)
class Allocation:
    """Rollouts per prompt of one step.

    counts: int64 ``[P]``, each ``>= 1``; compute-neutral schedulers keep
        ``counts.sum() == P * n_bar``.
    plan: the scheduler's own record of the decision (e.g. a
        :class:`~nemo_gdro.algorithms.rollout_gdro.RolloutPlan`), handed back
        to it in :class:`StepFeedback`; ``None`` for fixed allocation.
    """

    counts: torch.Tensor
    plan: Any = None


@dataclass(frozen=True)
class StepFeedback:
    """What the controllers learn from after the step's optimizer updates (all rows global).

    bins: int64 ``[P]`` difficulty bins the step was planned with (history up to t-1).
    response_bins: int64 ``[R]`` bin of every row's prompt.
    group_index: int64 ``[R]`` prompt position of every row.
    rewards: float32 ``[R]``.
    loss_signal: float64 ``[R]`` the per-response loss signal (``prompt_gdro.signal``).
    bin_weights: float64 ``[B]`` the advantage weight applied per bin (NaN for bins absent
        from the batch), or ``None``.
    """

    draw: PromptDraw
    bins: torch.Tensor
    allocation: Allocation
    response_bins: torch.Tensor
    group_index: torch.Tensor
    rewards: torch.Tensor
    loss_signal: torch.Tensor
    bin_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class MinibatchView:
    """One optimizer mini-batch of this rank, before its update.

    advantages: float ``[b]`` weighted advantages of the rows.
    behaviour_logp: float ``[b, L]`` log-probs of the policy that generated them; ``None``
        when the training forward supplies them (one on-policy mini-batch and no stage
        asked for ``current``: :mod:`nemo_gdro.trainer.behaviour`).
    mask: bool ``[b, L]`` response tokens.
    current: the current policy's no-grad token statistics (``logp``,
        ``entropy``, and ``ebar`` when a stage ``needs_ebar``, each ``[b, L]``)
        when a stage asked for them (``needs_current_policy``), else ``None``.
    """

    advantages: torch.Tensor
    behaviour_logp: torch.Tensor | None
    mask: torch.Tensor
    current: Mapping[str, torch.Tensor] | None


@runtime_checkable
class Observer(Protocol):
    """A component that learns from each step's feedback and reports diagnostics."""

    def observe(self, feedback: StepFeedback) -> None: ...

    def diagnostics(self, feedback: StepFeedback) -> dict[str, float]: ...


class PromptScheduler(Observer, Protocol):
    """Chooses the step's prompts (the data adversary's resampling lives here)."""

    def draw(self, num_prompts: int) -> PromptDraw:
        """The next ``num_prompts`` prompts."""
        ...

    def response_weights(self, draw: PromptDraw, response_bins: torch.Tensor) -> torch.Tensor | None:
        """Per-row advantage factors ``[R]`` float64 the draw calls for (importance correction), or ``None``."""
        ...


class RolloutScheduler(Observer, Protocol):
    """Chooses how many rollouts each prompt gets (the compute adversary, DynaMO's allocator)."""

    def allocate(self, draw: PromptDraw, bins: torch.Tensor) -> Allocation:
        """Rollouts per prompt from the prompts' bins and (through the store) their history."""
        ...


class AdvantageWeighting(Observer, Protocol):
    """Scales each response's advantage (Prompt-GDRO's advantage weights)."""

    def weights(
        self, response_bins: torch.Tensor, informative: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(w [R] float64, w per bin [B])``, or ``(None, None)`` for no weighting.

        ``informative``: bool ``[R]``, the row's raw GRPO advantage is non-zero (rows in
        the order of ``response_bins``); a stage may normalise over these rows only
        (Prompt-GDRO's ``normalize_over: informative``). A bin absent from the batch
        has weight NaN in ``w per bin``.
        """
        ...


class TokenModulation(Protocol):
    """Rescales per-token advantages inside the loss (DynaMO's token level).

    ``needs_ebar``: the stage reads ``ebar`` from the token statistics (the
    actor skips that statistic otherwise; optional, default ``False``).
    """

    needs_current_policy: bool
    needs_ebar: bool

    def prepare(self, view: MinibatchView) -> Any:
        """Mini-batch-scope statistics (reduced over DP) the loss needs, from the pre-update policy."""
        ...

    def modulate(
        self,
        advantages: torch.Tensor,
        stats: Mapping[str, torch.Tensor],
        behaviour_logp: torch.Tensor,
        mask: torch.Tensor,
        context: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(A~ [b, L], token-weighted metric sums)`` for one micro-batch."""
        ...


class PolicyLoss(Protocol):
    """The per-token policy loss (clipped surrogate or R²VPO) and its own controller."""

    needs_current_policy: bool

    def prepare(self, view: MinibatchView) -> Any:
        """Mini-batch statistics (reduced over DP) the loss needs, from the pre-update policy."""
        ...

    def token_loss(
        self,
        logp: torch.Tensor,
        behaviour_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        context: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(token loss [b, L], metric sums over the micro-batch's tokens)``."""
        ...

    def after_update(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Called once per optimizer step with the loss's sums over the whole mini-batch; returns metrics."""
        ...
