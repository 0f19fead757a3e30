"""Per-prompt statistics sharded over data-parallel ranks (gdro.md §1, "Distributed").

The per-prompt table (:class:`~nemo_gdro.algorithms.stats.PromptStatsStore`)
is split by ``prompt_id % dp_size``: DP rank ``r`` holds local row
``prompt_id // dp_size`` of every id with ``prompt_id % dp_size == r``, so the
memory per rank falls as ``1 / dp_size``. The bin-level controllers (Prompt-GDRO,
Rollout-GDRO, the R²VPO dual, DynaMO's allocator) stay replicated: each rank
runs an identical copy and makes identical decisions, because every read of the
table below returns the same numbers on every rank.

Communication per step (``P`` = prompts of the global batch):

- classify + allocate: ONE ``all_reduce(SUM)`` of a float64 ``[U, 5]`` buffer
  (``U <= P`` distinct ids): each owner fills its rows, zeros elsewhere, so the
  sum is exactly the owner's value (``x + 0 == x`` in floating point). The
  result is cached, so the classifier, DynaMO and Rollout-GDRO all read it
  without further traffic until the next ``observe``.
- update: ONE ``all_gather`` of the per-prompt outcomes ``(id, rollouts,
  correct)`` of each rank's local rows (none when the caller already holds the
  global outcomes); each owner then applies its own ids.

:class:`ShardedPromptStats` is a drop-in for ``PromptStatsStore`` where the
controllers use it: it presents the *logical* unsharded table (``num_shards ==
1``, every id "owned"), answering for the global batch identically on every
rank. The physical layout is ``dp_rank`` / ``dp_size`` and the shard itself is
``.local``.

Known cost of the logical view: ``DynamoAllocator(refresh="every_epoch")``
snapshots the counters of every prompt it "owns", which here is the whole
table: one all-reduce of ``[num_prompts, 5]`` float64 per epoch and a
replicated float32 ``[num_prompts, 2]`` snapshot per rank (that snapshot is
then DP-size independent, so it resumes on any layout). ``every_step`` has no
such cost.

Determinism contract: every rank must call the read methods with the same
(replicated) prompt ids in the same order; the methods are collectives. A
cheap id fingerprint rides along with each all-reduce so that ranks passing
different ids fail loudly instead of mixing rows; :func:`checksum` checks the
replicated controller state once per step.

Checkpoints: :meth:`ShardedPromptStats.state_dict` is this rank's shard in the
``PromptStatsStore`` format (it carries ``num_prompts``, ``shard_rank``,
``num_shards``); :func:`reshard` rebuilds any shard of any other layout from
all old shards, so a run saved on DP=2 resumes on DP=1, 3, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_gdro.algorithms.stats import PromptStatsStore, StatsConfig
from nemo_gdro.parallel.comm import backend_device

__all__ = ["ShardedPromptStats", "reshard", "fingerprint", "checksum"]

# Columns of the all-reduce buffer of :meth:`ShardedPromptStats.gather_rows`.
_FIELDS = ("estimate", "count", "rollouts", "correct", "last_bin")
_COL = {name: i for i, name in enumerate(_FIELDS)}

# Id fingerprint of a read (see ``_id_fingerprint``): a hash modulo a prime
# below 2**20, so that its square summed over up to 2**12 ranks stays an exact
# integer in float64 (2**40 * 2**12 < 2**53).
_ID_HASH_MOD = 1_048_573
_ID_HASH_MUL = 40_503
assert _ID_HASH_MOD**2 * 2**12 < 2**53

# Initial per-rank capacity (prompts) of the observe all-gather; it grows to
# the next power of two when a rank brings more (see ``observe``).
_DEFAULT_GATHER_CAPACITY = 256


# =========================================================================== #
# process-group helpers
# =========================================================================== #
def _group_layout(group: Any) -> tuple[int, int]:
    """``(rank, size)`` in ``group``; ``(0, 1)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group: Any, device: torch.device | str | None) -> torch.device:
    """Where collective buffers live: ``device`` if given, else the group's backend device."""
    return torch.device(device) if device is not None else backend_device(group)


def _id_fingerprint(ids: torch.Tensor) -> int:
    """Order-sensitive hash of ``ids [U]`` in ``[0, _ID_HASH_MOD)``.

    Each term is reduced modulo the prime before summing, so no int64 product
    overflows (both factors are below 2**20).
    """
    pos = torch.arange(1, ids.numel() + 1, dtype=torch.int64)
    weight = (pos * _ID_HASH_MUL) % _ID_HASH_MOD
    terms = ((ids.remainder(_ID_HASH_MOD) + 1) * weight) % _ID_HASH_MOD
    return int(terms.sum()) % _ID_HASH_MOD


# =========================================================================== #
# the sharded store
# =========================================================================== #
class ShardedPromptStats:
    """This DP rank's shard of the per-prompt table, read as the whole table.

    Args:
        num_prompts: size of the prompt id space ``[0, num_prompts)``.
        config: the store options (window, indicator, counter decay).
        group: the data-parallel process group; ``None`` = the default group
            when torch.distributed is initialised, else a single process
            (one shard, today's unsharded behaviour, no communication).
        device: device of the collective buffers (default: CUDA for NCCL,
            CPU otherwise). Results are always returned on the CPU.
        gather_capacity: initial per-rank row capacity of the ``observe``
            all-gather; set it to the prompts per rank per step to make the
            first step take one collective too (any value is correct).

    Attributes:
        local: this rank's :class:`PromptStatsStore` (``shard_rank = dp_rank``,
            ``num_shards = dp_size``).
        dp_rank, dp_size: the physical layout.
        shard_rank, num_shards, num_local: the *logical* layout presented to the
            controllers (``0``, ``1``, ``num_prompts``): every read answers for
            any id, so controllers written for one store need no change.
    """

    def __init__(
        self,
        num_prompts: int,
        config: StatsConfig | None = None,
        group: Any = None,
        *,
        device: torch.device | str | None = None,
        gather_capacity: int = _DEFAULT_GATHER_CAPACITY,
    ) -> None:
        if gather_capacity < 1:
            raise ValueError(f"gather_capacity must be >= 1, got {gather_capacity}")
        self.group = group
        self.dp_rank, self.dp_size = _group_layout(group)
        self.local = PromptStatsStore(num_prompts, config, shard_rank=self.dp_rank, num_shards=self.dp_size)
        self.config: StatsConfig = self.local.config
        self.num_prompts = self.local.num_prompts
        self._device = _comm_device(group, device) if self.dp_size > 1 else torch.device("cpu")
        # Replicated: every rank sees every rank's row count after each gather
        # and grows the capacity identically.
        self._gather_capacity = int(gather_capacity)
        # Cache of the last gather: sorted distinct ids [U] and their rows
        # (dict of [U] tensors). Replicated, since it is a function of the
        # replicated call sequence; dropped by every write of the counters.
        self._cache_ids: torch.Tensor | None = None
        self._cache: dict[str, torch.Tensor] | None = None
        self.num_reads = 0  # collectives issued by reads (tests and logging)
        self.num_gathers = 0  # collectives issued by observe

    # ------------------------------------------------------------ logical view
    @property
    def shard_rank(self) -> int:
        return 0

    @property
    def num_shards(self) -> int:
        return 1

    @property
    def num_local(self) -> int:
        return self.num_prompts

    def owns(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``[P]``, all True: the logical table answers for every id."""
        return torch.ones(torch.as_tensor(prompt_ids).shape, dtype=torch.bool)

    def local_index(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the logical table (the ids themselves), range-checked."""
        ids = self._check_ids(prompt_ids)
        return ids.clone()

    def _check_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(prompt_ids).detach().cpu().to(torch.int64)
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D [P], got shape {tuple(ids.shape)}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_prompts:
                raise ValueError(f"prompt_id out of range [0, {self.num_prompts}): got [{lo}, {hi}]")
        return ids

    # ----------------------------------------------------------------- reading
    def gather_rows(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the controllers read about ``prompt_ids``, in one all-reduce.

        Args:
            prompt_ids: int ``[P]`` global (replicated) batch ids; duplicates allowed.
        Returns:
            CPU tensors ``[P]``: ``estimate`` (float64, windowed success rate, 0
            where unseen), ``count`` (int64, window length), ``rollouts`` and
            ``correct`` (float64, cumulative ``G`` and ``K``), ``last_bin``
            (int64, -1 = none). Bitwise the values an unsharded store returns.

        The rows of the distinct ids are cached until the next write of the
        counters, so the other read methods are answered from it.
        """
        ids = self._check_ids(prompt_ids)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self._fetch(uniq)
        self._cache_ids, self._cache = uniq, rows
        return {name: value[inverse] for name, value in rows.items()}

    def _fetch(self, uniq: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of sorted distinct ids ``uniq [U]`` from their owners (one all-reduce)."""
        num = uniq.numel()
        buf = torch.zeros(num * len(_FIELDS) + 2, dtype=torch.float64)
        table = buf[: num * len(_FIELDS)].view(num, len(_FIELDS))
        mine = self.local.owns(uniq)
        owned = uniq[mine]
        if owned.numel():
            # The local store's own read methods produce the values, so the
            # numbers are by construction those of an unsharded store.
            est, count = self.local.window_estimate(owned)
            g, k = self.local.counters(owned)
            table[mine] = torch.stack(
                [est, count.to(torch.float64), g, k, self.local.get_last_bin(owned).to(torch.float64)], dim=1
            )
        if self.dp_size > 1:
            h = _id_fingerprint(uniq)
            buf[-2], buf[-1] = float(h), float(h * h)
            buf = buf.to(self._device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            buf = buf.cpu()
            self.num_reads += 1
            s1, s2 = int(buf[-2].item()), int(buf[-1].item())
            # Cauchy-Schwarz: n * sum(h^2) == (sum h)^2 iff all ranks sent the
            # same h. Every rank sees the same sums, so all raise together.
            if self.dp_size * s2 != s1 * s1:
                raise RuntimeError(
                    "ShardedPromptStats: data-parallel ranks read different prompt ids in the same collective "
                    "(the global batch ids must be replicated and every rank must call the same read methods "
                    "in the same order)"
                )
            table = buf[: num * len(_FIELDS)].view(num, len(_FIELDS))
        return {
            "estimate": table[:, _COL["estimate"]].clone(),
            "count": table[:, _COL["count"]].to(torch.int64),
            "rollouts": table[:, _COL["rollouts"]].clone(),
            "correct": table[:, _COL["correct"]].clone(),
            "last_bin": table[:, _COL["last_bin"]].to(torch.int64),
        }

    def _cached_positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Positions of ``ids`` in the cache, or None unless every id is cached."""
        if self._cache_ids is None:
            return None
        cached = self._cache_ids
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        if cached.numel() == 0:
            return None
        pos = torch.searchsorted(cached, ids).clamp_max(cached.numel() - 1)
        if not bool((cached[pos] == ids).all()):
            return None
        return pos

    def _rows(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of ``prompt_ids`` from the cache, gathering (one all-reduce) on a miss."""
        ids = self._check_ids(prompt_ids)
        pos = self._cached_positions(ids)
        if pos is None:
            return self.gather_rows(ids)
        assert self._cache is not None
        return {name: value[pos] for name, value in self._cache.items()}

    def window_estimate(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(estimate float64 [P], count int64 [P])`` as ``PromptStatsStore.window_estimate``."""
        rows = self._rows(prompt_ids)
        return rows["estimate"], rows["count"]

    def counters(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative ``(G, K)`` float64 ``[P]`` as ``PromptStatsStore.counters``."""
        rows = self._rows(prompt_ids)
        return rows["rollouts"], rows["correct"]

    # The unsharded formula applied to this object's (gathered) counters: one
    # definition of K / G and of the unseen default for both classes.
    success_rate = PromptStatsStore.success_rate

    def get_last_bin(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Last assigned bin, int64 ``[P]`` (-1: none)."""
        return self._rows(prompt_ids)["last_bin"]

    # ----------------------------------------------------------------- writing
    def set_last_bin(self, prompt_ids: torch.Tensor, bins: torch.Tensor) -> None:
        """Record bins of the global batch: each owner writes its own ids; no communication.

        ``prompt_ids`` and ``bins`` are replicated ``[P]``; the cache is updated
        in place (with the store's int8 round trip) so the step's later reads
        stay collective-free.
        """
        ids = self._check_ids(prompt_ids)
        b = torch.as_tensor(bins).detach().cpu().to(torch.int64)
        if b.shape != ids.shape:
            raise ValueError(f"bins must have the shape of prompt_ids {tuple(ids.shape)}, got {tuple(b.shape)}")
        mine = self.local.owns(ids)
        if bool(mine.any()):
            self.local.set_last_bin(ids[mine], b[mine])
        if self._cache is not None:
            cached = self._cache_ids
            assert cached is not None
            if cached.numel() and ids.numel():
                pos = torch.searchsorted(cached, ids).clamp_max(cached.numel() - 1)
                hit = cached[pos] == ids
                self._cache["last_bin"][pos[hit]] = b[hit].to(torch.int8).to(torch.int64)

    def observe(
        self,
        prompt_ids: torch.Tensor,
        num_rollouts: torch.Tensor,
        num_correct: torch.Tensor,
        *,
        already_global: bool = False,
    ) -> None:
        """Record one step's outcomes (``PromptStatsStore.observe`` semantics).

        Args:
            prompt_ids: int ``[P_r]`` ids of this rank's prompts (duplicates
                allowed, also across ranks: a prompt drawn twice is merged into
                one observation, as in the unsharded store).
            num_rollouts: ``[P_r]`` rollouts generated per entry (>= 1).
            num_correct: ``[P_r]`` correct ones among them.
            already_global: the arguments are the whole step's outcomes,
                identical on every rank: no communication, each owner applies
                its ids. Otherwise each rank passes its local rows and one
                ``all_gather`` assembles the global outcomes first.

        Raises (on every rank alike, so no rank is left waiting in a collective):
            ValueError: malformed input on any rank.
        """
        if already_global or self.dp_size == 1:
            ids, n, c = self._check_outcomes(prompt_ids, num_rollouts, num_correct)
        else:
            ids, n, c = self._gather_outcomes(prompt_ids, num_rollouts, num_correct)
        self._cache_ids, self._cache = None, None
        mine = self.local.owns(ids)
        if bool(mine.any()):
            self.local.observe(ids[mine], n[mine], c[mine])

    def _check_outcomes(
        self, prompt_ids: torch.Tensor, num_rollouts: torch.Tensor, num_correct: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(prompt_ids).detach().cpu().to(torch.int64)
        n = torch.as_tensor(num_rollouts).detach().cpu().to(torch.int64)
        c = torch.as_tensor(num_correct).detach().cpu().to(torch.int64)
        if not (ids.shape == n.shape == c.shape) or ids.dim() != 1:
            raise ValueError("prompt_ids, num_rollouts and num_correct must all be [P]")
        self._check_values(ids, n, c, where="")
        return ids, n, c

    def _check_values(self, ids: torch.Tensor, n: torch.Tensor, c: torch.Tensor, where: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_prompts):
            raise ValueError(
                f"prompt_id out of range [0, {self.num_prompts}){where}: got [{int(ids.min())}, {int(ids.max())}]"
            )
        if (n < 1).any() or (c < 0).any() or (c > n).any():
            raise ValueError(f"need num_rollouts >= 1 and 0 <= num_correct <= num_rollouts{where}")

    def _gather_outcomes(
        self, prompt_ids: torch.Tensor, num_rollouts: torch.Tensor, num_correct: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' ``(id, n, c)`` rows, concatenated in rank order (one all-gather).

        Each rank sends an int64 ``[1 + cap, 3]`` buffer: a header ``(rows,
        malformed, 0)`` and up to ``cap`` rows. A rank with more than ``cap``
        rows sends only its header; everyone then sees the largest count, grows
        ``cap`` identically and repeats, so the common case is one collective
        and the capacity stays replicated.
        """
        ids = torch.as_tensor(prompt_ids).detach().cpu().to(torch.int64)
        n = torch.as_tensor(num_rollouts).detach().cpu().to(torch.int64)
        c = torch.as_tensor(num_correct).detach().cpu().to(torch.int64)
        malformed = not (ids.shape == n.shape == c.shape and ids.dim() == 1)
        rows = torch.zeros(0, 3, dtype=torch.int64) if malformed else torch.stack([ids, n, c], dim=1)
        count = rows.shape[0]
        while True:
            cap = self._gather_capacity
            buf = torch.zeros(1 + cap, 3, dtype=torch.int64)
            buf[0, 0], buf[0, 1] = count, int(malformed)
            if count <= cap:
                buf[1 : 1 + count] = rows
            out = [torch.empty_like(buf, device=self._device) for _ in range(self.dp_size)]
            dist.all_gather(out, buf.to(self._device), group=self.group)
            self.num_gathers += 1
            parts = [o.cpu() for o in out]
            counts = [int(p[0, 0]) for p in parts]
            bad = [r for r, p in enumerate(parts) if int(p[0, 1])]
            if bad:
                raise ValueError(
                    f"observe: ranks {bad} passed prompt_ids, num_rollouts and num_correct of different "
                    "shapes (each must be [P_r])"
                )
            largest = max(counts)
            if largest <= cap:
                break
            self._gather_capacity = 1 << (largest - 1).bit_length()
        table = torch.cat([p[1 : 1 + k] for p, k in zip(parts, counts)], dim=0)
        g_ids, g_n, g_c = table[:, 0], table[:, 1], table[:, 2]
        # Validate the global outcomes, identical on every rank: all raise or none.
        for r, (p, k) in enumerate(zip(parts, counts)):
            self._check_values(p[1 : 1 + k, 0], p[1 : 1 + k, 1], p[1 : 1 + k, 2], where=f" (from rank {r})")
        return g_ids, g_n, g_c

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """This rank's shard in the ``PromptStatsStore`` format.

        It records ``num_prompts``, ``shard_rank = dp_rank`` and ``num_shards =
        dp_size`` next to the tensors; save it per rank (e.g. under
        ``checkpoint.shard_file_name("prompt_stats", dp_rank, dp_size)``).
        """
        return self.local.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load a shard of exactly this layout (same ``dp_size`` and rank)."""
        self.local.load_state_dict(state)
        self._cache_ids, self._cache = None, None

    def load_resharded(self, shard_states: Sequence[dict]) -> None:
        """Load from ALL shards of a checkpoint written with any DP size.

        No communication: every rank reads all old shards and keeps its own new
        shard (transient memory: the whole table once).
        """
        self.load_state_dict(reshard(shard_states, self.dp_size, self.dp_rank))


# =========================================================================== #
# resharding (pure)
# =========================================================================== #
def reshard(shard_states: Sequence[dict], new_num_shards: int, new_rank: int) -> dict:
    """State of shard ``new_rank`` of a ``new_num_shards`` layout, built from all old shards.

    Args:
        shard_states: the ``state_dict`` of every shard of one checkpoint (any
            order; ``PromptStatsStore`` or :class:`ShardedPromptStats` states).
        new_num_shards: the new DP size (>= 1).
        new_rank: which new shard to build, in ``[0, new_num_shards)``.
    Returns:
        A ``PromptStatsStore.state_dict``-format dict for ``(num_prompts,
        new_rank, new_num_shards)``. Prompt ``i`` comes from old shard
        ``i % old``, row ``i // old``; tensors are copied, never shared.

    Pure function: no communication, inputs are not modified. Cost: one
    concatenation of the old shards and one gather per tensor.
    """
    if not shard_states:
        raise ValueError("reshard needs the states of every old shard, got none")
    if isinstance(new_num_shards, bool) or not isinstance(new_num_shards, int) or new_num_shards < 1:
        raise ValueError(f"new_num_shards must be an int >= 1, got {new_num_shards!r}")
    if isinstance(new_rank, bool) or not isinstance(new_rank, int) or not 0 <= new_rank < new_num_shards:
        raise ValueError(f"new_rank must be an int in [0, {new_num_shards}), got {new_rank!r}")
    for key in ("config", "num_prompts", "shard_rank", "num_shards"):
        for s in shard_states:
            if key not in s:
                raise KeyError(f"prompt stats shard is missing {key!r}")
    old = int(shard_states[0]["num_shards"])
    num_prompts = int(shard_states[0]["num_prompts"])
    config = dict(shard_states[0]["config"])
    for s in shard_states:
        if (int(s["num_shards"]), int(s["num_prompts"]), dict(s["config"])) != (old, num_prompts, config):
            raise ValueError(
                "prompt stats shards disagree on (num_shards, num_prompts, config): "
                f"{[(s['num_shards'], s['num_prompts'], s['config']) for s in shard_states]}"
            )
    ranks = sorted(int(s["shard_rank"]) for s in shard_states)
    if ranks != list(range(old)):
        raise ValueError(f"need exactly one state per old shard 0..{old - 1}, got shard ranks {ranks}")
    by_rank = sorted(shard_states, key=lambda s: int(s["shard_rank"]))
    local_sizes = [(num_prompts - r + old - 1) // old for r in range(old)]

    names = [name for name in PromptStatsStore._TENSORS if name in by_rank[0]]
    # Every shard must hold the same tensor set with the expected row count.
    for r, s in enumerate(by_rank):
        present = [name for name in PromptStatsStore._TENSORS if name in s]
        if present != names:
            raise ValueError(f"prompt stats shard {r} holds tensors {present}, shard 0 holds {names}")
        for name in names:
            if s[name].shape[0] != local_sizes[r]:
                raise ValueError(
                    f"prompt stats shard {r} tensor {name!r} has {s[name].shape[0]} rows, "
                    f"expected {local_sizes[r]} for {num_prompts} prompts over {old} shards"
                )

    # max(): a layout with more shards than prompts has empty shards.
    new_ids = torch.arange(new_rank, max(new_rank, num_prompts), new_num_shards, dtype=torch.int64)
    offsets = torch.tensor([0] + local_sizes[:-1], dtype=torch.int64).cumsum(0)
    # Row of each new prompt in the concatenation of the old shards.
    flat_rows = offsets[new_ids % old] + new_ids // old
    out: dict[str, Any] = {}
    for name in names:
        flat = torch.cat([s[name] for s in by_rank], dim=0)
        out[name] = flat[flat_rows].clone()
    out.update(config=config, num_prompts=num_prompts, shard_rank=new_rank, num_shards=new_num_shards)
    return out


# =========================================================================== #
# consistency check of the replicated controller state
# =========================================================================== #
def _hash48(*chunks: bytes) -> float:
    """48-bit blake2b digest as a float64 (exact: 48 < 53 mantissa bits)."""
    h = hashlib.blake2b(digest_size=6)
    for chunk in chunks:
        h.update(chunk)
    return float(int.from_bytes(h.digest(), "little"))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name), out)
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            _flatten(f"{prefix}[{i}]", sub, out)
    else:
        out[prefix] = value


def fingerprint(state: Any) -> dict[str, float]:
    """Per-leaf 48-bit fingerprints (as float64) of a nested controller state.

    ``state`` may nest mappings, dataclasses (e.g. a ``RolloutPlan``), lists
    and tuples; leaves may be tensors (any dtype/device), numpy arrays, Python
    numbers, strings, bools or None. Keys are dotted paths. Tensors hash
    their dtype, shape and raw bytes, so equal means bitwise equal (NaN
    included, which value comparisons would miss).
    """
    leaves: dict[str, Any] = {}
    _flatten("", state, leaves)
    fps: dict[str, float] = {}
    for key in sorted(leaves):
        v = leaves[key]
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, torch.Tensor):
            fps[key] = _hash48(b"T", str(v.dtype).encode(), str(tuple(v.shape)).encode(), _tensor_bytes(v))
        elif isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            fps[key] = _hash48(b"S", type(v).__name__.encode(), repr(v).encode())
        elif isinstance(v, float):
            fps[key] = _hash48(b"F", struct.pack("<d", v))
        else:
            raise TypeError(f"fingerprint: cannot fingerprint {key!r} of type {type(v).__name__}")
    return fps


def checksum(
    state: Any, group: Any = None, *, step: int | None = None, device: torch.device | str | None = None
) -> None:
    """Fail loudly unless every data-parallel rank holds the same replicated state.

    Each rank reduces ``state`` (e.g. ``{"prompt_gdro": pg.state_dict(),
    "rollout_gdro": rg.state_dict(), "r2vpo_lambda": lam, "bins": bins,
    "allocation": counts}``) to a float64 vector ``[1 + K]`` (a hash of the key
    set, then one fingerprint per leaf, see :func:`fingerprint`); one
    ``all_gather`` brings every rank's vector to every rank, which compares.

    Args:
        state: the replicated state; every rank must pass the same keys.
        group: the DP process group (``None``: default group, or a no-op in a
            single process).
        step: included in the error message.
        device: collective buffer device (default: CUDA for NCCL, else CPU).
    Raises:
        RuntimeError: on every rank, naming each differing key and the ranks
            whose value differs from rank 0's.
    """
    rank, size = _group_layout(group)
    fps = fingerprint(state)
    if size == 1:
        return
    keys = list(fps)
    vec = torch.tensor([_hash48("\0".join(keys).encode())] + [fps[k] for k in keys], dtype=torch.float64)
    dev = _comm_device(group, device)
    out = [torch.empty_like(vec, device=dev) for _ in range(size)]
    dist.all_gather(out, vec.to(dev), group=group)
    table = torch.stack([o.cpu() for o in out])  # [size, 1 + K]
    where = f" at step {step}" if step is not None else ""
    if not bool((table[:, 0] == table[0, 0]).all()):
        differ = [r for r in range(size) if table[r, 0] != table[0, 0]]
        raise RuntimeError(
            f"replicated controller state{where}: ranks {differ} pass a different set of keys than rank 0 "
            f"(rank {rank} has {keys})"
        )
    bad = (table[:, 1:] != table[0:1, 1:]).any(dim=0)
    if bool(bad.any()):
        lines = []
        for j in torch.nonzero(bad).flatten().tolist():
            differ = [r for r in range(size) if table[r, 1 + j] != table[0, 1 + j]]
            lines.append(f"{keys[j]!r} (ranks {differ} differ from rank 0)")
        raise RuntimeError(
            f"replicated controller state differs across data-parallel ranks{where}: " + ", ".join(lines)
        )

