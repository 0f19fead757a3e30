"""Rows of one RL step across data-parallel ranks: canonical order, scatter, reductions.

A step draws ``P`` prompts (replicated on every rank) and allocates
``counts[i]`` rollouts to prompt position ``i``; data-parallel rank ``r``
generates and trains the prompt positions ``r, r + dp, r + 2 dp, ...``. Every
row therefore has a canonical global index: rows are ordered by prompt
position, then by their order within the prompt's group. Knowing it on every
rank (from the replicated allocation) is what lets per-row statistics of all
ranks meet in one all-reduce, and what makes mini-batch membership, the
controllers' inputs and the logged metrics independent of the DP size.

A step whose trained prompts are not simply ``0..P-1`` split round-robin (the
groups kept by ``algorithm.group_filter``, gathered from several generation
rounds) builds its layout from an explicit prompt -> rank map
(:meth:`StepRows.build` with ``owners``): the rows stay on the rank that
generated them, and the canonical order is the order of the prompts in that
map (for kept groups: round, then position, then rollout).

All reductions go through :mod:`nemo_gdro.parallel.comm`, so their buffers sit
on the backend's device (CUDA under NCCL, CPU under gloo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nemo_gdro.parallel import comm

__all__ = ["canonical_rows", "DataParallel", "StepRows"]


def canonical_rows(row_positions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Global canonical index of each local row, int64 ``[R_local]``.

    Args:
        row_positions: int64 ``[R_local]`` prompt position of each local row
            (rows of one position appear in their within-group order).
        counts: int64 ``[P]`` rollouts of every prompt position (global).
    """
    offsets = torch.cumsum(counts, 0) - counts
    order = torch.sort(row_positions, stable=True).indices
    within = torch.empty_like(row_positions)
    sorted_pos = row_positions[order]
    first = torch.searchsorted(sorted_pos, sorted_pos, right=False)
    within[order] = torch.arange(row_positions.numel()) - first
    return offsets[row_positions] + within


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel and pipeline groups.

    ``group`` / ``pipeline_group`` are ``torch.distributed`` groups (``None``
    with one process: every reduction is then the identity).
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    pipeline_size: int = 1
    pipeline_group: Any = None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over DP ranks (identity with one rank)."""
        return comm.all_reduce(tensor, group=self.group) if self.size > 1 else tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise max over DP ranks (identity with one rank)."""
        import torch.distributed as dist

        return comm.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group) if self.size > 1 else tensor

    def sum_over_stages(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages (identity without pipeline parallelism)."""
        return comm.all_reduce(tensor, group=self.pipeline_group) if self.pipeline_size > 1 else tensor

    def total(self, *values: float) -> list[float]:
        """Python scalars summed over DP ranks, in one all-reduce."""
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def owner_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The rank that generates each prompt position of a step (or round), int64 like ``positions``."""
        return positions % self.size

    def my_positions(self, num_prompts: int) -> torch.Tensor:
        """The prompt positions this rank generates and trains, int64 ``[P_local]``."""
        positions = torch.arange(num_prompts)
        return positions[self.owner_of(positions) == self.rank]


@dataclass(frozen=True)
class StepRows:
    """The global row layout of one step, known identically on every rank.

    counts: int64 ``[P]`` rollouts per prompt position.
    positions: int64 ``[P_local]`` this rank's prompt positions (increasing).
    canon: int64 ``[R_local]`` canonical global index of each local row.
    group_index: int64 ``[R]`` prompt position of every global row.
    """

    counts: torch.Tensor
    positions: torch.Tensor
    canon: torch.Tensor
    group_index: torch.Tensor
    dp: DataParallel

    @classmethod
    def build(
        cls, counts: torch.Tensor, local_group_index: torch.Tensor, dp: DataParallel, owners: torch.Tensor | None = None
    ) -> StepRows:
        """Layout for ``counts`` given this rank's rows.

        Args:
            counts: int64 ``[P]`` rollouts of every prompt position (global).
            local_group_index: int64 ``[R_local]`` index of each local row's prompt among
                this rank's positions (rows of a prompt in their within-group order).
            dp: the data-parallel layout.
            owners: int64 ``[P]`` the rank that holds each prompt's rows; ``None``: the
                round-robin split of :meth:`DataParallel.my_positions` (``p % dp``).
        """
        if owners is None:
            positions = dp.my_positions(counts.numel())
        else:
            if owners.shape != counts.shape:
                raise ValueError(f"owners must be [P]={list(counts.shape)}, got {list(owners.shape)}")
            if owners.numel() and (int(owners.min()) < 0 or int(owners.max()) >= dp.size):
                raise ValueError(f"owners must be ranks in [0, {dp.size})")
            positions = torch.nonzero(owners == dp.rank).flatten()
        return cls(
            counts=counts,
            positions=positions,
            canon=canonical_rows(positions[local_group_index], counts),
            group_index=torch.arange(counts.numel()).repeat_interleave(counts),
            dp=dp,
        )

    @property
    def num_prompts(self) -> int:
        return int(self.counts.numel())

    @property
    def num_rows(self) -> int:
        """Global rows ``R = sum(counts)``."""
        return int(self.group_index.numel())

    def scatter(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's per-row values in canonical order, float64 ``[R]``.

        ``local [R_local]`` holds this rank's rows; NaN entries count as
        missing, and rows that no rank filled come back NaN (callers check).
        """
        values = local.to(torch.float64)
        ok = ~torch.isnan(values)
        out = torch.zeros(2, self.num_rows, dtype=torch.float64)
        out[0, self.canon[ok]] = values[ok]
        out[1, self.canon[ok]] = 1.0
        out = self.dp.sum(out)
        return torch.where(out[1] > 0, out[0], torch.full_like(out[0], math.nan))

    def scatter_prompts(self, local: torch.Tensor) -> torch.Tensor:
        """Per-prompt values of this rank's positions (``[P_local]``) assembled to float64 ``[P]``."""
        out = torch.zeros(self.num_prompts, dtype=torch.float64)
        out[self.positions] = local.to(torch.float64)
        return self.dp.sum(out)

    def local_rows_of(self, global_values: torch.Tensor) -> torch.Tensor:
        """This rank's entries ``[R_local]`` of a canonical per-row tensor ``[R, ...]``."""
        return global_values[self.canon]
