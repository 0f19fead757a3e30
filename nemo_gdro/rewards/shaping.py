"""Length-based reward shaping and truncation masking (pure torch functions).

DAPO's "soft overlong punishment" (DAPO paper, section 3.4): a response is
not penalised while its length stays at most ``L_max - L_buf``; inside the
last ``L_buf`` tokens before the maximum length the penalty grows linearly,
reaching the full penalty at ``L_max``; at or past ``L_max`` the penalty is
the full one. The penalty is *added* to the correctness reward. With
penalty factor ``f`` (DAPO / verl: 1.0) and length ``L`` in tokens::

    penalty(L) = -f * clamp((L - (L_max - L_buf)) / L_buf, 0, 1)

so ``0`` for ``L <= L_max - L_buf``, ``-f * (L - L_max + L_buf) / L_buf`` in
between and ``-f`` for ``L >= L_max``. (verl's ``overlong_buffer_cfg`` --
``len``, ``penalty_factor`` -- with ``max_resp_len`` is the same formula;
it never sees ``L > L_max`` because generation stops there.)

Masking of truncated responses (DAPO's "overlong filtering"): a response that
hit ``max_new_tokens`` without a stop token has no final answer to judge, so
its loss can be masked out instead of training on a "wrong" label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OverlongConfig:
    """``reward.overlong``: DAPO's soft overlong punishment.

    enabled: add the overlong penalty to the rewards.
    buffer_tokens: ``L_buf`` in tokens (DAPO recipes: 4096 of 20480; 1 <= buffer_tokens <= L_max,
        ``L_max`` = ``rollout.max_new_tokens``).
    penalty: the full penalty ``f`` >= 0 (DAPO: 1.0).
    """

    enabled: bool = False
    buffer_tokens: int = 4096
    penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.buffer_tokens, bool) or not isinstance(self.buffer_tokens, int) or self.buffer_tokens < 1:
            raise ValueError(f"reward.overlong.buffer_tokens must be an integer >= 1, got {self.buffer_tokens!r}")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, int | float) or not 0 <= self.penalty < float("inf"):
            raise ValueError(f"reward.overlong.penalty must be a finite number >= 0, got {self.penalty!r}")

    def validate(self, max_len: int, key: str = "reward.overlong") -> None:
        """Check the options against ``max_len`` (= ``L_max``, the max response tokens)."""
        if not self.enabled:
            return
        check_overlong_args(max_len, self.buffer_tokens, self.penalty, key)


def check_overlong_args(max_len: int, buffer_len: int, penalty_factor: float, key: str = "reward.overlong") -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"{key}: max response length must be an integer >= 1, got {max_len!r}")
    if isinstance(buffer_len, bool) or not isinstance(buffer_len, int) or not 1 <= buffer_len <= max_len:
        raise ValueError(
            f"{key}.buffer_tokens must be an integer in [1, {max_len}] (rollout.max_new_tokens), got {buffer_len!r}"
        )
    if isinstance(penalty_factor, bool) or not isinstance(penalty_factor, int | float) or penalty_factor < 0:
        raise ValueError(f"{key}.penalty must be a number >= 0, got {penalty_factor!r}")


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong penalty, float32 ``[R]`` in ``[-penalty_factor, 0]``.

    Args:
        lengths: response lengths ``[R]`` in tokens (integer or float tensor).
        max_len: ``L_max``, the maximum response length in tokens.
        buffer_len: ``L_buf``, tokens before ``L_max`` over which the penalty ramps.
        penalty_factor: the full penalty ``f``.
    """
    check_overlong_args(max_len, buffer_len, penalty_factor)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [R], got shape {tuple(lengths.shape)}")
    excess = lengths.to(torch.float64) - float(max_len - buffer_len)
    frac = (excess / float(buffer_len)).clamp(0.0, 1.0)
    return (-float(penalty_factor) * frac).to(torch.float32)


def apply_overlong_shaping(
    rewards: torch.Tensor, lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """``rewards + overlong_penalty(lengths, ...)``, float32 ``[R]``."""
    if rewards.shape != lengths.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and lengths {tuple(lengths.shape)} must have the same shape [R]")
    return rewards.to(torch.float32) + overlong_penalty(lengths, max_len, buffer_len, penalty_factor)


def truncated_rows(lengths: torch.Tensor, stopped: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """bool ``[R]``: the response reached ``max_new_tokens`` without a stop token.

    Args:
        lengths: generated tokens per row ``[R]`` (including a final stop token if any).
        stopped: bool ``[R]``, the row ended on a stop token.
        max_new_tokens: the generation limit.
    """
    if lengths.shape != stopped.shape or lengths.dim() != 1:
        raise ValueError(f"lengths {tuple(lengths.shape)} and stopped {tuple(stopped.shape)} must both be [R]")
    if stopped.dtype != torch.bool:
        raise ValueError(f"stopped must be a bool tensor, got {stopped.dtype}")
    return (~stopped) & (lengths >= max_new_tokens)


def truncation_keep_mask(truncated: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """bool ``[R]`` rows to keep in the loss: all rows, or (``enabled``) the non-truncated ones."""
    if truncated.dtype != torch.bool or truncated.dim() != 1:
        raise ValueError(f"truncated must be a bool [R] tensor, got {truncated.dtype} {tuple(truncated.shape)}")
    return ~truncated if enabled else torch.ones_like(truncated)
