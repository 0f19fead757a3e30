"""Argument checks shared by the algorithm modules (one home, one meaning each)."""

from __future__ import annotations

import torch

from nemo_gdro.algorithms._scalar_checks import is_finite_real, is_int, is_real

__all__ = [
    "bool_mask",
    "check_token_tensors",
    "compute_dtype",
    "is_finite_real",
    "is_int",
    "is_real",
    "token_advantages",
]


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of a bool or 0/1 mask.

    ``torch.where`` needs bool, and selecting (rather than multiplying by 0)
    keeps NaN/inf in padding from leaking.
    """
    return mask if mask.dtype == torch.bool else mask != 0


def token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[R]`` (or ``[R, 1]``) advantages to ``[R, L]`` in ``like``'s dtype; pass ``[R, L]`` through."""
    R = like.shape[0]
    if advantages.dim() == 1:
        if advantages.shape[0] != R:
            raise ValueError(f"advantages of shape [R] must have R={R} rows, got {tuple(advantages.shape)}")
        return advantages.unsqueeze(-1).to(like.dtype).expand_as(like)
    if advantages.dim() == 2 and advantages.shape[0] == R and advantages.shape[1] in (1, like.shape[1]):
        return advantages.to(like.dtype).expand_as(like)
    raise ValueError(f"advantages must have shape [R] or [R, L] = {tuple(like.shape)}, got {tuple(advantages.shape)}")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """At least fp32 (bf16 entropies/log-probs are too coarse for the
    normalisations); float64 inputs stay float64 (tests, reference checks)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_token_tensors(**tensors: torch.Tensor | None) -> torch.Size:
    """Every given tensor is ``[R, L]`` and all share one shape; returns it."""
    shape = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 2:
            raise ValueError(f"{name} must be a [R, L] token tensor, got shape {tuple(t.shape)}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    assert shape is not None
    return shape
