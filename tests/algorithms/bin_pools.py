"""Test helper: a :class:`BinIndex` laid out bin by bin."""

import torch

from nemo_gdro.algorithms.bin_index import BinIndex


def pool_in_bins(sizes):
    """A BinIndex whose bin b holds ``sizes[b]`` prompts (ids in order: bin 0's first)."""
    index = BinIndex(int(sum(sizes)), len(sizes), 0)
    start = 0
    for b, n in enumerate(sizes):
        index.move(torch.arange(start, start + n), torch.full((n,), b))
        start += n
    return index
