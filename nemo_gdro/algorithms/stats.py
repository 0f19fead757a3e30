"""Per-prompt statistics store: the history every controller reads.

Per prompt_id it keeps (gdro.md §1, dynamo.md §1):
- a window of the last ``H <= 64`` correctness indicators. For the default
  ``any_correct`` indicator the window is one int64 bit mask plus a running
  count of ones, so memory and time per prompt are O(1) (about 22 bytes per
  prompt in all: 10M prompts cost ~220 MB). The ``mean_correct`` indicator
  stores fractions, which need a ring of ``H`` int16 values per prompt
  (fractions are exact for up to 12 rollouts; resolution 1/27720 beyond).
- ``seen``: how many steps the prompt was observed.
- cumulative counters ``G`` (rollouts generated) and ``K`` (correct ones),
  optionally decayed on each observation.
- ``last_bin``: the bin the classifier last assigned (-1: none), for hysteresis.

The table is sharded by ``prompt_id % num_shards`` (shard ``shard_rank`` holds
local row ``prompt_id // num_shards``), so a data-parallel layout can split it
across ranks; with one shard it holds every prompt. Every method touches only
the rows it is given: O(batch) work per step whatever the dataset size.

The store is updated exactly once per step (``observe``) by the training loop;
controllers only read it, so no statistic is ever counted twice (the bug the
GDRO release had when two controllers shared one EMA).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from nemo_gdro.algorithms.configs import MAX_WINDOW, StatsConfig
from nemo_gdro.algorithms.segments import check_segment_index, segment_sum

# lcm(1..12): fractions k/n with n <= 12 are exact in the int16 ring.
FRACTION_SCALE = 27720


def group_outcomes(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, correct_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts and correct rollouts per prompt position.

    Args:
        rewards: ``[R]`` per-rollout rewards.
        group_index: ``[R]`` rollout row -> prompt position in ``[0, num_groups)``.
        correct_threshold: a rollout is correct when its reward is above this.
    Returns:
        ``(num_rollouts [P], num_correct [P])`` as int64.
    """
    check_segment_index(group_index, num_groups)
    ones = torch.ones_like(rewards, dtype=torch.int64)
    correct = (rewards > correct_threshold).to(torch.int64)
    return segment_sum(ones, group_index, num_groups), segment_sum(correct, group_index, num_groups)


class PromptStatsStore:
    """Sharded per-prompt history table (see module docstring)."""

    def __init__(
        self,
        num_prompts: int,
        config: StatsConfig | None = None,
        *,
        shard_rank: int = 0,
        num_shards: int = 1,
    ) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if not 0 <= shard_rank < num_shards:
            raise ValueError(f"shard_rank {shard_rank} not in [0, {num_shards})")
        self.config = config or StatsConfig()
        self.num_prompts = int(num_prompts)
        self.shard_rank = int(shard_rank)
        self.num_shards = int(num_shards)
        n = self.num_local = (self.num_prompts - self.shard_rank + self.num_shards - 1) // self.num_shards
        h = self.config.window
        self._mask = -1 if h == MAX_WINDOW else (1 << h) - 1
        if self.config.indicator == "any_correct":
            self.window_bits = torch.zeros(n, dtype=torch.int64)
            self.window_ring = None
        else:
            self.window_bits = None
            self.window_ring = torch.zeros(n, h, dtype=torch.int16)
        # Sum of the window's values: ones for bits, FRACTION_SCALE units for the ring.
        self.window_sum = torch.zeros(n, dtype=torch.int32)
        self.window_count = torch.zeros(n, dtype=torch.int8)
        self.seen = torch.zeros(n, dtype=torch.int32)
        self.rollouts = torch.zeros(n, dtype=torch.float32)  # G
        self.correct = torch.zeros(n, dtype=torch.float32)  # K
        self.last_bin = torch.full((n,), -1, dtype=torch.int8)

    # ----------------------------------------------------------------- indexing
    def owns(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``[P]``: which ids this shard holds."""
        return (prompt_ids % self.num_shards) == self.shard_rank

    def local_index(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Local rows of ``prompt_ids [P]``; raises if an id is foreign or out of range."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_prompts:
                raise ValueError(f"prompt_id out of range [0, {self.num_prompts}): got [{lo}, {hi}]")
            if self.num_shards > 1 and not bool(self.owns(ids).all()):
                raise ValueError(
                    f"shard {self.shard_rank}/{self.num_shards} was asked for prompt ids it does not own"
                )
        return ids // self.num_shards

    # ------------------------------------------------------------------ reading
    def window_estimate(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windowed success estimate and window length per prompt.

        Returns ``(estimate float64 [P], count int64 [P])``; the estimate is 0
        where ``count == 0`` (unseen: callers must look at ``count``).
        """
        rows = self.local_index(prompt_ids)
        count = self.window_count[rows].to(torch.int64)
        total = self.window_sum[rows].to(torch.float64)
        if self.window_ring is not None:
            total = total / FRACTION_SCALE
        return total / count.clamp_min(1).to(torch.float64), count

    def counters(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative ``(G, K)`` per prompt as float64 ``[P]``."""
        rows = self.local_index(prompt_ids)
        return self.rollouts[rows].to(torch.float64), self.correct[rows].to(torch.float64)

    def success_rate(self, prompt_ids: torch.Tensor, unseen: float = 0.5) -> torch.Tensor:
        """Per-rollout success rate ``K / G`` (float64 ``[P]``), ``unseen`` where ``G == 0``."""
        g, k = self.counters(prompt_ids)
        return torch.where(g > 0, k / g.clamp_min(1e-12), torch.full_like(g, unseen))

    def get_last_bin(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.last_bin[self.local_index(prompt_ids)].to(torch.int64)

    def set_last_bin(self, prompt_ids: torch.Tensor, bins: torch.Tensor) -> None:
        self.last_bin[self.local_index(prompt_ids)] = bins.to(torch.int8)

    # ------------------------------------------------------------------ writing
    def observe(
        self, prompt_ids: torch.Tensor, num_rollouts: torch.Tensor, num_correct: torch.Tensor
    ) -> None:
        """Record one step's outcomes.

        Args:
            prompt_ids: ``[P]`` ids of the step's prompts (duplicates allowed:
                a prompt drawn twice is merged into one observation).
            num_rollouts: ``[P]`` rollouts generated for each entry (>= 1).
            num_correct: ``[P]`` correct ones among them.
        """
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
        n = torch.as_tensor(num_rollouts, dtype=torch.int64)
        c = torch.as_tensor(num_correct, dtype=torch.int64)
        if not (ids.shape == n.shape == c.shape) or ids.dim() != 1:
            raise ValueError("prompt_ids, num_rollouts and num_correct must all be [P]")
        if (n < 1).any() or (c < 0).any() or (c > n).any():
            raise ValueError("need num_rollouts >= 1 and 0 <= num_correct <= num_rollouts")
        uniq, inverse = torch.unique(ids, return_inverse=True)
        n_u = segment_sum(n, inverse, uniq.numel())
        c_u = segment_sum(c, inverse, uniq.numel())
        rows = self.local_index(uniq)
        self._push_window(rows, n_u, c_u)
        self.seen[rows] += 1
        decay = self.config.counter_decay
        if decay is not None:
            self.rollouts[rows] *= decay
            self.correct[rows] *= decay
        self.rollouts[rows] += n_u.to(torch.float32)
        self.correct[rows] += c_u.to(torch.float32)

    def _push_window(self, rows: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> None:
        h = self.config.window
        count = self.window_count[rows].to(torch.int32)
        full = count >= h
        if self.window_bits is not None:
            value = (c > 0).to(torch.int64)
            bits = self.window_bits[rows]
            leaving = torch.where(full, (bits >> (h - 1)) & 1, torch.zeros_like(bits))
            self.window_bits[rows] = ((bits << 1) | value) & self._mask
        else:
            value = torch.div(c * FRACTION_SCALE, n, rounding_mode="floor")
            slot = (self.seen[rows].to(torch.int64)) % h
            leaving = torch.where(full, self.window_ring[rows, slot].to(torch.int64), torch.zeros_like(value))
            self.window_ring[rows, slot] = value.to(torch.int16)
        self.window_sum[rows] += (value - leaving).to(torch.int32)
        self.window_count[rows] = torch.clamp(count + 1, max=h).to(torch.int8)

    # ------------------------------------------------------------- checkpoints
    _TENSORS = ("window_bits", "window_ring", "window_sum", "window_count", "seen", "rollouts", "correct", "last_bin")

    def state_dict(self) -> dict:
        state = {name: getattr(self, name) for name in self._TENSORS if getattr(self, name) is not None}
        state.update(
            config=asdict(self.config),
            num_prompts=self.num_prompts,
            shard_rank=self.shard_rank,
            num_shards=self.num_shards,
        )
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("config", "num_prompts", "shard_rank", "num_shards"):
            if key not in state:
                raise KeyError(f"prompt stats checkpoint is missing {key!r}")
        if StatsConfig(**state["config"]) != self.config:
            raise ValueError(
                f"prompt stats checkpoint was written with {state['config']}, this run uses {asdict(self.config)}"
            )
        layout = (state["num_prompts"], state["shard_rank"], state["num_shards"])
        if layout != (self.num_prompts, self.shard_rank, self.num_shards):
            raise ValueError(
                f"prompt stats checkpoint holds (num_prompts, shard_rank, num_shards)={layout}, "
                f"this store is {(self.num_prompts, self.shard_rank, self.num_shards)}"
            )
        for name in self._TENSORS:
            current = getattr(self, name)
            if current is None:
                continue
            if name not in state:
                raise KeyError(f"prompt stats checkpoint is missing tensor {name!r}")
            value = state[name]
            if value.shape != current.shape or value.dtype != current.dtype:
                raise ValueError(
                    f"prompt stats tensor {name!r}: checkpoint has {tuple(value.shape)}/{value.dtype}, "
                    f"expected {tuple(current.shape)}/{current.dtype}"
                )
            current.copy_(value)
