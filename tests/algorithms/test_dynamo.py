"""Tests of nemo_gdro.algorithms.dynamo (spec: shared/spec/dynamo.md)."""

from __future__ import annotations

import io
import math
import os
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.dynamo import (
    DynamoAllocationConfig,
    DynamoAllocator,
    DynamoModulationConfig,
    ModulationStats,
    compensation_factor,
    entropy_change,
    full_vocab_token_stats,
    modulate_advantages,
    modulation_stats,
    priority,
    stabilisation_factor,
)
from nemo_gdro.algorithms.stats import PromptStatsStore, group_outcomes

F64 = torch.float64

# dynamo.md §1 worked example.
EX_K = [0, 1, 4, 8, 12, 14, 16, 8]
EX_PRIORITIES = [0.01, 0.0625, 0.2, 0.267, 0.2, 0.01, 0.01, 0.267]
EX_COUNTS = [9, 12, 21, 24, 21, 9, 8, 24]


def store_with(counters: dict[int, tuple[int, int]], num_prompts: int = 64) -> PromptStatsStore:
    """A real store fed once via ``observe`` with ``{prompt_id: (G, K)}``."""
    store = PromptStatsStore(num_prompts)
    if counters:
        ids = torch.tensor(list(counters))
        g = torch.tensor([v[0] for v in counters.values()])
        k = torch.tensor([v[1] for v in counters.values()])
        store.observe(ids, g, k)
    return store


# --------------------------------------------------------------------------- #
# priority
# --------------------------------------------------------------------------- #
def test_priority_worked_example():
    p = priority(torch.tensor(EX_K, dtype=F64), torch.full((8,), 16.0))
    torch.testing.assert_close(p, torch.tensor(EX_PRIORITIES, dtype=F64), rtol=0, atol=1e-3)
    # Exact values: v = K (G-K) / (G (G-1)) plus the 1e-6 (1 - acc) tie-breaker.
    assert p[1].item() == pytest.approx(15 / 240 + 1e-6 * 15 / 16, abs=1e-15)
    assert p[3].item() == pytest.approx(64 / 240 + 1e-6 * 0.5, abs=1e-15)
    assert p[4].item() == pytest.approx(48 / 240 + 1e-6 * 0.25, abs=1e-15)


def test_priority_floor_for_mastered_and_never_solved():
    k = torch.tensor([0.0, 16.0, 14.0, 13.0, 12.0])
    g = torch.full((5,), 16.0)
    p = priority(k, g, mastery=0.85, floor=0.01)
    # never solved (v = 0), all solved, acc 0.875 >= mastery: the floor.
    assert p[:3].tolist() == [0.01, 0.01, 0.01]
    # acc 0.8125 < mastery: its variance 13*3/240 = 0.1625 counts.
    assert p[3].item() == pytest.approx(13 * 3 / 240 + 1e-6 * 3 / 16, abs=1e-15)
    # A tiny floor exposes the (1 - acc) bonus of a never-solved prompt, never 0.
    p_small = priority(torch.tensor([0.0, 16.0]), torch.tensor([16.0, 16.0]), floor=1e-9)
    assert p_small[0].item() == pytest.approx(1e-6)
    assert p_small[1].item() == 1e-9


def test_priority_small_g_is_finite():
    p = priority(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 2.0]))
    assert torch.isfinite(p).all()
    assert p[:2].tolist() == [0.01, 0.01]  # G < 2: no variance estimate, floor
    assert p[2].item() == 0.01  # acc 1 >= mastery
    assert p[3].item() == pytest.approx(0.5)  # 1*1/(2*1)


# --------------------------------------------------------------------------- #
# allocation: hand values
# --------------------------------------------------------------------------- #
def test_worked_example_allocation_through_store():
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    store = PromptStatsStore(32)
    store.observe(ids, torch.full((8,), 16), torch.tensor(EX_K))  # one step, 16 rollouts each
    alloc = DynamoAllocator(DynamoAllocationConfig(), store).allocate(ids)
    assert alloc.counts.dtype == torch.int64
    assert alloc.counts.tolist() == EX_COUNTS
    assert int(alloc.counts.sum()) == 128
    torch.testing.assert_close(alloc.priorities, torch.tensor(EX_PRIORITIES, dtype=F64), rtol=0, atol=1e-3)
    assert not alloc.in_warmup.any()


def test_warmup_unseen_prompts_get_warmup_first():
    # warmup 12 > n_min 8 so the warm-up bound is visible.
    cfg = DynamoAllocationConfig(n_bar=16, n_min=8, n_max=24, warmup=12)
    store = store_with({2: (16, 8), 3: (16, 4), 1: (2, 1)})
    alloc = DynamoAllocator(cfg, store).allocate(torch.tensor([0, 1, 2, 3]))
    assert alloc.in_warmup.tolist() == [True, True, False, False]
    assert alloc.weights[:2].tolist() == [0.0, 0.0]
    # Bounds: unseen 12, G=2 needs 10, others 8; the remaining 64 - 38 = 26
    # split 0.2667 : 0.2 -> 14.86 / 11.14 -> floors 22, 19, one spare unit to
    # the larger remainder (prompt 2).
    assert alloc.counts.tolist() == [12, 10, 23, 19]


def test_default_warmup_is_max_nmin_4():
    assert DynamoAllocationConfig().effective_warmup == 8
    assert DynamoAllocationConfig(n_min=2, n_bar=4, n_max=8).effective_warmup == 4
    # Unseen prompts with the defaults: the warm-up bound is n_min, weight 0,
    # so the seen prompt takes the whole spare budget up to n_max.
    store = store_with({5: (16, 8)})
    alloc = DynamoAllocator(DynamoAllocationConfig(), store).allocate(torch.tensor([0, 5, 1]))
    assert alloc.in_warmup.tolist() == [True, False, True]
    assert alloc.counts.tolist() == [12, 24, 12]  # 48 - 24 = 24 spread evenly over the zero-weight rest


def test_power_half_vs_one():
    # K/G = 8/16 (v=.2667), 1/16 (.0625), 16/16 (floor .01); T = 48, n_max 40.
    store = store_with({0: (16, 8), 1: (16, 1), 2: (16, 16)})
    ids = torch.tensor([0, 1, 2])
    one = DynamoAllocator(DynamoAllocationConfig(n_bar=16, n_min=8, n_max=40, power=1.0), store).allocate(ids)
    half = DynamoAllocator(DynamoAllocationConfig(n_bar=16, n_min=8, n_max=40, power=0.5), store).allocate(ids)
    # power 1: 24 spare * (.2667, .0625, .01)/.3392 = 18.87, 4.42, 0.71 -> [26.87, 12.42, 8.71]
    assert one.counts.tolist() == [27, 12, 9]
    # power 0.5: weights (.5164, .25, .1)/.8664 -> 14.30, 6.93, 2.77 -> [22.30, 14.93, 10.77]
    assert half.counts.tolist() == [22, 15, 11]
    # The square root flattens the allocation towards uniform.
    assert one.counts.double().std() > half.counts.double().std()


def test_mastered_and_never_solved_get_floor_weight():
    store = store_with({0: (16, 0), 1: (16, 16), 2: (16, 15), 3: (16, 0)})
    alloc = DynamoAllocator(DynamoAllocationConfig(), store).allocate(torch.tensor([0, 1, 2, 3]))
    assert alloc.priorities.tolist() == [0.01] * 4
    assert alloc.counts.tolist() == [16, 16, 16, 16]  # equal floors -> even split


def test_warmup_above_n_max_is_capped():
    # Default warmup max(n_min, 4) = 4 > n_max = 3: the bound is capped at n_max,
    # the prompt stays in warm-up and finishes it on its next draw.
    cfg = DynamoAllocationConfig(n_bar=3, n_min=1, n_max=3)
    store = PromptStatsStore(8)
    allocator = DynamoAllocator(cfg, store)
    alloc = allocator.allocate(torch.tensor([0, 1]))
    assert alloc.counts.tolist() == [3, 3]
    store.observe(torch.tensor([0, 1]), alloc.counts, torch.tensor([1, 2]))
    nxt = allocator.allocate(torch.tensor([0, 1, 2]))
    assert nxt.in_warmup.tolist() == [True, True, True]
    assert nxt.counts.tolist() == [3, 3, 3]
    # Explicit warmup 10 > n_max 8, oversubscribed: budget still exact, bounds kept.
    cfg = DynamoAllocationConfig(n_bar=4, n_min=2, n_max=8, warmup=10)
    alloc = DynamoAllocator(cfg, PromptStatsStore(8)).allocate(torch.arange(4))
    assert alloc.counts.tolist() == [8, 4, 2, 2]


def test_oversubscribed_warmup_keeps_exact_budget():
    # n_bar 4 < warmup 6: four unseen prompts would need 24 > T = 16.
    cfg = DynamoAllocationConfig(n_bar=4, n_min=2, n_max=8, warmup=6)
    alloc = DynamoAllocator(cfg, store_with({})).allocate(torch.tensor([0, 1, 2, 3]))
    assert alloc.warmup_oversubscribed
    assert alloc.counts.tolist() == [6, 6, 2, 2]  # served in batch order
    assert int(alloc.counts.sum()) == 16
    # A seen prompt first in the batch gets n_min; the spare 8 go to positions 1, 2.
    store = store_with({0: (10, 5)})
    alloc = DynamoAllocator(cfg, store).allocate(torch.tensor([0, 1, 2, 3]))
    assert alloc.counts.tolist() == [2, 6, 6, 2]
    # Partial demand: G=3 needs 3 more -> lower bound 3.
    store = store_with({1: (3, 1)})
    alloc = DynamoAllocator(cfg, store).allocate(torch.tensor([1, 0, 2, 3]))
    assert alloc.counts.tolist() == [3, 6, 5, 2]
    assert int(alloc.counts.sum()) == 16


def test_duplicate_prompt_ids_are_separate_positions():
    store = store_with({3: (16, 8), 5: (16, 1)})
    alloc = DynamoAllocator(DynamoAllocationConfig(), store).allocate(torch.tensor([3, 5, 3]))
    assert alloc.priorities[0] == alloc.priorities[2]
    assert int(alloc.counts.sum()) == 48
    assert abs(int(alloc.counts[0]) - int(alloc.counts[2])) <= 1
    assert int(alloc.counts[0]) >= int(alloc.counts[2])  # ties: lower position first


def test_foreign_prompt_id_rejected():
    with pytest.raises(ValueError, match="out of range"):
        DynamoAllocator(DynamoAllocationConfig(), PromptStatsStore(4)).allocate(torch.tensor([0, 7]))


def test_diagnostics():
    store = store_with({0: (16, 0), 1: (16, 8), 2: (16, 16)})
    allocator = DynamoAllocator(DynamoAllocationConfig(), store)
    alloc = allocator.allocate(torch.tensor([0, 1, 2, 3]))
    d = allocator.diagnostics(alloc)
    n = alloc.counts.double()
    assert d["n/min"] == n.min().item() and d["n/max"] == n.max().item()
    assert d["n/mean"] == 16.0
    assert d["n/std"] == pytest.approx(n.std(unbiased=False).item())
    bands = ["budget_share/acc_lt_0.1", "budget_share/acc_0.1_0.9", "budget_share/acc_gt_0.9", "budget_share/unseen"]
    assert sum(d[b] for b in bands) == pytest.approx(1.0)
    for b, pos in zip(bands, [0, 1, 2, 3]):
        assert d[b] == pytest.approx(n[pos].item() / 64)
    assert d["frac_at_n_min"] == pytest.approx(float((alloc.counts == 8).double().mean()))
    assert d["frac_at_n_max"] == pytest.approx(float((alloc.counts == 24).double().mean()))
    assert d["frac_warmup"] == 0.25
    assert all(isinstance(v, float) for v in d.values())


# --------------------------------------------------------------------------- #
# allocation: properties
# --------------------------------------------------------------------------- #
NUM_PROMPTS = 48


@st.composite
def allocation_cases(draw):
    n_min = draw(st.integers(1, 8))
    n_bar = draw(st.integers(n_min, n_min + 8))
    n_max = draw(st.integers(n_bar, n_bar + 10))
    warmup = draw(st.one_of(st.none(), st.integers(1, n_max)))
    power = draw(st.sampled_from([0.5, 1.0, 2.0]))
    cfg = DynamoAllocationConfig(n_bar=n_bar, n_min=n_min, n_max=n_max, warmup=warmup, power=power)
    history = draw(
        st.lists(
            st.tuples(st.integers(0, NUM_PROMPTS - 1), st.integers(1, 24), st.floats(0.0, 1.0, allow_subnormal=False)),
            max_size=40,
        )
    )
    ids = draw(st.lists(st.integers(0, NUM_PROMPTS - 1), min_size=1, max_size=24))
    return cfg, history, ids


def _feed(store: PromptStatsStore, history) -> None:
    for pid, n, frac in history:
        store.observe(torch.tensor([pid]), torch.tensor([n]), torch.tensor([round(frac * n)]))


@given(allocation_cases())
def test_allocation_properties(case):
    cfg, history, ids = case
    store = PromptStatsStore(NUM_PROMPTS)
    _feed(store, history)
    alloc = DynamoAllocator(cfg, store).allocate(torch.tensor(ids))
    n = alloc.counts
    assert int(n.sum()) == len(ids) * cfg.n_bar  # compute neutrality, exactly
    assert int(n.min()) >= cfg.n_min and int(n.max()) <= cfg.n_max
    g = alloc.rollouts_seen
    warm = alloc.in_warmup
    assert torch.equal(warm, g < cfg.effective_warmup)
    if not alloc.warmup_oversubscribed:
        need = torch.ceil(cfg.effective_warmup - g).clamp(0, cfg.n_max)
        assert (n[warm] >= need[warm]).all()
    # Monotone in priority among non-warm-up prompts.
    idx = torch.nonzero(~warm).flatten().tolist()
    p = alloc.priorities
    for i in idx:
        for j in idx:
            if p[i] > p[j] * (1 + 1e-9):
                assert n[i] >= n[j], (p[i].item(), p[j].item(), n[i].item(), n[j].item())
            elif p[i] == p[j]:
                assert abs(int(n[i]) - int(n[j])) <= 1


@given(st.integers(1, 30), st.integers(2, 6))
def test_oversubscribed_warmup_property(num, n_min):
    # n_bar = n_min < warmup = n_max: every unseen prompt wants more than the mean.
    cfg = DynamoAllocationConfig(n_bar=n_min, n_min=n_min, n_max=n_min + 5, warmup=n_min + 5)
    alloc = DynamoAllocator(cfg, PromptStatsStore(64)).allocate(torch.arange(num))
    assert int(alloc.counts.sum()) == num * n_min
    assert int(alloc.counts.min()) >= n_min  # nobody below n_min


# --------------------------------------------------------------------------- #
# alignment and attribution (grpo_base.md §7.1 / §7.2)
# --------------------------------------------------------------------------- #
def _distinct_store() -> tuple[PromptStatsStore, torch.Tensor]:
    # K = 1..8 of G = 20: distinct priorities and distinct rounding remainders.
    ids = torch.tensor([40, 3, 17, 25, 8, 31, 12, 0])
    store = PromptStatsStore(NUM_PROMPTS)
    store.observe(ids, torch.full((8,), 20), torch.arange(1, 9))
    return store, ids


def test_permuting_batch_permutes_allocation():
    store, ids = _distinct_store()
    allocator = DynamoAllocator(DynamoAllocationConfig(), store)
    base = allocator.allocate(ids)
    assert len(set(base.priorities.tolist())) == 8
    assert len(set(base.counts.tolist())) > 4  # a non-trivial allocation
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        perm = torch.randperm(8, generator=gen)
        permuted = allocator.allocate(ids[perm])
        assert torch.equal(permuted.counts, base.counts[perm])
        assert torch.equal(permuted.priorities, base.priorities[perm])


def test_statistics_follow_prompt_ids_not_positions():
    """Variable-n expansion, row shuffling and crediting keep every row with its prompt."""
    store_a, ids = _distinct_store()
    store_b, _ = _distinct_store()
    cfg = DynamoAllocationConfig()
    alloc = DynamoAllocator(cfg, store_a).allocate(ids)
    n = alloc.counts
    # Each prompt's "ground truth": its first true_k[id] rollouts are correct.
    true_k = {int(pid): int(pid) % 5 for pid in ids}
    group_index = torch.repeat_interleave(torch.arange(8), n)
    row_id = ids[group_index]  # every row carries its own prompt id
    offsets = torch.arange(group_index.numel()) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    rewards = torch.tensor([1.0 if int(o) < true_k[int(r)] else 0.0 for o, r in zip(offsets, row_id)])

    # Store A: rows in generation order.
    rollouts, correct = group_outcomes(rewards, group_index, 8)
    store_a.observe(ids, rollouts, correct)

    # Store B: rows shuffled (load balancing) and the batch's prompt order reversed;
    # all per-row fields move together, groups are re-indexed by prompt position.
    gen = torch.Generator().manual_seed(1)
    row_perm = torch.randperm(group_index.numel(), generator=gen)
    order = torch.arange(7, -1, -1)
    new_pos = torch.empty(8, dtype=torch.int64)
    new_pos[order] = torch.arange(8)
    gi_b = new_pos[group_index[row_perm]]
    r_b, c_b = group_outcomes(rewards[row_perm], gi_b, 8)
    store_b.observe(ids[order], r_b, c_b)

    g_a, k_a = store_a.counters(ids)
    g_b, k_b = store_b.counters(ids)
    assert torch.equal(g_a, g_b) and torch.equal(k_a, k_b)
    # Each prompt was credited with exactly its own rollouts and its own correct count.
    assert torch.equal(g_a, 20 + n.double())
    own_correct = torch.tensor([min(true_k[int(p)], int(c)) for p, c in zip(ids, n)], dtype=F64)
    assert torch.equal(k_a, torch.arange(1, 9, dtype=F64) + own_correct)
    # And the next decisions agree.
    next_a = DynamoAllocator(cfg, store_a).allocate(ids)
    next_b = DynamoAllocator(cfg, store_b).allocate(ids[order])
    assert torch.equal(next_a.counts, next_b.counts[new_pos])


# --------------------------------------------------------------------------- #
# refresh and checkpoints
# --------------------------------------------------------------------------- #
def test_every_step_vs_every_epoch_refresh():
    store = PromptStatsStore(16)
    ids = torch.arange(4)
    step = DynamoAllocator(DynamoAllocationConfig(refresh="every_step"), store)
    epoch = DynamoAllocator(DynamoAllocationConfig(refresh="every_epoch"), store)
    first_step, first_epoch = step.allocate(ids), epoch.allocate(ids)
    assert first_step.in_warmup.all() and first_epoch.in_warmup.all()
    assert torch.equal(first_step.counts, first_epoch.counts)

    store.observe(ids, torch.full((4,), 16), torch.tensor([8, 1, 16, 4]))  # live state changes
    live = step.allocate(ids)
    stale = epoch.allocate(ids)
    assert not live.in_warmup.any()
    assert stale.in_warmup.all()  # still the epoch-start snapshot
    assert torch.equal(stale.counts, first_epoch.counts)
    assert not torch.equal(live.counts, first_step.counts)  # every_step reacted

    epoch.refresh_epoch()
    assert torch.equal(epoch.allocate(ids).counts, live.counts)
    # every_step's refresh_epoch is a no-op.
    step.refresh_epoch()
    assert torch.equal(step.allocate(ids).counts, live.counts)


def _roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def test_state_dict_roundtrip_reproduces_next_allocation():
    store = PromptStatsStore(16)
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    cfg = DynamoAllocationConfig(refresh="every_epoch")
    original = DynamoAllocator(cfg, store)
    store.observe(ids, torch.full((6,), 16), torch.tensor([8, 1, 16, 4, 12, 0]))
    original.refresh_epoch()
    store.observe(ids, torch.full((6,), 16), torch.tensor([0, 16, 0, 16, 0, 16]))  # after the snapshot
    state = _roundtrip({"alloc": original.state_dict(), "store": store.state_dict()})

    store2 = PromptStatsStore(16)
    store2.load_state_dict(state["store"])
    resumed = DynamoAllocator(cfg, store2)  # snapshots the (newer) live counters
    assert not torch.equal(resumed.allocate(ids).counts, original.allocate(ids).counts)
    resumed.load_state_dict(state["alloc"])
    assert torch.equal(resumed.allocate(ids).counts, original.allocate(ids).counts)

    with pytest.raises(ValueError, match="written with"):
        DynamoAllocator(DynamoAllocationConfig(refresh="every_epoch", power=0.5), store2).load_state_dict(
            state["alloc"]
        )
    # every_step: the state is just the config; the store carries the counters.
    step = DynamoAllocator(DynamoAllocationConfig(), store)
    s = _roundtrip(step.state_dict())
    fresh = DynamoAllocator(DynamoAllocationConfig(), store)
    fresh.load_state_dict(s)
    assert torch.equal(fresh.allocate(ids).counts, step.allocate(ids).counts)


# --------------------------------------------------------------------------- #
# config validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"n_bar": 30}, "dynamo.n_bar"),  # clipping T to [P n_min, P n_max] would change it
        ({"n_bar": 4}, "dynamo.n_bar"),
        ({"n_bar": 16.0}, "dynamo.n_bar"),
        ({"n_min": 0, "n_bar": 0}, "dynamo.n_min"),
        ({"n_max": 6}, "dynamo.n_max"),
        ({"warmup": 0}, "dynamo.warmup"),
        ({"mastery": 0.0}, "dynamo.mastery"),
        ({"mastery": 1.5}, "dynamo.mastery"),
        ({"floor": 0.0}, "dynamo.floor"),
        ({"power": -1.0}, "dynamo.power"),
        ({"refresh": "never"}, "dynamo.refresh"),
    ],
)
def test_allocation_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DynamoAllocationConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"alpha": -0.1}, "dynamo.alpha"),
        ({"lam_min": 1.5}, "dynamo.lam_min"),
        ({"gamma": 0.0}, "dynamo.gamma"),
        ({"tau": -1.0}, "dynamo.tau"),
        ({"eps_low": 1.0}, "dynamo.eps_low"),
        ({"eps_high": 0.0}, "dynamo.eps_high"),
        ({"ebar": "mean"}, "dynamo.ebar"),
        ({"scope": "global"}, "dynamo.scope"),
    ],
)
def test_modulation_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DynamoModulationConfig(**kwargs)


def test_config_defaults():
    a = DynamoAllocationConfig()
    assert (a.n_bar, a.n_min, a.n_max, a.warmup, a.mastery, a.floor, a.power, a.refresh) == (
        16, 8, 24, None, 0.85, 0.01, 1.0, "every_step"
    )
    m = DynamoModulationConfig()
    assert (m.alpha, m.lam_min, m.gamma, m.tau, m.eps_low, m.eps_high, m.ebar, m.scope) == (
        0.2, 0.6, 50.0, 0.99, 0.2, 0.28, "exact", "minibatch"
    )


# --------------------------------------------------------------------------- #
# token statistics
# --------------------------------------------------------------------------- #
def _brute_stats(logits_row: list[float], tok: int, temperature: float) -> tuple[float, float, float]:
    z = [x / temperature for x in logits_row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    pi = [x / s for x in e]
    h = -sum(p * math.log(p) for p in pi)
    ebar = sum(p * p * (math.log(p) + h) for p in pi)
    return math.log(pi[tok]), h, ebar


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_vocab_token_stats_brute_force(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=F64) * 2
    tokens = torch.randint(0, 5, (2, 3), generator=gen)
    logp, h, ebar = full_vocab_token_stats(logits, tokens, temperature=temperature)
    assert logp.shape == h.shape == ebar.shape == (2, 3)
    for r in range(2):
        for t in range(3):
            lp, hh, eb = _brute_stats(logits[r, t].tolist(), int(tokens[r, t]), temperature)
            assert logp[r, t].item() == pytest.approx(lp, abs=1e-12)
            assert h[r, t].item() == pytest.approx(hh, abs=1e-12)
            assert ebar[r, t].item() == pytest.approx(eb, abs=1e-12)
    if temperature != 1.0:  # temperature is really applied
        _, h1, _ = full_vocab_token_stats(logits, tokens, temperature=1.0)
        assert not torch.allclose(h, h1)


def test_full_vocab_token_stats_upcasts_low_precision():
    logits = torch.randn(4, 7).to(torch.bfloat16)
    logp, h, ebar = full_vocab_token_stats(logits, torch.zeros(4, dtype=torch.long))
    assert logp.dtype == h.dtype == ebar.dtype == torch.float32


# --------------------------------------------------------------------------- #
# entropy change
# --------------------------------------------------------------------------- #
def test_exact_ebar_is_expectation_of_u_under_pi():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, generator=gen, dtype=F64) * 1.5
    V = logits.numel()
    all_tokens = torch.arange(V)
    logp, h, ebar = full_vocab_token_stats(logits.expand(V, V), all_tokens)
    u = logp.exp() * (logp + h)  # u_a for every token a
    pi = torch.softmax(logits, -1)
    assert ebar[0].item() == pytest.approx(float((pi * u).sum()), abs=1e-14)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z, -1)
    return -(lp.exp() * lp).sum()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("adv, rho", [(1.3, 1.1), (-0.7, 0.9), (2.0, 0.5), (-1.0, 1.6)])
def test_entropy_change_is_first_order_entropy_change(seed, adv, rho):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(7, generator=gen, dtype=F64) * 1.5
    a = int(torch.randint(0, 7, (1,), generator=gen))
    logp, h, ebar = full_vocab_token_stats(z.view(1, 1, 7), torch.tensor([[a]]))
    logp_old = logp - math.log(rho)
    dh = entropy_change(
        torch.tensor([adv], dtype=F64), logp, logp_old, h, torch.ones(1, 1, dtype=torch.bool),
        eps_low=0.2, eps_high=0.28, ebar_exact=ebar,
    )[0, 0].item()
    # The update the clipped loss applies: z += eta * xi * grad_z log pi(a), xi = rho A.
    zg = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(torch.log_softmax(zg, -1)[a], zg)
    xi = rho * adv
    eta = 1e-5
    actual = (_entropy(z + eta * xi * grad) - _entropy(z)).item() / eta
    assert abs(dh) > 1e-4  # non-degenerate case
    assert actual == pytest.approx(dh, rel=1e-3)


def test_entropy_change_zero_outside_clip():
    logp = torch.log(torch.tensor([[0.3, 0.3, 0.3, 0.3]], dtype=F64))
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=F64)
    h = torch.full((1, 4), 1.7, dtype=F64)
    dh = entropy_change(
        adv, logp, logp - ratio.log(), h, torch.ones(1, 4),
        eps_low=0.2, eps_high=0.28, ebar_exact=torch.zeros(1, 4, dtype=F64),
    )
    # A>0 above 1+eps_high and A<0 below 1-eps_low get no gradient: no entropy change.
    assert dh[0, :2].tolist() == [0.0, 0.0]
    assert (dh[0, 2:] != 0).all()


def test_entropy_change_sequence_mean_hand_values():
    nan = float("nan")
    logp = torch.tensor([[math.log(0.5), math.log(0.25), nan]], dtype=F64)
    h = torch.tensor([[1.0, 3.0, nan]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    # rho = 1, A = 1: xi = 1. u = [0.5 (ln .5 + 1), 0.25 (ln .25 + 3)], u1 - u0 = 0.25 exactly,
    # Ebar = mean(u) so dH = -(u - Ebar) = [+0.125, -0.125]; the padding stays 0.
    dh = entropy_change(
        torch.tensor([1.0], dtype=F64), logp, logp, h, mask, eps_low=0.2, eps_high=0.28, ebar_mode="sequence_mean"
    )
    torch.testing.assert_close(dh, torch.tensor([[0.125, -0.125, 0.0]], dtype=F64), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="ebar_exact"):
        entropy_change(torch.tensor([1.0]), logp, logp, h, mask, eps_low=0.2, eps_high=0.28)


# --------------------------------------------------------------------------- #
# modulation factors
# --------------------------------------------------------------------------- #
def test_beta_comp_hand_values():
    h = torch.tensor([0.5, 1.0, 2.0, 0.5, 0.5], dtype=F64)
    a = torch.tensor([1.0, 1.0, 1.0, -1.0, 0.0], dtype=F64)
    b = compensation_factor(h, a, h_min=0.5, h_max=2.0, alpha=0.2)
    torch.testing.assert_close(b, torch.tensor([1.2, 1 + 0.2 / 1.5, 1.0, 1.0, 1.0], dtype=F64), rtol=0, atol=1e-8)


def test_beta_stab_hand_values():
    x = torch.tensor([0.0, 0.99, 1.0], dtype=F64)
    b = stabilisation_factor(x, lam_min=0.6, gamma=50.0, tau=0.99)
    assert b[0].item() == pytest.approx(1.0, abs=1e-12)  # 0.6 + 0.4 / (1 + e^-49.5)
    assert b[1].item() == pytest.approx(0.8, abs=1e-15)  # lam_min + (1 - lam_min) / 2
    assert b[2].item() == pytest.approx(0.6 + 0.4 / (1 + math.exp(0.5)), abs=1e-15)  # ~0.751


def _batch(seed: int, R: int = 6, L: int = 5, V: int = 9, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, L, V, generator=gen, dtype=dtype) * 2
    tokens = torch.randint(0, V, (R, L), generator=gen)
    logp, h, ebar = full_vocab_token_stats(logits, tokens)
    logp_old = logp + 0.3 * torch.randn(R, L, generator=gen, dtype=dtype)
    adv = torch.randn(R, generator=gen, dtype=dtype)
    adv[1] = 0.0  # a zero-advantage sequence
    lengths = torch.randint(1, L + 1, (R,), generator=gen)
    mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    return {"advantages": adv, "logp": logp, "logp_old": logp_old, "entropy": h, "mask": mask, "ebar_exact": ebar}


def _rows(b: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in b.items()}


def test_modulate_end_to_end_hand_values():
    # Two tokens, A > 0; the first is outside the clip range (rho 2): dH = 0 -> beta_stab ~ 1.
    # The second is the scope's max |dH|: x ~ 1 -> beta_stab = 0.6 + 0.4 / (1 + e^0.5).
    logp = torch.log(torch.tensor([[0.4, 0.2]], dtype=F64))
    logp_old = logp - torch.log(torch.tensor([[2.0, 1.0]], dtype=F64))
    h = torch.tensor([[0.5, 2.0]], dtype=F64)
    adv = torch.tensor([1.5], dtype=F64)
    ebar = torch.tensor([[0.0, 0.0]], dtype=F64)
    cfg = DynamoModulationConfig()
    a_t, m = modulate_advantages(adv, logp, logp_old, h, torch.ones(1, 2), cfg, ebar_exact=ebar)
    # Token 0: lowest entropy -> beta_comp = 1.2; token 1: highest -> 1.
    assert a_t[0, 0].item() == pytest.approx(1.5 * 1.2 * 1.0, abs=1e-7)  # the 1e-8 guard in the span
    assert a_t[0, 1].item() == pytest.approx(1.5 * 1.0 * (0.6 + 0.4 / (1 + math.exp(0.5))), abs=1e-6)
    assert m["beta_comp/max"].item() == pytest.approx(1.2)
    assert m["beta_comp/min"].item() == pytest.approx(1.0)
    assert m["beta_stab/min"].item() == pytest.approx(0.751, abs=1e-3)
    assert m["frac_beta_stab_below_0.95"].item() == 0.5
    assert m["adv_ratio_mean"].item() == pytest.approx((1.2 + 0.6 + 0.4 / (1 + math.exp(0.5))) / 2, abs=1e-6)
    assert int(m["num_tokens"]) == 2
    # Negative advantage: no compensation.
    a_neg, _ = modulate_advantages(
        -adv, logp, logp, h, torch.ones(1, 2), DynamoModulationConfig(lam_min=1.0), ebar_exact=ebar
    )
    torch.testing.assert_close(a_neg, torch.full((1, 2), -1.5, dtype=F64))


def test_modulated_advantages_are_detached_and_masked():
    b = _batch(0)
    b["advantages"] = b["advantages"].clone().requires_grad_()
    b["logp"] = b["logp"].clone().requires_grad_()
    a_t, metrics = modulate_advantages(config=DynamoModulationConfig(), **b)
    assert not a_t.requires_grad
    assert a_t.shape == b["mask"].shape
    assert (a_t[~b["mask"]] == 0).all()
    assert (a_t[1] == 0).all()  # zero advantage stays zero
    assert all(not v.requires_grad for v in metrics.values())
    # Factors lie in their ranges: |A~|/|A| in (lam_min, 1 + alpha].
    ratio = metrics["adv_ratio_mean"].item()
    assert 0.6 < ratio <= 1.2
    assert 1.0 <= metrics["beta_comp/min"].item() <= metrics["beta_comp/max"].item() <= 1.2 + 1e-12
    assert 0.6 <= metrics["beta_stab/min"].item() <= metrics["beta_stab/max"].item() <= 1.0
    # [R, L] advantages give the same result as [R].
    b2 = dict(b, advantages=b["advantages"].detach().unsqueeze(1).expand_as(b["logp"]))
    a_t2, _ = modulate_advantages(config=DynamoModulationConfig(), **b2)
    torch.testing.assert_close(a_t2, a_t)


@pytest.mark.parametrize("ebar", ["exact", "sequence_mean"])
def test_minibatch_scope_is_invariant_to_micro_batching(ebar):
    b = _batch(1)
    cfg = DynamoModulationConfig(ebar=ebar)
    whole, _ = modulate_advantages(config=cfg, **b)
    splits = [slice(0, 2), slice(2, 3), slice(3, 6)]
    merged = ModulationStats()
    for s in reversed(splits):  # merge order does not matter
        merged = merged.merge(modulation_stats(config=cfg, **_rows(b, s)))
    parts = [modulate_advantages(config=cfg, stats=merged, **_rows(b, s))[0] for s in splits]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)

    # Microbatch scope (ref-code) depends on the packing.
    micro_cfg = DynamoModulationConfig(ebar=ebar, scope="microbatch")
    micro = torch.cat([modulate_advantages(config=micro_cfg, **_rows(b, s))[0] for s in splits])
    assert not torch.allclose(micro, whole)
    with pytest.raises(ValueError, match="microbatch"):
        modulate_advantages(config=micro_cfg, stats=merged, **b)


def test_modulation_stats_merge_and_empty():
    b = _batch(2)
    full = modulation_stats(config=DynamoModulationConfig(), **b)
    assert full.h_min == b["entropy"][b["mask"]].min().item()
    assert full.h_max == b["entropy"][b["mask"]].max().item()
    empty = ModulationStats.from_tokens(b["entropy"], b["entropy"], torch.zeros_like(b["mask"]))
    assert empty.empty and empty == ModulationStats()
    assert empty.merge(full) == full == full.merge(empty)
    assert ModulationStats().reduce() == ModulationStats()  # no process group: unchanged
    a_t, m = modulate_advantages(
        config=DynamoModulationConfig(), **dict(b, mask=torch.zeros_like(b["mask"]))
    )
    assert (a_t == 0).all() and torch.isfinite(a_t).all()
    assert int(m["num_tokens"]) == 0 and m["beta_stab/mean"].item() == 1.0


# --------------------------------------------------------------------------- #
# ModulationStats.reduce with real torch.distributed (gloo, 2 CPU processes)
# --------------------------------------------------------------------------- #
DP_SEED = 5


def _dp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        b = _batch(DP_SEED, R=8)
        half = 8 // world_size
        local = _rows(b, slice(rank * half, (rank + 1) * half))
        cfg = DynamoModulationConfig()
        # Different micro-batching on each rank: the scope statistics must not care.
        mbs = [slice(0, 1), slice(1, half)] if rank == 0 else [slice(0, half)]
        stats = ModulationStats()
        for s in mbs:
            stats = stats.merge(modulation_stats(config=cfg, **_rows(local, s)))
        reduced = stats.reduce(dist.group.WORLD)
        a_t = torch.cat([modulate_advantages(config=cfg, stats=reduced, **_rows(local, s))[0] for s in mbs])
        torch.save({"stats": reduced, "local": stats, "a_t": a_t}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_modulation_stats_reduce_gloo_matches_single_process():
    b = _batch(DP_SEED, R=8)
    cfg = DynamoModulationConfig()
    ref_stats = modulation_stats(config=cfg, **b)
    ref_a, _ = modulate_advantages(config=cfg, **b)

    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_dp_worker, args=(world_size, _free_port(), out_dir), nprocs=world_size, join=False)
        deadline = time.monotonic() + 60
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                pytest.fail("DP workers did not finish in time")
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]

    # The ranks' local statistics differ (so the reduction did real work) ...
    assert results[0]["local"] != results[1]["local"]
    for res in results:
        assert res["stats"] == ref_stats
    # ... and each rank's A~ equals the single-process rows.
    torch.testing.assert_close(torch.cat([r["a_t"] for r in results]), ref_a, rtol=0, atol=0)
