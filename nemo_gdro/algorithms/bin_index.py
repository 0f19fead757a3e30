"""Bin membership of every dataset prompt, for sampling a prompt uniformly within a bin.

Prompt-GDRO's ``resample`` mode draws a bin from ``q`` and then a prompt
uniformly inside it. Recomputing every prompt's bin each step would cost O(N)
(10M prompts); instead the members of all bins live in one permutation array
``order``, grouped by bin (bin b occupies ``order[start[b]:start[b+1]]``), and
``where[prompt]`` is the prompt's position in it. Moving a prompt from bin a
to bin c swaps it across the |a - c| boundaries in between: O(B) per moved
prompt, O(batch) per step.

Two ways to draw a step's prompts: :meth:`BinIndex.sample_in_bins` (one
prompt per requested bin, with replacement; the ``bins`` form of
resampling) and :meth:`BinIndex.sample_without_replacement` (prompts weighted
by their bin, no prompt twice in a step; the ``data`` form, gdro.md §2).
"""

from __future__ import annotations

import numpy as np
import torch


class BinIndex:
    """Which prompts are in which bin; supports O(1) uniform draws within a bin."""

    def __init__(self, num_prompts: int, num_bins: int, initial_bin: int) -> None:
        if not 0 <= initial_bin < num_bins:
            raise ValueError(f"initial_bin {initial_bin} not in [0, {num_bins})")
        self.num_prompts = int(num_prompts)
        self.num_bins = int(num_bins)
        self.order = np.arange(self.num_prompts, dtype=np.int64)
        self.where = np.arange(self.num_prompts, dtype=np.int64)
        self.bin_of = np.full(self.num_prompts, initial_bin, dtype=np.int16)
        # start[b] .. start[b+1] is bin b's slice of `order`.
        self.start = np.zeros(self.num_bins + 1, dtype=np.int64)
        self.start[initial_bin + 1 :] = self.num_prompts

    def counts(self) -> torch.Tensor:
        """Prompts per bin, int64 ``[B]``."""
        return torch.from_numpy(np.diff(self.start).copy())

    def members(self, b: int) -> np.ndarray:
        return self.order[self.start[b] : self.start[b + 1]]

    def _swap(self, i: int, j: int) -> None:
        if i != j:
            pi, pj = self.order[i], self.order[j]
            self.order[i], self.order[j] = pj, pi
            self.where[pj], self.where[pi] = i, j

    def move(self, prompt_ids: torch.Tensor, bins: torch.Tensor) -> None:
        """Record the current bin of each given prompt (``[P]`` ids, ``[P]`` bins)."""
        for pid, new in zip(prompt_ids.tolist(), bins.tolist()):
            cur = int(self.bin_of[pid])
            if not 0 <= new < self.num_bins:
                raise ValueError(f"bin {new} of prompt {pid} not in [0, {self.num_bins})")
            while cur < new:
                # Swap to the end of bin `cur`, then shift the boundary left over it.
                last = self.start[cur + 1] - 1
                self._swap(int(self.where[pid]), int(last))
                self.start[cur + 1] -= 1
                cur += 1
            while cur > new:
                first = self.start[cur]
                self._swap(int(self.where[pid]), int(first))
                self.start[cur] += 1
                cur -= 1
            self.bin_of[pid] = new

    def sample_in_bins(self, bins: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One prompt id drawn uniformly (with replacement) from each requested bin."""
        b = bins.numpy().astype(np.int64)
        size = self.start[b + 1] - self.start[b]
        if (size == 0).any():
            raise ValueError(f"cannot sample from empty bins {sorted(set(b[size == 0].tolist()))}")
        offset = (rng.random(b.size) * size).astype(np.int64)
        return torch.from_numpy(self.order[self.start[b] + offset].copy())

    def sample_without_replacement(
        self, prompt_weight: np.ndarray | torch.Tensor, num: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` prompts by successive sampling without replacement, each prompt of bin b
        weighted ``prompt_weight[b]``.

        Each draw picks bin b with probability proportional to ``prompt_weight[b]``
        times the prompts of b not yet drawn this step, then one of those uniformly
        (a sparse Fisher-Yates shuffle per bin, so nothing of the index changes and
        a draw costs O(B)). The first draw picks bin b with probability
        ``count_b w_b / sum_j count_j w_j``; with equal weights every draw is uniform
        over the pool's remaining prompts, i.e. exactly uniform sampling over the
        pool without replacement. When every prompt of positive weight has been
        drawn (a step larger than the pool) a new round starts, so a prompt then
        appears at most once more per round.

        Args:
            prompt_weight: float ``[B]``, ``>= 0``, the relative weight of one prompt of each bin.
            num: prompts to draw.
            rng: the caller's generator (its state is the only randomness, so a
                restored generator repeats the draws).
        Returns:
            ``(prompt_ids [num], bins [num])`` int64, in draw order.
        """
        w = np.asarray(prompt_weight, dtype=np.float64)
        if w.shape != (self.num_bins,):
            raise ValueError(f"prompt_weight must have shape ({self.num_bins},), got {tuple(w.shape)}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"prompt_weight must be finite and >= 0, got {w.tolist()}")
        counts = np.diff(self.start)
        if not (w * counts > 0).any():
            raise ValueError("no prompt has a positive weight: nothing to draw")
        remaining = counts.copy()
        swapped: list[dict[int, int]] = [{} for _ in range(self.num_bins)]
        ids = np.empty(num, dtype=np.int64)
        bins = np.empty(num, dtype=np.int64)
        last_positive = int(np.nonzero(w * counts > 0)[0][-1])
        for t in range(num):
            mass = np.cumsum(w * remaining)
            if mass[-1] <= 0:  # every prompt of positive weight drawn: a new round
                remaining = counts.copy()
                swapped = [{} for _ in range(self.num_bins)]
                mass = np.cumsum(w * remaining)
            # First bin whose cumulative mass exceeds u: never a bin of zero mass.
            b = min(int(np.searchsorted(mass, rng.random() * mass[-1], side="right")), last_positive)
            while w[b] * remaining[b] <= 0:  # only reachable through rounding at the top end
                b -= 1
            # Sparse Fisher-Yates over the bin's slice: positions < k are this step's draws.
            k = int(counts[b] - remaining[b])
            j = int(rng.integers(k, counts[b]))
            moved = swapped[b]
            offset = moved.get(j, j)
            moved[j] = moved.get(k, k)
            remaining[b] -= 1
            ids[t] = self.order[self.start[b] + offset]
            bins[t] = b
        return torch.from_numpy(ids), torch.from_numpy(bins)

    def state_dict(self) -> dict:
        return {
            "order": torch.from_numpy(self.order.copy()),
            "start": torch.from_numpy(self.start.copy()),
            "bin_of": torch.from_numpy(self.bin_of.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        order = state["order"].numpy()
        if order.shape != self.order.shape or state["start"].numel() != self.start.size:
            raise ValueError(
                f"bin index checkpoint is for {order.size} prompts / {state['start'].numel() - 1} bins, "
                f"this run has {self.num_prompts} / {self.num_bins}"
            )
        self.order = order.astype(np.int64).copy()
        self.start = state["start"].numpy().astype(np.int64).copy()
        self.bin_of = state["bin_of"].numpy().astype(np.int16).copy()
        self.where = np.empty_like(self.order)
        self.where[self.order] = np.arange(self.num_prompts, dtype=np.int64)
