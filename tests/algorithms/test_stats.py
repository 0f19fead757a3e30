import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.stats import (
    FRACTION_SCALE,
    PromptStatsStore,
    StatsConfig,
    group_outcomes,
)


def test_group_outcomes_uses_explicit_group_index():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    gi = torch.tensor([2, 0, 0, 2, 1])
    n, c = group_outcomes(rewards, gi, 3, correct_threshold=0.5)
    assert n.tolist() == [2, 1, 2] and c.tolist() == [1, 0, 2]


@given(window=st.integers(1, 64), outcomes=st.lists(st.integers(0, 3), min_size=1, max_size=150))
def test_bit_window_equals_mean_of_last_h_indicators(window, outcomes):
    store = PromptStatsStore(5, StatsConfig(window=window))
    for c in outcomes:
        store.observe(torch.tensor([3]), torch.tensor([3]), torch.tensor([c]))
    est, count = store.window_estimate(torch.tensor([3, 4]))
    last = [1.0 if c > 0 else 0.0 for c in outcomes[-window:]]
    assert count.tolist() == [len(last), 0]
    assert est[0].item() == pytest.approx(sum(last) / len(last))
    g, k = store.counters(torch.tensor([3]))
    assert g.item() == 3 * len(outcomes) and k.item() == sum(outcomes)


def test_fraction_window_is_exact_for_small_groups():
    store = PromptStatsStore(4, StatsConfig(window=3, indicator="mean_correct"))
    for c in [1, 0, 2, 3, 0]:
        store.observe(torch.tensor([2]), torch.tensor([3]), torch.tensor([c]))
    est, count = store.window_estimate(torch.tensor([2]))
    assert count.item() == 3
    assert est.item() == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1 / FRACTION_SCALE)


def test_duplicate_ids_in_one_step_merge_into_one_observation():
    store = PromptStatsStore(4, StatsConfig(window=8))
    store.observe(torch.tensor([1, 1, 2]), torch.tensor([4, 2, 4]), torch.tensor([0, 1, 0]))
    est, count = store.window_estimate(torch.tensor([1, 2]))
    assert count.tolist() == [1, 1] and est.tolist() == [1.0, 0.0]
    assert store.counters(torch.tensor([1]))[0].item() == 6
    assert store.seen[1].item() == 1


def test_counter_decay_option():
    store = PromptStatsStore(2, StatsConfig(counter_decay=0.5))
    store.observe(torch.tensor([0]), torch.tensor([4]), torch.tensor([4]))
    store.observe(torch.tensor([0]), torch.tensor([4]), torch.tensor([0]))
    g, k = store.counters(torch.tensor([0]))
    assert (g.item(), k.item()) == (6.0, 2.0)


def test_success_rate_unseen_default():
    store = PromptStatsStore(3)
    store.observe(torch.tensor([0]), torch.tensor([4]), torch.tensor([1]))
    assert store.success_rate(torch.tensor([0, 1])).tolist() == [0.25, 0.5]


def test_sharded_store_holds_only_its_ids():
    shards = [PromptStatsStore(10, shard_rank=r, num_shards=3) for r in range(3)]
    assert [s.num_local for s in shards] == [4, 3, 3]
    shards[1].observe(torch.tensor([1, 7]), torch.tensor([2, 2]), torch.tensor([1, 0]))
    assert shards[1].window_estimate(torch.tensor([7, 1]))[0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="does not own"):
        shards[1].observe(torch.tensor([2]), torch.tensor([1]), torch.tensor([0]))


def test_invalid_inputs_are_rejected_with_clear_errors():
    store = PromptStatsStore(5)
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        store.observe(torch.tensor([5]), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_correct <= num_rollouts"):
        store.observe(torch.tensor([1]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="stats.window"):
        StatsConfig(window=65)


def test_state_dict_round_trip_and_mismatch_errors(tmp_path):
    store = PromptStatsStore(6, StatsConfig(window=5))
    store.observe(torch.tensor([0, 3]), torch.tensor([4, 4]), torch.tensor([1, 0]))
    store.set_last_bin(torch.tensor([0]), torch.tensor([4]))
    torch.save(store.state_dict(), tmp_path / "s.pt")
    other = PromptStatsStore(6, StatsConfig(window=5))
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    for s in (store, other):
        s.observe(torch.tensor([3]), torch.tensor([2]), torch.tensor([2]))
    assert torch.equal(store.window_bits, other.window_bits)
    assert torch.equal(store.rollouts, other.rollouts)
    assert other.get_last_bin(torch.tensor([0])).item() == 4
    with pytest.raises(ValueError, match="written with"):
        PromptStatsStore(6, StatsConfig(window=7)).load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match="num_prompts, shard_rank, num_shards"):
        PromptStatsStore(7, StatsConfig(window=5)).load_state_dict(store.state_dict())
