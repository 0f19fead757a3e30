"""Tests of nemo_gdro.algorithms.dynamo_modulation (spec: shared/spec/dynamo.md §2)."""

from __future__ import annotations

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

from nemo_gdro.algorithms.dynamo_modulation import (
    DynamoModulationConfig,
    ModulationStats,
    compensation_factor,
    entropy_change,
    modulate_advantages,
    modulation_stats,
    stabilisation_factor,
)
from nemo_gdro.algorithms.token_stats import full_vocab_token_stats

F64 = torch.float64


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
