"""Canonical row layout and the DP reductions of parallel/rows.py (real gloo groups for DP=2)."""

import math
import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_gdro.parallel.rows import DataParallel, StepRows, canonical_rows


def test_canonical_rows_orders_by_position_then_within_group():
    counts = torch.tensor([2, 3, 1])  # global rows: p0 -> 0,1; p1 -> 2,3,4; p2 -> 5
    # This rank holds positions 1 and 2 (rows of a position in their within-group order).
    positions = torch.tensor([2, 1, 1, 1])
    assert canonical_rows(positions, counts).tolist() == [5, 2, 3, 4]


def test_single_process_layout_is_the_identity():
    counts = torch.tensor([2, 1, 3])
    gi = torch.repeat_interleave(torch.arange(3), counts)
    rows = StepRows.build(counts, gi, DataParallel())
    assert rows.canon.tolist() == list(range(6)) and torch.equal(rows.group_index, gi)
    values = torch.arange(6, dtype=torch.float64)
    values[4] = math.nan  # a row nobody filled comes back NaN
    out = rows.scatter(values)
    assert out[:4].tolist() == [0.0, 1.0, 2.0, 3.0] and math.isnan(out[4]) and out[5] == 5.0
    assert rows.scatter_prompts(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]
    assert DataParallel().total(1.5, 2.0) == [1.5, 2.0]


def test_explicit_owners_lay_out_kept_groups_without_moving_rows():
    """Kept groups of two rounds (round 0 positions 1, 2; round 1 position 0) stay on the rank that
    generated them (position % 2); the canonical order is the order of the owner map."""
    counts = torch.tensor([3, 2, 4])  # kept prompts in (round, position) order
    owners = torch.tensor([1, 0, 0])  # r0p1 -> rank 1, r0p2 -> rank 0, r1p0 -> rank 0
    expected_canon = {0: [3, 4, 5, 6, 7, 8], 1: [0, 1, 2]}
    canon = []
    for rank in (0, 1):
        dp = DataParallel(rank=rank, size=2)
        mine = torch.nonzero(owners == rank).flatten()
        local_gi = torch.repeat_interleave(torch.arange(mine.numel()), counts[mine])
        rows = StepRows.build(counts, local_gi, dp, owners=owners)
        assert rows.positions.tolist() == mine.tolist()
        assert rows.canon.tolist() == expected_canon[rank]
        assert torch.equal(rows.group_index, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]))
        canon += rows.canon.tolist()
    assert sorted(canon) == list(range(9))
    # The round-robin owner map is the default layout.
    counts = torch.tensor([2, 1, 3, 1])
    for rank in (0, 1):
        dp = DataParallel(rank=rank, size=2)
        gi = torch.repeat_interleave(torch.arange(2), counts[dp.my_positions(4)])
        default, explicit = StepRows.build(counts, gi, dp), StepRows.build(counts, gi, dp, owners=torch.arange(4) % 2)
        assert torch.equal(default.positions, explicit.positions) and torch.equal(default.canon, explicit.canon)
    with pytest.raises(ValueError, match="owners must be ranks"):
        StepRows.build(counts, gi, DataParallel(rank=0, size=2), owners=torch.tensor([0, 2, 0, 1]))
    with pytest.raises(ValueError, match="owners must be"):
        StepRows.build(counts, gi, DataParallel(rank=0, size=2), owners=torch.tensor([0, 1]))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        dp = DataParallel(rank=rank, size=world, group=dist.group.WORLD)
        counts = torch.tensor([2, 3, 1, 2, 1])
        mine = dp.my_positions(5)
        local_gi = torch.repeat_interleave(torch.arange(mine.numel()), counts[mine])
        rows = StepRows.build(counts, local_gi, dp)
        # Each local row carries its global (position, index-within-group) code.
        pos = mine[local_gi]
        within = torch.cat([torch.arange(int(c)) for c in counts[mine]])
        global_rows = rows.scatter((pos * 10 + within).double())
        prompts = rows.scatter_prompts(mine.double() * 100)
        totals = dp.total(float(rank + 1), 1.0)
        torch.save({"rows": global_rows, "prompts": prompts, "totals": totals, "canon": rows.canon},
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dp2_scatter_assembles_every_rank_in_canonical_order():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outs = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(2)]
    counts = torch.tensor([2, 3, 1, 2, 1])
    expected = torch.cat([p * 10 + torch.arange(int(c)) for p, c in enumerate(counts)]).double()
    for out in outs:
        assert torch.equal(out["rows"], expected)  # identical on both ranks, in canonical order
        assert out["prompts"].tolist() == [0.0, 100.0, 200.0, 300.0, 400.0]
        assert out["totals"] == [3.0, 2.0]
    assert sorted(torch.cat([o["canon"] for o in outs]).tolist()) == list(range(9))
