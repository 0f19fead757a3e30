import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.bin_index import BinIndex
from tests.algorithms.bin_pools import pool_in_bins


@given(moves=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 4)), max_size=80))
def test_bin_index_matches_brute_force_membership(moves):
    index = BinIndex(30, 5, initial_bin=2)
    truth = np.full(30, 2)
    for pid, b in moves:
        index.move(torch.tensor([pid]), torch.tensor([b]))
        truth[pid] = b
    for b in range(5):
        assert sorted(index.members(b).tolist()) == np.nonzero(truth == b)[0].tolist()
    assert index.counts().tolist() == np.bincount(truth, minlength=5).tolist()
    assert bool((index.order[index.where] == np.arange(30)).all())


def test_state_round_trip_and_sampling_within_bin():
    index = BinIndex(12, 3, 0)
    index.move(torch.tensor([1, 5, 9]), torch.tensor([2, 2, 1]))
    other = BinIndex(12, 3, 0)
    other.load_state_dict(index.state_dict())
    rng = np.random.Generator(np.random.PCG64(0))
    ids = other.sample_in_bins(torch.tensor([2] * 20 + [1] * 5), rng)
    assert set(ids[:20].tolist()) <= {1, 5} and set(ids[20:].tolist()) == {9}
    other.move(torch.tensor([9]), torch.tensor([0]))
    assert other.counts().tolist() == [10, 0, 2]




@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    weights=st.lists(st.floats(0.0, 5.0), min_size=5, max_size=5),
    num=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_sampling_without_replacement_never_repeats_within_a_round(sizes, weights, num, seed):
    index = pool_in_bins(sizes)
    w = np.array(weights[: len(sizes)])
    eligible = {int(p) for b in range(len(sizes)) if w[b] > 0 for p in index.members(b)}
    if not eligible:
        return
    before = index.state_dict()
    ids, bins = index.sample_without_replacement(w, num, np.random.Generator(np.random.PCG64(seed)))
    assert ids.shape == bins.shape == (num,)
    assert set(ids.tolist()) <= eligible  # a bin of weight 0 is never drawn from
    assert torch.equal(torch.from_numpy(index.bin_of[ids.numpy()].astype(np.int64)), bins)
    n = len(eligible)
    for r in range(0, num, n):  # each round holds every eligible prompt at most once
        chunk = ids[r : r + n].tolist()
        assert len(set(chunk)) == len(chunk)
    counts = np.bincount(ids.numpy(), minlength=index.num_prompts)[sorted(eligible)]
    assert counts.max() - counts.min() <= 1  # rounds: nobody drawn twice before everyone once
    assert all(torch.equal(before[k], index.state_dict()[k]) for k in before)  # drawing changes nothing


def test_equal_weights_draw_uniform_ordered_samples_over_the_pool():
    """Equal weights: every ordered pair of distinct prompts equally likely (exact uniform without replacement)."""
    index = pool_in_bins([1, 3, 0, 1])
    rng = np.random.Generator(np.random.PCG64(3))
    pairs = np.zeros((5, 5))
    for _ in range(8000):
        ids, _ = index.sample_without_replacement(np.array([2.0, 2.0, 0.0, 2.0]), 2, rng)
        pairs[ids[0], ids[1]] += 1
    assert np.diag(pairs).sum() == 0
    off = pairs[~np.eye(5, dtype=bool)]
    assert np.abs(off - 8000 / 20).max() < 90  # 400 expected each, sd ~19


def test_weighted_draws_and_errors():
    index = pool_in_bins([4, 4])
    rng = np.random.Generator(np.random.PCG64(0))
    # Bin 1's prompts weigh 3x: the first draw of a step comes from bin 1 with probability 3/4.
    first = [int(index.sample_without_replacement(np.array([1.0, 3.0]), 3, rng)[1][0]) for _ in range(4000)]
    assert abs(np.mean(first) - 0.75) < 0.03
    with pytest.raises(ValueError, match="shape"):
        index.sample_without_replacement(np.ones(3), 2, rng)
    with pytest.raises(ValueError, match=">= 0"):
        index.sample_without_replacement(np.array([1.0, -1.0]), 2, rng)
    with pytest.raises(ValueError, match="positive weight"):
        pool_in_bins([0, 4]).sample_without_replacement(np.array([1.0, 0.0]), 2, rng)
