"""Online difficulty classifier: pass-rate bins with hysteresis (gdro.md §1).

Reads the per-prompt window from :class:`PromptStatsStore`; the only state it
writes is each prompt's last assigned bin (kept in the store, so that it is
sharded and checkpointed with the rest of the per-prompt history).

Timing: call :meth:`DifficultyClassifier.classify` for a step's prompts BEFORE
generation (statistics up to the previous step); the training loop updates the
store with this step's outcomes afterwards. Classification is idempotent, so
re-classifying the observed prompts after the update (to refresh a sampler's
bin membership) does not change the next step's decision.
"""

from __future__ import annotations

import torch

from nemo_gdro.algorithms.configs import DifficultyConfig
from nemo_gdro.algorithms.stats import PromptStatsStore


class DifficultyClassifier:
    """Assigns each prompt of a step to a difficulty bin from its own history."""

    def __init__(self, config: DifficultyConfig, store: PromptStatsStore) -> None:
        self.config = config
        self.store = store
        self._edges = torch.tensor(config.edges, dtype=torch.float64)
        # Bin b covers [lower[b], upper[b]); the outer bins reach 0 and 1.
        self._lower = torch.cat([torch.zeros(1, dtype=torch.float64), self._edges])
        self._upper = torch.cat([self._edges, torch.ones(1, dtype=torch.float64)])

    @property
    def num_bins(self) -> int:
        return self.config.num_bins

    def raw_bins(self, estimate: torch.Tensor) -> torch.Tensor:
        """Bin without hysteresis: the number of edges ``<=`` the estimate (int64)."""
        return torch.bucketize(estimate.to(torch.float64), self._edges, right=True)

    def classify(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Bins of this step's prompts (int64 ``[P]``) and record them as last bins.

        Unseen prompts go to the unseen bin and keep no last bin, so hysteresis
        only ever holds a prompt in a bin it earned from its own estimate.
        Duplicate ids get the same bin (they read the same state).
        """
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
        estimate, count = self.store.window_estimate(ids)
        seen = count > 0
        raw = self.raw_bins(estimate)
        prev = self.store.get_last_bin(ids)
        has_prev = seen & (prev >= 0) & (prev < self.config.num_pass_rate_bins)
        prev_c = prev.clamp(0, self.config.num_pass_rate_bins - 1)
        delta = self.config.hysteresis
        inside = (estimate >= self._lower[prev_c] - delta) & (estimate <= self._upper[prev_c] + delta)
        bins = torch.where(has_prev & inside, prev_c, raw)
        bins = torch.where(seen, bins, torch.full_like(bins, self.config.unseen_bin_index))
        self.store.set_last_bin(ids, torch.where(seen, bins, torch.full_like(bins, -1)))
        return bins

    def state_dict(self) -> dict:
        """The classifier keeps no state of its own beyond its configuration.

        Per-prompt history (and last bins) live in the store's checkpoint; the
        configuration is saved so that a resume with other edges fails loudly
        instead of silently re-binning every prompt.
        """
        return {
            "edges": list(self.config.edges),
            "hysteresis": self.config.hysteresis,
            "unseen_bin": self.config.unseen_bin,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (list(state.get("edges", [])), state.get("hysteresis"), state.get("unseen_bin"))
        now = (list(self.config.edges), self.config.hysteresis, self.config.unseen_bin)
        if saved != now:
            raise ValueError(
                f"difficulty classifier checkpoint has (edges, hysteresis, unseen_bin)={saved}, "
                f"this run is configured with {now}"
            )


def bin_shares(bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Fraction of the entries of ``bins [N]`` in each bin (float64 ``[B]``)."""
    counts = torch.bincount(bins.to(torch.int64), minlength=num_bins).to(torch.float64)
    return counts / counts.sum().clamp_min(1.0)
