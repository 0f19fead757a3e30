"""The per-response loss signal the GDRO controllers learn from (``algorithm.prompt_gdro.signal``, gdro.md §2)."""

from __future__ import annotations

import torch

from nemo_gdro.algorithms.prompt_gdro import failure_signal, learnability_signal


class SignalError(RuntimeError):
    """A row that should carry a loss signal does not."""


def controller_signal(
    kind: str,
    surrogate: torch.Tensor,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_prompts: int,
    *,
    reward_range: tuple[float, float],
    correct_threshold: float,
) -> torch.Tensor:
    """The signal of every row, float64 ``[R]``.

    Args:
        kind: ``surrogate`` (the paper's: the detached token-mean clipped
            surrogate with unweighted advantages, from the optimizer steps),
            ``failure`` or ``learnability``.
        surrogate: float64 ``[R]`` per-row surrogate (NaN where a row was not trained).
        rewards: ``[R]``; group_index: int64 ``[R]``; num_prompts: ``P``.
    """
    if kind == "failure":
        return failure_signal(rewards, reward_range)
    if kind == "learnability":
        return learnability_signal(rewards, group_index, num_prompts, correct_threshold)
    if torch.isnan(surrogate).any():
        raise SignalError("some rows received no loss signal: every fresh row must be trained once per step")
    return surrogate
