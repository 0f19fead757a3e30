"""Vocabulary-parallel log-prob / entropy / Ebar against the full-vocabulary float64 reference.

The multi-rank tests spawn 4 gloo processes once (module fixture) and run every
case at TP = 1 (a group of size 1 per rank), TP = 2 (groups {0,1} and {2,3}) and
TP = 4 (the world group); the main process compares the values and the
shard-concatenated logits gradients with ``full_vocab_token_stats`` in float64.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
from nemo_gdro.parallel.vocab_parallel import vocab_parallel_token_stats

WORLD = 4
IGNORE = -100


# ---------------------------------------------------------------------------- reference
def _reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, w_logp: torch.Tensor, w_ent: torch.Tensor
) -> dict[str, torch.Tensor]:
    """float64 values and d(sum w_logp logp + w_ent H)/dlogits; negative tokens are ignored."""
    x = logits.detach().double().requires_grad_()
    ignored = tokens < 0
    logp, ent, ebar = full_vocab_token_stats(x, tokens.clamp(min=0), temperature)
    logp = torch.where(ignored, 0.0, logp)
    (w_logp.double() * logp + w_ent.double() * ent).sum().backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "ebar": ebar.detach(), "grad": x.grad}


def _loss(logp: torch.Tensor, ent: torch.Tensor, w_logp: torch.Tensor, w_ent: torch.Tensor) -> torch.Tensor:
    return (w_logp.to(logp.dtype) * logp + w_ent.to(ent.dtype) * ent).sum()


# ---------------------------------------------------------------------------- cases
def _make_cases() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1234)

    def case(name, shape, v, *, scale=1.0, temperature=1.0, dtype=torch.float32, splits=None, **kw):
        logits = torch.randn(*shape, v, generator=g, dtype=torch.float64) * scale
        tokens = torch.randint(0, v, shape, generator=g)
        even = {tp: [v // tp] * tp for tp in (1, 2, 4) if v % tp == 0}
        c = {
            "name": name,
            "logits": logits,
            "tokens": tokens,
            "temperature": temperature,
            "dtype": dtype,
            "splits": {**even, **(splits or {})},
            "w_logp": torch.randn(shape, generator=g, dtype=torch.float64),
            "w_ent": torch.randn(shape, generator=g, dtype=torch.float64),
            "chunk_tokens": 4096,
            "workspace_bytes": None,
            "slice_last": False,
            "wrapper": False,
        }
        c.update(kw)
        return c

    cases = [
        case("basic", (2, 5), 48, chunk_tokens=3),
        case("temperature", (3, 4), 48, scale=3.0, temperature=0.6),
        case("odd_split", (2, 7), 37, temperature=1.3, splits={1: [37], 2: [15, 22], 4: [1, 17, 9, 10]}),
        case("masked", (3, 6), 48, chunk_tokens=1),
        case("bf16", (2, 6), 48, scale=2.0, dtype=torch.bfloat16, temperature=0.9),
        case("noncontiguous", (2, 6), 48, slice_last=True, chunk_tokens=4),
        case(
            "larger_chunked",
            (4, 32),
            1000,
            scale=2.0,
            splits={2: [499, 501], 4: [250, 251, 249, 250]},
            chunk_tokens=7,
            workspace_bytes=3 * 250 * 4,  # tiles of 3-4 rows inside chunks of 7
        ),
        case("wrapper", (2, 5), 48, temperature=0.8, wrapper=True),
    ]
    odd = cases[2]
    # Targets on every shard boundary of every split (first / last id of a shard).
    odd["tokens"].view(-1)[:8] = torch.tensor([0, 36, 14, 15, 17, 18, 26, 27])
    masked = cases[3]
    pad = torch.zeros(masked["tokens"].shape, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    masked["tokens"][pad] = IGNORE
    # Padding positions hold garbage logits; zero loss weights there must give zero gradient.
    masked["logits"][pad] = masked["logits"][pad] * 1e3
    masked["w_logp"][pad] = 0.0
    masked["w_ent"][pad] = 0.0
    masked["pad"] = pad
    nc = cases[5]
    # The worker passes logits[:, :-1] of a [B, S+1, V] tensor (the actor's call).
    nc["logits"] = torch.cat([nc["logits"], torch.randn(2, 1, 48, generator=g, dtype=torch.float64)], dim=1)
    return cases


def _case_input(c: dict[str, Any]) -> torch.Tensor:
    """The logits a rank's caller sees (rounded to the case dtype), full vocabulary."""
    x = c["logits"].to(c["dtype"])
    return x[:, :-1] if c["slice_last"] else x


# ---------------------------------------------------------------------------- worker
def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # Plain gloo groups: Megatron's parallel-state init costs ~30 s for 4 ranks on 2 cores; the
    # Megatron-rank path of make_token_stats_fn is tested in-process (test_wrapper_megatron_state).
    import torch.distributed as dist

    from nemo_gdro.parallel.vocab_parallel import make_token_stats_fn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        single, _ = dist.new_subgroups(group_size=1)  # a real TP group of size 1 per rank
        pair, _ = dist.new_subgroups(group_size=2)  # {0, 1} and {2, 3}
        groups = {1: (single, 0), 2: (pair, rank % 2), 4: (dist.group.WORLD, rank)}
        results: dict[str, Any] = {}
        for c in torch.load(os.path.join(out_dir, "cases.pt"), weights_only=False):
            for tp, (group, tp_rank) in groups.items():
                split = c["splits"].get(tp)
                if split is None:
                    continue
                start = sum(split[:tp_rank])
                full = c["logits"].to(c["dtype"])
                shard = full[..., start : start + split[tp_rank]].clone().requires_grad_()
                x = shard[:, :-1] if c["slice_last"] else shard
                if c["wrapper"]:
                    fn = make_token_stats_fn(group)
                    logp, ent, ebar = fn(x, c["tokens"], c["temperature"])
                else:
                    logp, ent, ebar = vocab_parallel_token_stats(
                        x,
                        c["tokens"],
                        vocab_start=start,
                        temperature=c["temperature"],
                        group=group,
                        chunk_tokens=c["chunk_tokens"],
                        workspace_bytes=c["workspace_bytes"],
                    )
                _loss(logp, ent, c["w_logp"], c["w_ent"]).backward()
                grad = shard.grad[:, :-1] if c["slice_last"] else shard.grad
                results[f"{c['name']}/tp{tp}"] = {
                    "logp": logp.detach(),
                    "entropy": ent.detach(),
                    "ebar": ebar,
                    "ebar_requires_grad": ebar.requires_grad,
                    "grad": grad.clone(),
                    "grad_dtype": shard.grad.dtype,
                }
        # An id no shard owns raises on every rank of the group (no rank is left hanging).
        try:
            bad = torch.tensor([[3, 48]])
            vocab_parallel_token_stats(torch.zeros(1, 2, 12), bad, vocab_start=12 * rank, group=dist.group.WORLD)
            results["raises"] = False
        except ValueError:
            results["raises"] = True
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory):
    pytest.importorskip("megatron.core")
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    cases = _make_cases()
    torch.save(cases, out_dir / "cases.pt")
    mp.start_processes(
        _worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True, start_method="spawn"
    )
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return cases, ranks


def _tolerances(c: dict[str, Any]) -> dict[str, float]:
    if c["dtype"] == torch.bfloat16:
        # Values are exact fp32 math on the bf16 inputs; only the gradient is rounded to bf16.
        return {"rtol": 1e-5, "atol": 1e-5, "grad_rtol": 1e-2, "grad_atol": 1e-3}
    return {"rtol": 1e-5, "atol": 1e-6, "grad_rtol": 1e-5, "grad_atol": 1e-6}


CASE_NAMES = [c["name"] for c in _make_cases()]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_full_vocab_reference(multi_rank, name, tp):
    cases, ranks = multi_rank
    c = next(c for c in cases if c["name"] == name)
    if tp not in c["splits"]:
        pytest.skip(f"no split for TP={tp}")
    x = _case_input(c).double()  # the rounded values the ranks saw
    ref = _reference(x, c["tokens"], c["temperature"], c["w_logp"], c["w_ent"])
    tol = _tolerances(c)
    key = f"{name}/tp{tp}"
    # TP=2 runs in two groups ({0,1}, {2,3}), TP=1 on every rank: all must agree.
    members = {1: [[r] for r in range(WORLD)], 2: [[0, 1], [2, 3]], 4: [[0, 1, 2, 3]]}[tp]
    for group in members:
        for r in group:
            got = ranks[r][key]
            assert got["logp"].dtype == torch.float32 and not got["ebar_requires_grad"]
            for stat in ("logp", "entropy", "ebar"):
                torch.testing.assert_close(
                    got[stat].double(), ref[stat], rtol=tol["rtol"], atol=tol["atol"], msg=f"{key} {stat} rank {r}"
                )
        grad = torch.cat([ranks[r][key]["grad"] for r in group], dim=-1)
        assert ranks[group[0]][key]["grad_dtype"] == c["dtype"]
        torch.testing.assert_close(
            grad.double(), ref["grad"], rtol=tol["grad_rtol"], atol=tol["grad_atol"], msg=f"{key} grad"
        )
    if name == "masked":
        got = ranks[0][key]
        assert torch.all(got["logp"][c["pad"]] == 0)
        assert torch.isfinite(got["entropy"]).all() and torch.isfinite(got["ebar"]).all()
        grad = torch.cat([ranks[r][key]["grad"] for r in members[0]], dim=-1)
        assert torch.all(grad[c["pad"]] == 0)


def test_out_of_vocabulary_raises_on_every_rank(multi_rank):
    _, ranks = multi_rank
    assert all(r["raises"] for r in ranks)


# ---------------------------------------------------------------------------- single shard
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    v=st.integers(1, 64),
    scale=st.sampled_from([1e-3, 0.5, 2.0, 20.0]),
    temperature=st.floats(0.2, 3.0),
    chunk_tokens=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_single_shard_equals_reference(shape, v, scale, temperature, chunk_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g, dtype=torch.float64) * scale).requires_grad_()
    tokens = torch.randint(0, v, tuple(shape), generator=g)
    w_logp, w_ent = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    got = vocab_parallel_token_stats(logits, tokens, vocab_start=0, temperature=temperature, chunk_tokens=chunk_tokens)
    ref = _reference(logits, tokens, temperature, w_logp, w_ent)
    for stat, value in zip(("logp", "entropy", "ebar"), got):
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, ref[stat], rtol=1e-9, atol=1e-12, msg=stat)
    _loss(got[0], got[1], w_logp, w_ent).backward()
    torch.testing.assert_close(logits.grad, ref["grad"], rtol=1e-9, atol=1e-12)


def test_single_shard_fp32_matches_fp32_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 500, generator=g) * 4
    tokens = torch.randint(0, 500, (4, 9), generator=g)
    got = vocab_parallel_token_stats(logits, tokens, vocab_start=0, temperature=0.7)
    ref = full_vocab_token_stats(logits, tokens, 0.7)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _run(logits: torch.Tensor, tokens: torch.Tensor, w: torch.Tensor, **kw: Any):
    x = logits.clone().requires_grad_()
    logp, ent, ebar = vocab_parallel_token_stats(x, tokens, vocab_start=0, temperature=1.1, **kw)
    _loss(logp, ent, w[0], w[1]).backward()
    return logp.detach(), ent.detach(), ebar, x.grad


def test_chunking_changes_nothing():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 11, 300, generator=g) * 3
    tokens = torch.randint(0, 300, (6, 11), generator=g)
    w = torch.randn(2, 6, 11, generator=g)
    base = _run(logits, tokens, w, chunk_tokens=10_000, workspace_bytes=2**30)
    for kw in (
        {"chunk_tokens": 1},
        {"chunk_tokens": 7},
        {"chunk_tokens": 66},
        {"workspace_bytes": 5 * 300 * 4},  # tiles of 5 rows
        {"workspace_bytes": 1},  # below one row -> tiles of 1 row
        {"chunk_tokens": 3, "workspace_bytes": 2 * 300 * 4},
    ):
        for a, b in zip(_run(logits, tokens, w, **kw), base):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=str(kw))


def test_non_contiguous_and_gradient_layout():
    g = torch.Generator().manual_seed(4)
    full = (torch.randn(3, 8, 40, generator=g) * 2).requires_grad_()
    tokens = torch.randint(0, 40, (3, 7), generator=g)
    w = torch.randn(2, 3, 7, generator=g)
    logp, ent, _ = vocab_parallel_token_stats(full[:, :-1], tokens, vocab_start=0, chunk_tokens=5)
    _loss(logp, ent, w[0], w[1]).backward()
    ref = _reference(full[:, :-1], tokens, 1.0, w[0], w[1])
    torch.testing.assert_close(full.grad[:, :-1].double(), ref["grad"], rtol=1e-5, atol=1e-6)
    assert torch.all(full.grad[:, -1] == 0)
    # A transposed (column-major) vocabulary dimension works too.
    xt = full.detach()[:, :-1].transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(vocab_parallel_token_stats(xt, tokens, vocab_start=0)[0].double(), ref["logp"])


def test_only_requested_gradients():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 16, (2, 3), generator=g)
    logp, ent, ebar = vocab_parallel_token_stats(x, tokens, vocab_start=0)
    assert not ebar.requires_grad and logp.requires_grad and ent.requires_grad
    (gx,) = torch.autograd.grad(ent.sum(), x)
    ref = _reference(x, tokens, 1.0, torch.zeros(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(gx, ref["grad"])
    with torch.no_grad():
        assert not vocab_parallel_token_stats(x, tokens, vocab_start=0)[0].requires_grad


def test_ebar_skipped_when_not_asked():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 40, (3, 5), generator=g)
    full = vocab_parallel_token_stats(x, tokens, vocab_start=0)
    lean = vocab_parallel_token_stats(x, tokens, vocab_start=0, ebar=False)
    assert torch.isnan(lean[2]).all() and not torch.isnan(full[2]).any()
    for a, b in zip(lean[:2], full[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (g_lean,) = torch.autograd.grad(lean[0].sum() + lean[1].sum(), x)
    (g_full,) = torch.autograd.grad(full[0].sum() + full[1].sum(), x)
    torch.testing.assert_close(g_lean, g_full, rtol=0, atol=0)


def test_low_precision_input_computes_in_fp32():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 200, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, 200, (3,), generator=g)
    got = vocab_parallel_token_stats(x, tokens, vocab_start=0)
    ref = full_vocab_token_stats(x.double(), tokens)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_wrapper_megatron_state():
    """``make_token_stats_fn()`` reads the TP group and rank from Megatron's parallel state."""
    pytest.importorskip("megatron.core")
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed
    from nemo_gdro.parallel.vocab_parallel import make_token_stats_fn

    init_distributed(seed=0)
    try:
        fn = make_token_stats_fn()
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2, 3, 30, generator=g)
        tokens = torch.randint(0, 30, (2, 3), generator=g)
        for a, b in zip(fn(x, tokens, 0.8), full_vocab_token_stats(x, tokens, 0.8)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        destroy_distributed()


def test_input_validation():
    x, t = torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_token_stats(x, t, vocab_start=0, temperature=0.0)
    with pytest.raises(ValueError, match="tokens must have shape"):
        vocab_parallel_token_stats(x, torch.zeros(3, dtype=torch.long), vocab_start=0)
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_token_stats(x, t.float(), vocab_start=0)
    with pytest.raises(ValueError, match="vocab_start must be 0"):
        vocab_parallel_token_stats(x, t, vocab_start=5)
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_token_stats(x, t, vocab_start=0, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"token ids \[5\]"):
        vocab_parallel_token_stats(x, torch.tensor([1, 5]), vocab_start=0)
    # Ignored (negative) ids are fine; an empty batch too.
    logp, ent, _ = vocab_parallel_token_stats(x, torch.tensor([-100, 2]), vocab_start=0)
    assert logp[0] == 0 and torch.allclose(ent, torch.full((2,), torch.log(torch.tensor(5.0)).item()))
    empty = vocab_parallel_token_stats(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), vocab_start=0)
    assert all(e.shape == (0,) for e in empty)
