import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.bin_index import BinIndex


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
