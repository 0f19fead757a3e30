"""Sharded per-prompt statistics: exactness vs one store, checksum, resharding, resume.

Distributed tests run real torch.distributed (gloo over a ``file://``
rendezvous) in 2 spawned processes. To keep the module fast, the processes are
spawned ONCE (module fixture): each runs every distributed scenario, records
what it saw with ``torch.save``, and the tests compare those records with
single-process references computed here.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.difficulty import DifficultyClassifier, DifficultyConfig
from nemo_gdro.algorithms.dynamo_allocation import (
    DynamoAllocationConfig,
    DynamoAllocator,
)
from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO, RolloutGDROConfig
from nemo_gdro.algorithms.stats import PromptStatsStore, StatsConfig
from nemo_gdro.parallel.sharded_stats import (
    ShardedPromptStats,
    checksum,
    fingerprint,
    reshard,
)
from nemo_gdro.trainer.checkpoint import shard_file_name

WORLD = 2
NUM_PROMPTS = 37  # odd: shards of unequal size
BATCH = 12  # drawn with replacement from 37 ids: duplicates are frequent
EQ_STEPS = 6
RUN_STEPS = 8  # N of the resume test
SAVE_AT = 4  # k: state saved after this step's update
CONFIGS = {
    "bits": StatsConfig(window=4),
    "ring_decay": StatsConfig(window=3, indicator="mean_correct", counter_decay=0.9),
}


# =========================================================================== #
# shared step logic (workers and references run the very same code)
# =========================================================================== #
def step_batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (replicated) ids ``[BATCH]`` and a fixed per-prompt pass rate ``[NUM_PROMPTS]``."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    ids = torch.randint(0, NUM_PROMPTS, (BATCH,), generator=gen)
    pass_rate = torch.linspace(0.0, 1.0, NUM_PROMPTS, dtype=torch.float64)
    return ids, pass_rate


def outcomes(ids: torch.Tensor, counts: torch.Tensor, pass_rate: torch.Tensor, step: int) -> torch.Tensor:
    """Correct rollouts per position ~ Binomial(counts, pass_rate[id]), seeded by the step."""
    gen = torch.Generator().manual_seed(77 + step)
    return torch.binomial(counts.to(torch.float64), pass_rate[ids], generator=gen).to(torch.int64)


def local_slice(num: int, rank: int, world: int, step: int) -> torch.Tensor:
    """Positions of the global batch this rank generated: an uneven, step-dependent split."""
    if world == 1:
        return torch.arange(num)
    cut = (3 * step) % (num + 1)  # rank 0 gets [0, cut): from none to all of the batch
    return torch.arange(0, cut) if rank == 0 else torch.arange(cut, num)


class Controllers:
    """Classifier + DynaMO (per step and per epoch) + Rollout-GDRO (sqrt and bandit) over one store."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.classifier = DifficultyClassifier(DifficultyConfig(hysteresis=0.05), store)
        nb = self.classifier.num_bins
        self.rg_sqrt = RolloutGDRO(RolloutGDROConfig(n_min=2, n_max=8, n_bar=4), nb, store)
        self.rg_bandit = RolloutGDRO(RolloutGDROConfig(mode="bandit", n_min=2, n_max=8, n_bar=4), nb, store)
        self.dyn_step = DynamoAllocator(DynamoAllocationConfig(n_bar=4, n_min=2, n_max=8), store)
        self.dyn_epoch = DynamoAllocator(
            DynamoAllocationConfig(n_bar=4, n_min=2, n_max=8, refresh="every_epoch"), store
        )

    def replicated_state(self) -> dict[str, Any]:
        return {
            "rg_sqrt": self.rg_sqrt.state_dict(),
            "rg_bandit": self.rg_bandit.state_dict(),
            "dyn_epoch": self.dyn_epoch.state_dict(),
        }

    def load_replicated_state(self, state: dict[str, Any]) -> None:
        self.rg_sqrt.load_state_dict(state["rg_sqrt"])
        self.rg_bandit.load_state_dict(state["rg_bandit"])
        self.dyn_epoch.load_state_dict(state["dyn_epoch"])

    def step(self, seed: int, step: int, rank: int, world: int, *, already_global: bool = False) -> dict[str, Any]:
        """One training step's controller work; returns every decision made."""
        ids, pass_rate = step_batch(seed, step)
        if step % 3 == 0:
            self.dyn_epoch.refresh_epoch()
        bins = self.classifier.classify(ids)
        plan = self.rg_sqrt.allocate(ids, bins)
        bandit_plan = self.rg_bandit.allocate(ids, bins)
        dyn = self.dyn_step.allocate(ids)
        dyn_e = self.dyn_epoch.allocate(ids)
        counts = plan.counts
        correct = outcomes(ids, counts, pass_rate, step)
        if already_global and isinstance(self.store, ShardedPromptStats):
            self.store.observe(ids, counts, correct, already_global=True)
        else:
            pos = local_slice(ids.numel(), rank, world, step)
            self.store.observe(ids[pos], counts[pos], correct[pos])
        # Replicated controller feedback from global (replicated) per-response signals.
        gi = torch.repeat_interleave(torch.arange(ids.numel()), bandit_plan.counts)
        signal = -(correct[gi].to(torch.float64) / bandit_plan.counts[gi]) + 0.01 * gi.to(torch.float64)
        self.rg_bandit.observe(bins[gi], signal, bandit_plan, bins, group_index=gi)
        gi_s = torch.repeat_interleave(torch.arange(ids.numel()), counts)
        self.rg_sqrt.observe(bins[gi_s], torch.zeros(gi_s.numel(), dtype=torch.float64), plan, bins)
        return {
            "bins": bins,
            "counts": counts,
            "mu": plan.mu,
            "variance": plan.variance,
            "bandit_counts": bandit_plan.counts,
            "dyn_counts": dyn.counts,
            "dyn_priorities": dyn.priorities,
            "dyn_epoch_counts": dyn_e.counts,
        }


def run_steps(ctl: Controllers, steps: range, rank: int, world: int, seed: int = 0) -> list[dict[str, Any]]:
    out = []
    for step in steps:
        out.append(ctl.step(seed, step, rank, world))
        if world > 1:
            checksum({**ctl.replicated_state(), "decision": out[-1]}, step=step)
    return out


def save_checkpoint(ctl: Controllers, path: Path, rank: int, world: int) -> None:
    """Shard per rank (shard_file_name) + replicated controllers once (rank 0)."""
    torch.save(ctl.store.state_dict(), path / shard_file_name("prompt_stats", rank, world))
    if rank == 0:
        torch.save(ctl.replicated_state(), path / "controllers.pt")


def load_all_shards(path: Path, world: int) -> list[dict]:
    return [torch.load(path / shard_file_name("prompt_stats", r, world), weights_only=False) for r in range(world)]


# =========================================================================== #
# the 2-process worker: runs every distributed scenario once
# =========================================================================== #
def _capture(fn, *args) -> Any:
    """Run a scenario; an exception becomes a record (the other rank is not left hanging on it)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the tests
        return {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}


def _scenario_equivalence(rank: int, world: int) -> dict[str, Any]:
    """Raw reads, classifier, DynaMO, Rollout-GDRO and updates vs one store; collective counts."""
    out: dict[str, Any] = {}
    for name, cfg in CONFIGS.items():
        store = ShardedPromptStats(NUM_PROMPTS, cfg, gather_capacity=4)
        ctl = Controllers(store)
        steps = []
        for step in range(EQ_STEPS):
            ids, _ = step_batch(1, step)
            reads_before, gathers_before = store.num_reads, store.num_gathers
            rows = store.gather_rows(ids)
            reads = {
                "rows": rows,
                "window": store.window_estimate(ids),
                "counters": store.counters(ids),
                "success": store.success_rate(ids, unseen=0.3),
                "last_bin": store.get_last_bin(ids),
                "reads_for_gets": store.num_reads - reads_before,
            }
            before_step = store.num_reads
            decisions = ctl.step(1, step, rank, world, already_global=(step == EQ_STEPS - 1))
            steps.append(
                {
                    **reads,
                    **decisions,
                    # classify + 4 allocators after one gather_rows: no further read
                    # collective, except the every-3-steps epoch refresh (whole table).
                    "reads_in_step": store.num_reads - before_step,
                    "gathers_in_step": store.num_gathers - gathers_before,
                }
            )
        out[name] = {"steps": steps, "shard": store.state_dict(), "capacity": store._gather_capacity}
    return out


def _scenario_checksum(rank: int, world: int) -> dict[str, Any]:
    state = {
        "prompt_gdro": {"scores": torch.tensor([0.5, float("nan"), -1.0], dtype=torch.float64)},
        "rollout_gdro": {"mu": 0.25, "scores": torch.zeros(3, 4)},
        "r2vpo_lambda": 0.1,
        "bins": torch.tensor([0, 2, 1]),
        "plan_id": 7,
    }
    checksum(state, step=3)  # equal (NaN included): passes
    bad = {**state, "rollout_gdro": {"mu": 0.25 + (1e-12 if rank == 1 else 0.0), "scores": torch.zeros(3, 4)}}
    differing = _capture(checksum, bad, None)
    keyset = _capture(checksum, {**state, f"only_on_{rank}": 1.0} if rank == 1 else {**state, "x": 1.0})
    return {"differing": differing, "keyset": keyset}


def _scenario_guards(rank: int, world: int) -> dict[str, Any]:
    """Misuse fails on BOTH ranks at the same collective, and the group stays usable."""
    store = ShardedPromptStats(NUM_PROMPTS, StatsConfig())
    ids = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([1, 2, 4])
    id_mismatch = _capture(store.gather_rows, ids)
    n = torch.tensor([2, 2]) if rank == 0 else torch.tensor([2, 2, 2])
    malformed = _capture(store.observe, torch.tensor([5, 6]), n, torch.tensor([1, 0]))
    c_bad = torch.tensor([0, 0]) if rank == 0 else torch.tensor([0, 9])
    bad_values = _capture(store.observe, torch.tensor([5, 6]), torch.tensor([2, 2]), c_bad)
    # Still in lock-step: a normal read works afterwards.
    est, count = store.window_estimate(torch.tensor([5, 6]))
    return {"id_mismatch": id_mismatch, "malformed": malformed, "bad_values": bad_values, "after": count}


def _scenario_resume(rank: int, world: int, ckpt: Path) -> dict[str, Any]:
    """Uninterrupted DP=2 run (saving at SAVE_AT) and a DP=2 resume from the saved files."""
    store = ShardedPromptStats(NUM_PROMPTS, CONFIGS["bits"])
    ctl = Controllers(store)
    full = []
    for step in range(RUN_STEPS):
        full += run_steps(ctl, range(step, step + 1), rank, world)
        if step == SAVE_AT:
            save_checkpoint(ctl, ckpt, rank, world)
    dist.barrier()
    final = {"shard": store.state_dict(), "replicated": ctl.replicated_state()}

    # Resume on DP=2 with fresh objects: own shard by exact layout, replicated state from rank 0's file.
    store2 = ShardedPromptStats(NUM_PROMPTS, CONFIGS["bits"])
    ctl2 = Controllers(store2)
    store2.load_state_dict(torch.load(ckpt / shard_file_name("prompt_stats", rank, world), weights_only=False))
    ctl2.load_replicated_state(torch.load(ckpt / "controllers.pt", weights_only=False))
    resumed = run_steps(ctl2, range(SAVE_AT + 1, RUN_STEPS), rank, world)
    # ... and through load_resharded (all shards, same layout): must be the same.
    store3 = ShardedPromptStats(NUM_PROMPTS, CONFIGS["bits"])
    store3.load_resharded(load_all_shards(ckpt, world))
    return {
        "full": full,
        "final": final,
        "resumed": resumed,
        "resumed_final": {"shard": store2.state_dict(), "replicated": ctl2.replicated_state()},
        "load_resharded_shard": store3.state_dict(),
    }


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    ckpt = Path(tmp) / "ckpt"
    if rank == 0:
        ckpt.mkdir(exist_ok=True)
    dist.barrier()
    results = {
        "layout": (ShardedPromptStats(NUM_PROMPTS).dp_rank, ShardedPromptStats(NUM_PROMPTS).dp_size),
        "equivalence": _capture(_scenario_equivalence, rank, world),
        "checksum": _capture(_scenario_checksum, rank, world),
        "guards": _capture(_scenario_guards, rank, world),
        "resume": _capture(_scenario_resume, rank, world, ckpt),
    }
    torch.save(results, Path(tmp) / f"results_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("sharded_stats")
    ctx = mp.start_processes(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():  # only our own children, by handle
                p.terminate()
    results = [torch.load(tmp / f"results_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results, tmp / "ckpt"


def _ok(record: Any) -> Any:
    if isinstance(record, dict) and "error" in record and "trace" in record:
        pytest.fail(f"worker scenario raised {record['error']}: {record['message']}\n{record['trace']}")
    return record


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested results (tensors: same dtype, shape and values, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        same_nan = a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
        same = torch.equal(a, b) or (same_nan and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
        assert same, f"{where}: {a} vs {b}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# =========================================================================== #
# distributed tests
# =========================================================================== #
def test_layout_is_the_dp_group(dist_run):
    results, _ = dist_run
    assert [r["layout"] for r in results] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_reads_and_controllers_match_one_store(dist_run, name):
    results, _ = dist_run
    per_rank = [_ok(r["equivalence"])[name] for r in results]
    # The batches do repeat ids, within a rank's slice and across the two slices.
    batches = [step_batch(1, s)[0] for s in range(EQ_STEPS)]
    assert any(b.unique().numel() < BATCH for b in batches)
    assert any(
        set(b[local_slice(BATCH, 0, WORLD, s)].tolist()) & set(b[local_slice(BATCH, 1, WORLD, s)].tolist())
        for s, b in enumerate(batches)
    )
    ref_store = PromptStatsStore(NUM_PROMPTS, CONFIGS[name])
    ref = Controllers(ref_store)
    for step in range(EQ_STEPS):
        ids, _ = step_batch(1, step)
        expected_reads = {
            "window": ref_store.window_estimate(ids),
            "counters": ref_store.counters(ids),
            "success": ref_store.success_rate(ids, unseen=0.3),
            "last_bin": ref_store.get_last_bin(ids),
        }
        est, count = expected_reads["window"]
        g, k = expected_reads["counters"]
        expected_rows = {"estimate": est, "count": count, "rollouts": g, "correct": k,
                         "last_bin": expected_reads["last_bin"]}
        expected = ref.step(1, step, 0, 1, already_global=(step == EQ_STEPS - 1))
        for rank, rec in enumerate(per_rank):
            got = rec["steps"][step]
            where = f"{name} rank {rank} step {step}"
            assert_same(got["rows"], expected_rows, where + " rows")
            for key, value in expected_reads.items():
                assert_same(got[key], value, f"{where} {key}")
            for key, value in expected.items():
                assert_same(got[key], value, f"{where} {key}")
            # One all-reduce answered every read of the step (the cache), one
            # all-gather the update; the epoch refresh reads the whole table.
            assert got["reads_for_gets"] == 1, where
            assert got["reads_in_step"] == (1 if step % 3 == 0 else 0), where
            assert got["gathers_in_step"] == (0 if step == EQ_STEPS - 1 else 1 if step > 0 else 2), where
    for rank, rec in enumerate(per_rank):
        assert_same(rec["shard"], reshard([ref_store.state_dict()], WORLD, rank), f"{name} final shard {rank}")
        assert rec["capacity"] == 16  # grew once, from 4 to the next power of two of the largest slice (12)


def test_checksum_passes_when_equal_and_names_the_differing_key(dist_run):
    results, _ = dist_run
    for rank, r in enumerate(results):
        rec = _ok(r["checksum"])
        err = rec["differing"]
        assert err.get("error") == "RuntimeError", err
        assert "'rollout_gdro.mu'" in err["message"] and "ranks [1] differ from rank 0" in err["message"]
        assert "at step" not in err["message"]  # no step was given
        assert "rollout_gdro.scores" not in err["message"] and "prompt_gdro" not in err["message"]
        assert rec["keyset"].get("error") == "RuntimeError" and "set of keys" in rec["keyset"]["message"]


def test_misuse_fails_on_every_rank_and_keeps_ranks_in_step(dist_run):
    results, _ = dist_run
    for r in results:
        rec = _ok(r["guards"])
        assert rec["id_mismatch"]["error"] == "RuntimeError" and "different prompt ids" in rec["id_mismatch"]["message"]
        assert rec["malformed"]["error"] == "ValueError" and "ranks [1]" in rec["malformed"]["message"]
        assert rec["bad_values"]["error"] == "ValueError" and "from rank 1" in rec["bad_values"]["message"]
        assert rec["after"].tolist() == [0, 0]  # nothing was applied by the failed updates


def test_resume_dp2_to_dp1_and_dp2_makes_the_same_decisions(dist_run):
    """The issue's test: DP=2 run, checkpoint at k, resume on DP=1 (reshard) and DP=2, same decisions."""
    results, ckpt = dist_run
    recs = [_ok(r["resume"]) for r in results]
    # Uninterrupted DP=2: identical on both ranks and identical to one unsharded store.
    ref = Controllers(PromptStatsStore(NUM_PROMPTS, CONFIGS["bits"]))
    expected = run_steps(ref, range(RUN_STEPS), 0, 1)
    for rank, rec in enumerate(recs):
        assert_same(rec["full"], expected, f"uninterrupted rank {rank}")
        assert_same(rec["final"]["replicated"], ref.replicated_state(), f"replicated rank {rank}")
        assert_same(rec["final"]["shard"], reshard([ref.store.state_dict()], WORLD, rank), f"shard {rank}")

    # (b) DP=2 resume.
    for rank, rec in enumerate(recs):
        assert_same(rec["resumed"], expected[SAVE_AT + 1:], f"DP=2 resume rank {rank}")
        assert_same(rec["resumed_final"], rec["final"], f"DP=2 resume final rank {rank}")
        saved = torch.load(ckpt / shard_file_name("prompt_stats", rank, WORLD), weights_only=False)
        assert_same(rec["load_resharded_shard"], saved, f"load_resharded same layout rank {rank}")

    # (a) DP=1 resume here, in one process, from the DP=2 shards.
    store = ShardedPromptStats(NUM_PROMPTS, CONFIGS["bits"])
    assert (store.dp_rank, store.dp_size) == (0, 1)
    ctl = Controllers(store)
    store.load_resharded(load_all_shards(ckpt, WORLD))
    ctl.load_replicated_state(torch.load(ckpt / "controllers.pt", weights_only=False))
    resumed = run_steps(ctl, range(SAVE_AT + 1, RUN_STEPS), 0, 1)
    assert_same(resumed, expected[SAVE_AT + 1:], "DP=1 resume")
    assert_same(ctl.replicated_state(), recs[0]["final"]["replicated"], "DP=1 resume replicated state")
    for rank in range(WORLD):
        assert_same(reshard([store.state_dict()], WORLD, rank), recs[rank]["final"]["shard"], f"DP=1 final {rank}")


# =========================================================================== #
# single-process tests
# =========================================================================== #
def test_single_process_is_a_drop_in_without_communication():
    cfg = StatsConfig(window=5)
    sharded = ShardedPromptStats(NUM_PROMPTS, cfg)
    plain = PromptStatsStore(NUM_PROMPTS, cfg)
    a, b = Controllers(sharded), Controllers(plain)
    for step in range(5):
        assert_same(a.step(3, step, 0, 1), b.step(3, step, 0, 1), f"step {step}")
    assert_same(sharded.state_dict(), plain.state_dict())
    assert sharded.num_reads == 0 and sharded.num_gathers == 0
    checksum({"x": torch.ones(2)})  # no-op in one process
    with pytest.raises(ValueError, match="out of range"):
        sharded.window_estimate(torch.tensor([NUM_PROMPTS]))
    with pytest.raises(ValueError, match="num_correct"):
        sharded.observe(torch.tensor([1]), torch.tensor([2]), torch.tensor([3]))
    with pytest.raises(ValueError, match="dp_size|layout|shard"):
        sharded.load_state_dict(reshard([plain.state_dict()], 2, 0))


def test_cache_is_dropped_by_observe_and_updated_by_set_last_bin():
    store = ShardedPromptStats(10, StatsConfig(window=3))
    ids = torch.tensor([4, 1, 4])
    store.gather_rows(ids)
    store.set_last_bin(torch.tensor([4, 7]), torch.tensor([3, 2]))
    assert store.get_last_bin(ids).tolist() == [3, -1, 3]
    store.set_last_bin(torch.tensor([1]), torch.tensor([300]))  # int8 wrap-around, as in the store
    plain = PromptStatsStore(10, StatsConfig(window=3))
    plain.set_last_bin(torch.tensor([1]), torch.tensor([300]))
    assert store.get_last_bin(torch.tensor([1])).tolist() == plain.get_last_bin(torch.tensor([1])).tolist()
    store.observe(torch.tensor([4]), torch.tensor([2]), torch.tensor([1]))
    est, count = store.window_estimate(ids)
    assert count.tolist() == [1, 0, 1] and est.tolist() == [1.0, 0.0, 1.0]


def test_fingerprint_is_bitwise():
    base = {"a": torch.tensor([1.0, float("nan")]), "b": {"c": 2, "d": None}, "e": [0.5, "x"]}
    fp = fingerprint(base)
    assert sorted(fp) == ["a", "b.c", "b.d", "e[0]", "e[1]"]
    assert fp == fingerprint({"e": [0.5, "x"], "b": {"d": None, "c": 2}, "a": torch.tensor([1.0, float("nan")])})
    assert fingerprint({"a": torch.tensor([1.0, float("nan")], dtype=torch.float64)})["a"] != fp["a"]
    signed_zero = fingerprint({"a": torch.tensor([-0.0, float("nan")])})["a"]
    assert signed_zero != fingerprint({"a": torch.tensor([0.0, float("nan")])})["a"]
    assert fingerprint({"c": 2})["c"] != fingerprint({"c": 2.0})["c"]
    plan = RolloutGDRO(RolloutGDROConfig(), 3, PromptStatsStore(5)).allocate(torch.arange(3), torch.tensor([0, 1, 1]))
    assert "counts" in fingerprint(plan) and "arms" in fingerprint(plan)
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint({"f": object()})


# =========================================================================== #
# resharding (pure)
# =========================================================================== #
def random_store_state(num_prompts: int, cfg: StatsConfig, seed: int) -> dict:
    """A one-shard state whose every tensor holds distinct random values (of the real dtypes)."""
    state = PromptStatsStore(num_prompts, cfg).state_dict()
    gen = torch.Generator().manual_seed(seed)
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                state[name] = torch.rand(value.shape, generator=gen, dtype=torch.float64).to(value.dtype)
            else:
                state[name] = torch.randint(-100, 100, value.shape, generator=gen).to(value.dtype)
    return state


def split(global_state: dict, m: int) -> list[dict]:
    """Reference layout, independent of ``reshard``: shard s holds rows s, s+m, s+2m, ..."""
    out = []
    for s in range(m):
        shard = {k: (v[s::m].clone() if isinstance(v, torch.Tensor) else v) for k, v in global_state.items()}
        shard.update(shard_rank=s, num_shards=m)
        out.append(shard)
    return out


@given(
    num_prompts=st.integers(1, 60),
    ring=st.booleans(),
    seed=st.integers(0, 1000),
    layouts=st.sampled_from([(2, 1), (1, 2), (2, 3), (3, 2), (4, 4), (1, 1), (5, 3)]),
)
def test_reshard_round_trips_exactly(num_prompts, ring, seed, layouts):
    cfg = StatsConfig(window=6, indicator="mean_correct") if ring else StatsConfig(window=6)
    full = random_store_state(num_prompts, cfg, seed)
    old, new = layouts
    old_shards = split(full, old)
    # 1 -> old equals the reference split.
    for s in range(old):
        assert_same(reshard([full], old, s), old_shards[s], f"1->{old} shard {s}")
    new_shards = [reshard(list(reversed(old_shards)), new, r) for r in range(new)]  # any order of inputs
    for r in range(new):
        assert_same(new_shards[r], split(full, new)[r], f"{old}->{new} shard {r}")
        store = PromptStatsStore(num_prompts, cfg, shard_rank=r, num_shards=new)
        store.load_state_dict(new_shards[r])  # the store format, loadable as is
    back = [reshard(new_shards, old, s) for s in range(old)]
    assert_same(back, old_shards, f"{old}->{new}->{old}")
    assert_same(reshard(new_shards, 1, 0), full, f"{new}->1")


def test_reshard_is_pure_and_validates():
    full = random_store_state(9, StatsConfig(), 0)
    shards = split(full, 2)
    snapshot = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in shards]
    out = reshard(shards, 3, 1)
    out["seen"][0] += 1  # a copy, never a view of the inputs
    assert_same(shards, snapshot)
    with pytest.raises(ValueError, match="one state per old shard"):
        reshard(shards[:1], 1, 0)
    with pytest.raises(ValueError, match="disagree"):
        reshard([shards[0], {**shards[1], "num_prompts": 10}], 1, 0)
    with pytest.raises(ValueError, match="rows"):
        reshard([shards[0], {**shards[1], "seen": shards[1]["seen"][:-1]}], 1, 0)
    with pytest.raises(ValueError, match="new_rank"):
        reshard(shards, 2, 2)
    with pytest.raises(ValueError, match="none"):
        reshard([], 1, 0)
