"""R²VPO off-policy replay: a buffer of whole prompt groups (r2vpo.md §3).

A group is never split: its rows keep their rewards, the advantages computed
at generation time, and the behaviour log-probs of the policy version that
produced them. Groups older than ``staleness`` policy versions are dropped.
The ratio against each row's own behaviour policy (and the variance brake of
the R²VPO loss) does the down-weighting; nothing else re-weights stale rows.

The step calls :meth:`GroupReplay.mix` / :meth:`NoReplay.mix` unconditionally:
``NoReplay`` (``replay_ratio == 0``) trains on the fresh rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_gdro.rollout.batch import RolloutBatch


@dataclass
class ReplayGroup:
    """One prompt's rows from one step, with the policy version that generated them."""

    rows: RolloutBatch
    version: int


class ReplayBuffer:
    """Whole-group buffer with a staleness bound and deterministic sampling."""

    def __init__(self, staleness: int, seed: int, max_groups: int = 100_000) -> None:
        if staleness < 0:
            raise ValueError(f"algorithm.r2vpo.staleness must be >= 0, got {staleness}")
        self.staleness = int(staleness)
        self.seed = int(seed)
        self.max_groups = int(max_groups)
        self.groups: list[ReplayGroup] = []

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, batch: RolloutBatch, version: int) -> None:
        """Split ``batch`` (rewards, advantages and behaviour log-probs filled) into groups and keep them."""
        for missing in ("rewards", "advantages", "behaviour_logp"):
            if getattr(batch, missing) is None:
                raise ValueError(f"replay needs rows with {missing}")
        for position in range(batch.num_prompts):
            rows = torch.nonzero(batch.group_index == position).flatten()
            if rows.numel():
                self.groups.append(ReplayGroup(batch.select(rows), int(version)))
        # Oldest first out when over capacity.
        if len(self.groups) > self.max_groups:
            self.groups = self.groups[-self.max_groups :]

    def evict(self, current_version: int) -> int:
        """Drop groups older than ``staleness`` versions; returns how many were dropped."""
        keep = [g for g in self.groups if current_version - g.version <= self.staleness]
        dropped = len(self.groups) - len(keep)
        self.groups = keep
        return dropped

    def sample(self, num_groups: int, step: int, exclude_version: int | None = None) -> list[ReplayGroup]:
        """Up to ``num_groups`` distinct groups, uniformly, as a function of ``(seed, step)``.

        ``exclude_version`` leaves out the groups of the current step (they are
        trained as the fresh batch already).
        """
        pool = [g for g in self.groups if g.version != exclude_version]
        if num_groups <= 0 or not pool:
            return []
        gen = torch.Generator().manual_seed(self.seed * 7_919 + step)
        order = torch.randperm(len(pool), generator=gen)[:num_groups]
        return [pool[i] for i in sorted(order.tolist())]

    def state_dict(self) -> dict:
        return {
            "staleness": self.staleness,
            "groups": [{"rows": g.rows, "version": g.version} for g in self.groups],
        }

    def load_state_dict(self, state: dict) -> None:
        self.groups = [ReplayGroup(g["rows"], int(g["version"])) for g in state["groups"]]


class NoReplay:
    """On-policy training: the fresh rows only."""

    def mix(self, batch: RolloutBatch, raw_advantages: torch.Tensor, step: int) -> tuple[RolloutBatch, torch.Tensor]:
        return batch, raw_advantages

    def stateful(self) -> dict[str, object]:
        return {}


class GroupReplay:
    """Fresh rows plus ``round(replay_ratio * P_local)`` replayed groups of this rank.

    Each data-parallel rank replays its own groups (the buffer is per rank);
    the draw is a function of ``(seed, step, dp rank)``.
    """

    def __init__(self, buffer: ReplayBuffer, replay_ratio: float, dp_rank: int, dp_size: int) -> None:
        self.buffer = buffer
        self.replay_ratio = float(replay_ratio)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)

    def mix(self, batch: RolloutBatch, raw_advantages: torch.Tensor, step: int) -> tuple[RolloutBatch, torch.Tensor]:
        """``(fresh + replayed rows, their raw advantages)``; then keeps the fresh groups for later steps."""
        self.buffer.evict(step)
        wanted = int(round(self.replay_ratio * batch.num_prompts))
        groups = self.buffer.sample(wanted, step * self.dp_size + self.dp_rank)
        mixed, raw = batch, raw_advantages
        if groups:
            mixed = type(batch).concat([batch] + [g.rows for g in groups])
            raw = torch.cat([raw_advantages] + [g.rows.advantages.float() for g in groups])
        self.buffer.add(batch, version=step)
        return mixed, raw

    def stateful(self) -> dict[str, object]:
        return {"replay": self.buffer}
