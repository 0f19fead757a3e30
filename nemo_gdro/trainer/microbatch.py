"""Micro-batch plans: which rows go through one forward/backward pass together, at what width.

Two plans, both pure functions of the row lengths:

* fixed size (``micro_batch_size`` rows, in row order, full width) — the
  classic form, and the only one Megatron's pipeline schedule accepts (its
  point-to-point exchange needs one activation shape for every micro-batch);
* token budget (``max_tokens_per_microbatch``): rows sorted by length
  (longest first) and packed greedily while ``rows x longest row`` (padding
  counted) fits the budget; each micro-batch is cut to its longest row. With
  long, ragged responses this removes most of the padding compute.

The loss is normalised by global token counts (``rl_loss.MinibatchLoss``),
so the gradient is the same sum under any plan; only float summation order
differs. Rows are right-padded (``[prompt, response, pad...]``), so cutting
trailing columns leaves every real position's causal context unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MicroBatch", "pipeline_micro_batch_size", "plan_fixed", "plan_token_budget"]


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``index`` (int64 ``[b]``, positions in the caller's batch) at ``width`` token columns."""

    index: torch.Tensor
    width: int


def plan_fixed(num_rows: int, width: int, micro_batch_size: int) -> list[MicroBatch]:
    """``micro_batch_size`` consecutive rows per micro-batch, all ``width`` wide."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [
        MicroBatch(torch.arange(i, min(i + micro_batch_size, num_rows)), width)
        for i in range(0, num_rows, micro_batch_size)
    ]


def plan_token_budget(lengths: torch.Tensor, max_tokens: int, *, min_width: int = 2) -> list[MicroBatch]:
    """Pack rows of ``lengths`` (int ``[B]``, tokens per row) under ``max_tokens`` per micro-batch.

    A micro-batch of ``b`` rows whose longest row has ``L`` tokens costs
    ``b * L`` tokens. Longest rows first, so each new micro-batch's first row
    sets its width. Raises ``ValueError`` if one row alone exceeds the budget.
    """
    if max_tokens < 1:
        raise ValueError(f"trainer.max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    lengths = lengths.to(torch.int64).clamp(min=min_width)
    if lengths.numel() and int(lengths.max()) > max_tokens:
        raise ValueError(
            f"a row of {int(lengths.max())} tokens exceeds trainer.max_tokens_per_microbatch={max_tokens}; "
            "raise the budget to at least the longest prompt + response"
        )
    order = torch.sort(lengths, descending=True, stable=True).indices
    plans: list[MicroBatch] = []
    start, width = 0, 0
    for pos in range(order.numel()):
        row_len = int(lengths[order[pos]])
        if pos == start:
            width = row_len
        elif (pos - start + 1) * width > max_tokens:
            plans.append(MicroBatch(order[start:pos], width))
            start, width = pos, row_len
    if order.numel():
        plans.append(MicroBatch(order[start:], width))
    return plans


def pipeline_micro_batch_size(num_rows: int, width: int, max_tokens: int) -> int:
    """Largest divisor of ``num_rows`` whose ``rows x width`` fits ``max_tokens`` (at least 1).

    Pipeline parallelism needs equal micro-batch shapes, so the budget picks
    a fixed size instead of packing.
    """
    cap = max(1, max_tokens // max(width, 1))
    return max(d for d in range(1, min(cap, num_rows) + 1) if num_rows % d == 0) if num_rows else 1
