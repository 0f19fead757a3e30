"""Off-policy replay: a buffer of whole prompt groups (r2vpo.md §3), for every loss.

``algorithm.replay.{ratio, staleness}``. A group is never split: its rows keep
their rewards, the advantages computed at generation time, and the behaviour
log-probs of the policy version that produced them. Groups older than
``staleness`` policy versions are dropped. The ratio against each row's own
behaviour policy does the down-weighting (through R²VPO's variance brake, or
the clipped loss's clip range: the control run); nothing else re-weights
stale rows.

The step calls :meth:`GroupReplay.mix` / :meth:`NoReplay.mix` unconditionally:
``NoReplay`` (``ratio == 0``) trains on the fresh rows only.

Data parallelism: each DP rank keeps the groups of the prompts it generated
(global prompt position ``p`` of a step lives on rank ``p % dp``), so a
checkpoint holds one buffer per rank. Each group records its step (``version``)
and global prompt position; :meth:`GroupReplay.load_resharded` rebuilds any
rank's buffer of any DP size from all saved buffers (ordered by
``(version, position)``, the order an uninterrupted run holds them in), so no
group is lost or duplicated when the DP size changes.

Checkpoint format: tensors, strings and numbers only (a ``RolloutBatch`` is
stored field by field), so that it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nemo_gdro.rollout.batch import RolloutBatch


def batch_to_state(batch: RolloutBatch) -> dict[str, Any]:
    """A :class:`RolloutBatch` as a dict of tensors, lists of strings and numbers (``None`` fields left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if value is None:
            continue
        out[f.name] = list(value) if isinstance(value, list) else value
    return out


def batch_from_state(state: dict[str, Any]) -> RolloutBatch:
    """Inverse of :func:`batch_to_state`; validates the rebuilt batch."""
    known = {f.name for f in dataclasses.fields(RolloutBatch)}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"replay checkpoint: unknown RolloutBatch field(s) {unknown}")
    batch = RolloutBatch(**state)
    return batch.validate()


@dataclass
class ReplayGroup:
    """One prompt's rows from one step, with the policy version (= step) that generated them
    and the prompt's global position in that step (``-1``: unknown)."""

    rows: RolloutBatch
    version: int
    position: int = -1


class ReplayBuffer:
    """Whole-group buffer with a staleness bound and deterministic sampling."""

    def __init__(self, staleness: int, seed: int, max_groups: int = 100_000) -> None:
        if staleness < 0:
            raise ValueError(f"algorithm.replay.staleness must be >= 0, got {staleness}")
        self.staleness = int(staleness)
        self.seed = int(seed)
        self.max_groups = int(max_groups)
        self.groups: list[ReplayGroup] = []

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, batch: RolloutBatch, version: int, positions: Sequence[int] | None = None) -> None:
        """Split ``batch`` (rewards, advantages and behaviour log-probs filled) into groups and keep them.

        ``positions[i]``: the global step position of the batch's prompt ``i``
        (default ``i``).
        """
        for missing in ("rewards", "advantages", "behaviour_logp"):
            if getattr(batch, missing) is None:
                raise ValueError(f"replay needs rows with {missing}")
        if positions is not None and len(positions) != batch.num_prompts:
            raise ValueError(f"replay: {len(positions)} positions for {batch.num_prompts} prompts")
        for position in range(batch.num_prompts):
            rows = torch.nonzero(batch.group_index == position).flatten()
            if rows.numel():
                where = position if positions is None else int(positions[position])
                self.groups.append(ReplayGroup(batch.select(rows), int(version), where))
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
            "groups": [
                {"rows": batch_to_state(g.rows), "version": g.version, "position": g.position} for g in self.groups
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.groups = _groups_of(state)


class NoReplay:
    """On-policy training: the fresh rows only."""

    def mix(self, batch: RolloutBatch, raw_advantages: torch.Tensor, step: int) -> tuple[RolloutBatch, torch.Tensor]:
        return batch, raw_advantages

    def stateful(self) -> dict[str, object]:
        return {}


def _groups_of(state: dict) -> list[ReplayGroup]:
    try:
        return [
            ReplayGroup(batch_from_state(dict(g["rows"])), int(g["version"]), int(g.get("position", -1)))
            for g in state["groups"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"replay checkpoint is malformed: {err}") from None


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
        # This rank's prompts are the step's positions rank, rank + dp, ... (DataParallel.my_positions).
        positions = [self.dp_rank + i * self.dp_size for i in range(batch.num_prompts)]
        self.buffer.add(batch, version=step, positions=positions)
        self.last_counts = {"fresh_rows": batch.num_rows, "replayed_rows": mixed.num_rows - batch.num_rows}
        return mixed, raw

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's buffer (see :meth:`ReplayBuffer.state_dict`) and the layout it was kept under."""
        state = self.buffer.state_dict()
        state.update(dp_rank=self.dp_rank, dp_size=self.dp_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a buffer saved by this very rank of the same DP size (see :meth:`load_resharded`)."""
        self.load_resharded([state])

    def load_resharded(self, shard_states: Sequence[dict]) -> None:
        """This rank's buffer from the buffers of every rank of a checkpoint written with any DP size.

        Keeps the groups whose global position ``p`` satisfies ``p % dp == rank``,
        ordered by ``(version, position)``. A buffer saved without positions
        (a single rank, or an older format) is accepted only on one rank.
        """
        groups: list[ReplayGroup] = []
        for state in shard_states:
            groups.extend(_groups_of(state))
        if any(g.position < 0 for g in groups):
            if self.dp_size > 1 or len(shard_states) > 1:
                raise ValueError("replay checkpoint has groups without a step position; it cannot be resharded")
            self.buffer.groups = groups
            return
        keys = [(g.version, g.position) for g in groups]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise ValueError(f"replay checkpoint holds (step, position) groups twice: {dup}")
        mine = [g for g in groups if g.position % self.dp_size == self.dp_rank]
        self.buffer.groups = sorted(mine, key=lambda g: (g.version, g.position))

    def check_ownership(self) -> None:
        """Raise if this rank holds a group of another rank's prompt position (a mixed-up resume)."""
        foreign = [(g.version, g.position) for g in self.buffer.groups
                   if g.position >= 0 and g.position % self.dp_size != self.dp_rank]
        if foreign:
            raise RuntimeError(
                f"replay buffer of DP rank {self.dp_rank}/{self.dp_size} holds {len(foreign)} group(s) of other "
                f"ranks' prompt positions (step, position) {foreign[:5]}"
            )

    def replicated_state(self) -> dict[str, Any]:
        """What every DP rank's buffer agrees on (checked across ranks every step); checks ownership first."""
        self.check_ownership()
        return {
            "staleness": self.buffer.staleness,
            "seed": self.buffer.seed,
            "replay_ratio": self.replay_ratio,
            "dp_size": self.dp_size,
        }

    def stateful(self) -> dict[str, object]:
        return {"replay": self}
