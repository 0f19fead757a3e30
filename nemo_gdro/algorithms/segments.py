"""Vectorised reductions over ragged segments (groups of rows keyed by an index).

Every per-group statistic in the package goes through these helpers, so no code
infers a row's group from its position: the caller passes ``segment_index``.
"""

from __future__ import annotations

import torch


def check_segment_index(segment_index: torch.Tensor, num_segments: int) -> None:
    """Raise a clear error if ``segment_index [R]`` is not int64 in ``[0, num_segments)``."""
    if segment_index.dim() != 1:
        raise ValueError(f"segment index must be 1-D [R], got shape {tuple(segment_index.shape)}")
    if segment_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"segment index must be an integer tensor, got {segment_index.dtype}")
    if segment_index.numel() and (
        int(segment_index.min()) < 0 or int(segment_index.max()) >= num_segments
    ):
        raise ValueError(
            f"segment index values must lie in [0, {num_segments}), got "
            f"[{int(segment_index.min())}, {int(segment_index.max())}]"
        )


def segment_sum(values: torch.Tensor, segment_index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of ``values [R]`` per segment -> ``[num_segments]`` (empty segments give 0)."""
    out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out.index_add_(0, segment_index.long(), values)


def segment_count(segment_index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Rows per segment, int64 ``[num_segments]``."""
    return torch.bincount(segment_index.long(), minlength=num_segments)


def segment_mean(values: torch.Tensor, segment_index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of ``values [R]`` per segment; empty segments give 0."""
    count = segment_count(segment_index, num_segments).to(values.dtype)
    return segment_sum(values, segment_index, num_segments) / count.clamp_min(1)
