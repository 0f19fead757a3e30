"""Micro-batch plans: fixed size, token budget (padding counted), pipeline sizes."""

from __future__ import annotations

import pytest
import torch

from nemo_gdro.trainer.microbatch import pipeline_micro_batch_size, plan_fixed, plan_token_budget


def test_fixed_plan_covers_rows_in_order():
    plan = plan_fixed(7, 20, 3)
    assert [mb.index.tolist() for mb in plan] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(mb.width == 20 for mb in plan)


def test_token_budget_packs_longest_first_under_budget():
    lengths = torch.tensor([5, 20, 12, 20, 8, 15, 3])
    plan = plan_token_budget(lengths, 40)
    # every row exactly once
    assert sorted(torch.cat([mb.index for mb in plan]).tolist()) == list(range(7))
    for mb in plan:
        assert mb.width == int(lengths[mb.index].max())
        assert mb.index.numel() * mb.width <= 40
    # longest first: the two 20-token rows share the first micro-batch
    assert plan[0].index.tolist() == [1, 3] and plan[0].width == 20
    # greedy packing leaves no micro-batch that could take the next one's first row
    for a, b in zip(plan, plan[1:]):
        assert (a.index.numel() + 1) * a.width > 40 or b.width > a.width


def test_token_budget_fewer_padded_tokens_than_fixed():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 400, (64,), generator=g)
    packed = plan_token_budget(lengths, 1600)
    padded_packed = sum(mb.index.numel() * mb.width for mb in packed)
    padded_fixed = sum(mb.index.numel() * mb.width for mb in plan_fixed(64, int(lengths.max()), 4))
    assert padded_packed < 0.8 * padded_fixed


def test_row_over_budget_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="trainer.max_tokens_per_microbatch=16"):
        plan_token_budget(torch.tensor([10, 17]), 16)


def test_pipeline_size_divides_the_batch_and_fits():
    assert pipeline_micro_batch_size(8, 16, 40) == 2
    assert pipeline_micro_batch_size(6, 10, 45) == 3
    assert pipeline_micro_batch_size(7, 10, 45) == 1  # 7 is prime: 1 row at a time
    assert pipeline_micro_batch_size(8, 100, 50) == 1
