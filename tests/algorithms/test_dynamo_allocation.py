"""Tests of nemo_gdro.algorithms.dynamo_allocation (spec: shared/spec/dynamo.md §1)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.dynamo_allocation import (
    DynamoAllocationConfig,
    DynamoAllocator,
    priority,
)
from nemo_gdro.algorithms.dynamo_modulation import DynamoModulationConfig
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
# warmup_compete (dynamo.md §1, Allocation step 3)
def test_warmup_compete_lets_unseen_prompts_join_the_water_fill():
    # The worked example's 8 prompts plus 4 unseen ones in the same batch.
    counters = {i: (16, k) for i, k in enumerate(EX_K)}
    store = store_with(counters)
    ids = torch.arange(12)
    cfg = dict(n_bar=16, n_min=8, n_max=24)
    default = DynamoAllocator(DynamoAllocationConfig(**cfg), store).allocate(ids)
    compete = DynamoAllocator(DynamoAllocationConfig(**cfg, warmup_compete=True), store).allocate(ids)
    assert default.counts[8:].tolist() == [8, 8, 8, 8]  # warm-up: max(n_min, warmup - 0) = 8, no water-fill
    assert compete.counts[8:].tolist() == [24, 24, 24, 24]  # priority 1.0 >> any variance: they reach n_max
    for alloc in (default, compete):
        assert int(alloc.counts.sum()) == 12 * 16
        assert int(alloc.counts.min()) >= 8 and int(alloc.counts.max()) <= 24
    assert compete.weights[8:].tolist() == [1.0] * 4 and bool(compete.in_warmup[8:].all())
    # Seen prompts only: the option changes nothing.
    seen = torch.arange(8)
    assert torch.equal(
        DynamoAllocator(DynamoAllocationConfig(**cfg, warmup_compete=True), store).allocate(seen).counts,
        torch.tensor(EX_COUNTS),
    )


def test_warmup_compete_partly_seen_prompt_competes_at_its_running_priority():
    store = store_with({0: (2, 1), 1: (16, 8)})  # prompt 0 is still in warm-up (G=2 < 8) but has a priority
    cfg = DynamoAllocationConfig(n_bar=8, n_min=4, n_max=12, warmup=8, warmup_compete=True)
    alloc = DynamoAllocator(cfg, store).allocate(torch.tensor([0, 1]))
    assert alloc.weights.tolist() == pytest.approx([0.5 + 0.5e-6, 8 * 8 / (16 * 15) + 0.5e-6])
    assert alloc.counts.tolist() == [9, 7]
