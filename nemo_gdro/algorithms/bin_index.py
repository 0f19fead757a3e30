"""Bin membership of every dataset prompt, for sampling a prompt uniformly within a bin.

Prompt-GDRO's ``resample`` mode draws a bin from ``q`` and then a prompt
uniformly inside it. Recomputing every prompt's bin each step would cost O(N)
(10M prompts); instead the members of all bins live in one permutation array
``order``, grouped by bin (bin b occupies ``order[start[b]:start[b+1]]``), and
``where[prompt]`` is the prompt's position in it. Moving a prompt from bin a
to bin c swaps it across the |a - c| boundaries in between: O(B) per moved
prompt, O(batch) per step.
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
