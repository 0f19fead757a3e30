import pytest
import torch

from nemo_gdro.algorithms.difficulty import (
    DifficultyClassifier,
    DifficultyConfig,
    bin_shares,
)
from nemo_gdro.algorithms.stats import PromptStatsStore, StatsConfig


def feed(store, pid, indicators):
    for c in indicators:
        store.observe(torch.tensor([pid]), torch.tensor([4]), torch.tensor([c]))


def test_raw_bins_count_edges_at_or_below_estimate():
    clf = DifficultyClassifier(DifficultyConfig(), PromptStatsStore(1))
    est = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.5, 0.89, 0.9, 1.0], dtype=torch.float64)
    assert clf.raw_bins(est).tolist() == [0, 0, 1, 1, 5, 8, 9, 9]


def test_unseen_prompts_go_to_configured_bin():
    store = PromptStatsStore(4)
    assert DifficultyClassifier(DifficultyConfig(), store).classify(torch.tensor([0, 1])).tolist() == [0, 0]
    sep = DifficultyClassifier(DifficultyConfig(unseen_bin="separate"), store)
    assert sep.num_bins == 11
    assert sep.classify(torch.tensor([2])).tolist() == [10]


def test_hysteresis_holds_a_prompt_until_it_leaves_by_more_than_delta():
    store = PromptStatsStore(2, StatsConfig(window=50))
    clf = DifficultyClassifier(DifficultyConfig(hysteresis=0.03), store)
    feed(store, 0, [1] * 25 + [0] * 25)  # 0.50 -> bin 5
    assert clf.classify(torch.tensor([0])).item() == 5
    feed(store, 0, [0])  # window drops a 1, adds a 0: 24/50 = 0.48 -> raw bin 4, within delta
    assert clf.raw_bins(store.window_estimate(torch.tensor([0]))[0]).item() == 4
    assert clf.classify(torch.tensor([0])).item() == 5
    feed(store, 0, [0])  # 23/50 = 0.46 < 0.5 - 0.03 -> leaves to raw bin 4
    assert clf.classify(torch.tensor([0])).item() == 4
    # Without hysteresis the prompt would have moved at 0.48 already.
    store2 = PromptStatsStore(1, StatsConfig(window=50))
    clf0 = DifficultyClassifier(DifficultyConfig(hysteresis=0.0), store2)
    feed(store2, 0, [1] * 25 + [0] * 25)
    clf0.classify(torch.tensor([0]))
    feed(store2, 0, [0])
    assert clf0.classify(torch.tensor([0])).item() == 4


def test_classification_is_idempotent_and_per_prompt():
    store = PromptStatsStore(3, StatsConfig(window=10))
    clf = DifficultyClassifier(DifficultyConfig(), store)
    feed(store, 0, [1] * 10)
    feed(store, 2, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    first = clf.classify(torch.tensor([2, 0, 1, 0]))
    assert first.tolist() == [1, 9, 0, 9]
    assert torch.equal(clf.classify(torch.tensor([2, 0, 1, 0])), first)


def test_labels_are_of_this_steps_prompts_whatever_the_order():
    # The GDRO release applied the previous batch's labels by position (gdro.md §6.1).
    store = PromptStatsStore(20, StatsConfig(window=10))
    g = torch.Generator().manual_seed(0)
    for pid in range(20):
        feed(store, pid, torch.randint(0, 2, (10,), generator=g).tolist())
    clf = DifficultyClassifier(DifficultyConfig(hysteresis=0.0), store)
    batch = torch.tensor([4, 17, 9, 0, 12])
    bins = clf.classify(batch)
    perm = torch.randperm(5, generator=g)
    assert torch.equal(clf.classify(batch[perm]), bins[perm])
    est, _ = store.window_estimate(batch)
    assert torch.equal(bins, clf.raw_bins(est))


def test_config_validation_and_checkpoint_mismatch():
    with pytest.raises(ValueError, match="difficulty.edges"):
        DifficultyConfig(edges=(0.5, 0.2))
    with pytest.raises(ValueError, match="difficulty.unseen_bin"):
        DifficultyConfig(unseen_bin=11)
    clf = DifficultyClassifier(DifficultyConfig(), PromptStatsStore(1))
    state = clf.state_dict()
    DifficultyClassifier(DifficultyConfig(), PromptStatsStore(1)).load_state_dict(state)
    with pytest.raises(ValueError, match="edges"):
        DifficultyClassifier(DifficultyConfig(edges=(0.5,)), PromptStatsStore(1)).load_state_dict(state)


def test_bin_shares():
    assert bin_shares(torch.tensor([0, 0, 2, 3]), 4).tolist() == [0.5, 0.0, 0.25, 0.25]
