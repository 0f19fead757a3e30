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

import torch

from nemo_gdro.rewards.overlong import OverlongConfig, check_overlong_args  # re-exported

__all__ = [
    "OverlongConfig",
    "apply_overlong_shaping",
    "check_overlong_args",
    "overlong_penalty",
    "truncated_rows",
    "truncation_keep_mask",
]


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
