import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.allocate import allocate_budget, round_largest_remainder


def test_dynamo_worked_example_excess_rule():
    v = 8 * 8 / 240
    p = torch.tensor([0.01, 0.0625, 0.2, v, 0.2, 0.01, 0.01, v])
    alloc = allocate_budget(p, 128, 8, 24, rule="excess")
    assert alloc.counts.tolist() == [9, 12, 21, 24, 21, 9, 8, 24]
    assert alloc.continuous.sum().item() == pytest.approx(128)


def test_scaled_rule_hand_example():
    # clip(t * w, 2, 12) over w = [1, 4, 9, 0] with total 20: unit 3 sits at 2,
    # unit 0 at 2 (t < 2), so 4t + 9t = 16 -> t = 16/13.
    alloc = allocate_budget(torch.tensor([1.0, 4.0, 9.0, 0.0]), 20, 2, 12, rule="scaled")
    assert alloc.scale == pytest.approx(16 / 13)
    torch.testing.assert_close(
        alloc.continuous, torch.tensor([2.0, 64 / 13, 144 / 13, 2.0], dtype=torch.float64)
    )
    assert alloc.counts.tolist() == [2, 5, 11, 2]


def test_all_zero_weights_spread_evenly_lower_positions_first():
    for rule in ("excess", "scaled"):
        assert allocate_budget(torch.zeros(3), 10, 2, 12, rule=rule).counts.tolist() == [4, 3, 3]


def test_per_unit_bounds_and_refill_after_caps():
    # Unit 0 has a huge weight but is capped at 5: the rest is re-filled among 1 and 2.
    alloc = allocate_budget(torch.tensor([100.0, 1.0, 3.0]), 17, torch.tensor([1, 1, 1]), torch.tensor([5, 20, 20]))
    assert alloc.counts.tolist() == [5, 4, 8]


def test_infeasible_budget_and_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"budget 50 is infeasible.*\[6, 36\]"):
        allocate_budget(torch.ones(3), 50, 2, 12)
    with pytest.raises(ValueError, match="non-negative"):
        allocate_budget(torch.tensor([1.0, -1.0]), 4, 1, 4)
    with pytest.raises(ValueError, match="unknown allocation rule"):
        allocate_budget(torch.ones(2), 4, 1, 4, rule="bogus")


def test_round_largest_remainder_ties_go_to_lower_positions():
    x = torch.tensor([1.5, 1.5, 1.5, 1.5], dtype=torch.float64)
    out = round_largest_remainder(x, 6, torch.zeros(4, dtype=torch.float64), torch.full((4,), 9.0, dtype=torch.float64))
    assert out.tolist() == [2, 2, 1, 1]


@st.composite
def allocation_problems(draw):
    u = draw(st.integers(1, 30))
    n_min = draw(st.integers(0, 6))
    n_max = draw(st.integers(n_min, n_min + 20))
    total = draw(st.integers(u * n_min, u * n_max))
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-4, 100.0)), min_size=u, max_size=u))
    rule = draw(st.sampled_from(["excess", "scaled"]))
    return torch.tensor(weights, dtype=torch.float64), total, n_min, n_max, rule


@given(allocation_problems())
def test_allocation_properties(problem):
    w, total, n_min, n_max, rule = problem
    alloc = allocate_budget(w, total, n_min, n_max, rule=rule)
    counts = alloc.counts
    assert int(counts.sum()) == total
    assert bool((counts >= n_min).all()) and bool((counts <= n_max).all())
    assert alloc.continuous.sum().item() == pytest.approx(total, abs=1e-6)
    # Monotone in weight: a strictly heavier unit never gets fewer units.
    order = torch.argsort(w)
    for a, b in zip(order.tolist(), order.tolist()[1:]):
        if w[b] > w[a]:
            assert counts[b] >= counts[a]
    # Rounding moves each unit by less than one from the continuous solution.
    assert bool(((counts.double() - alloc.continuous).abs() < 1.0 + 1e-9).all())
