"""Fused linear + token statistics against the full-vocabulary float64 reference on ``hidden @ W.T``.

Values and gradients wrt the hidden states and the output weight, at a small
vocabulary (one chunk) and at vocabularies spanning several chunks and tiles,
with temperature, ignored targets, a tied (embedding) weight, and under TP = 2
(two spawned gloo processes, each holding one vocabulary shard of the weight).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
from nemo_gdro.parallel.fused_linear_stats import chunk_rows_for, fused_linear_token_stats
from nemo_gdro.parallel.vocab_parallel import vocab_parallel_token_stats

IGNORE = -100


def _inputs(v: int, h: int, lead: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7
    tokens = torch.randint(0, v, lead, generator=g)
    tokens.view(-1)[1] = IGNORE
    w_logp = torch.randn(lead, generator=g, dtype=torch.float64)
    w_ent = torch.randn(lead, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), tokens, w_logp, w_ent


def _reference(hidden, weight, tokens, temperature, w_logp, w_ent) -> dict[str, torch.Tensor]:
    """float64 values and gradients of ``sum w_logp logp + w_ent H`` wrt hidden and weight."""
    x = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp, ent, ebar = full_vocab_token_stats(x @ w.t(), tokens.clamp(min=0), temperature)
    logp = torch.where(tokens < 0, 0.0, logp)
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "ebar": ebar.detach(), "gx": x.grad, "gw": w.grad}


def _fused(hidden, weight, tokens, temperature, w_logp, w_ent, **kw: Any) -> dict[str, torch.Tensor]:
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent, ebar = fused_linear_token_stats(x, w, tokens, temperature=temperature, **kw)
    ((logp * w_logp.to(logp.dtype)).sum() + (ent * w_ent.to(ent.dtype)).sum()).backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "ebar": ebar, "gx": x.grad, "gw": w.grad}


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    for key in ("logp", "entropy", "ebar", "gx", "gw"):
        torch.testing.assert_close(got[key].double(), ref[key], rtol=rtol, atol=atol, msg=key)


# (vocabulary, chunk_bytes, workspace_bytes): one chunk; several chunks of several tiles; a chunk per row
LAYOUTS = [(48, None, None), (1000, 8 * 1000 * 7, 8 * 1000 * 3), (997, 8 * 997, 8 * 997 * 2)]


@pytest.mark.parametrize("v,chunk_bytes,workspace_bytes", LAYOUTS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float64_equals_reference(v, chunk_bytes, workspace_bytes, temperature):
    hidden, weight, tokens, w_logp, w_ent = _inputs(v, 16, (3, 11), torch.float64)
    got = _fused(
        hidden, weight, tokens, temperature, w_logp, w_ent, chunk_bytes=chunk_bytes, workspace_bytes=workspace_bytes
    )
    ref = _reference(hidden, weight, tokens, temperature, w_logp, w_ent)
    _assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert got["logp"][0, 1] == 0 and got["entropy"][0, 1] > 0  # an ignored target keeps its entropy


def test_float32_multi_chunk_matches_float64_reference():
    hidden, weight, tokens, w_logp, w_ent = _inputs(5000, 32, (4, 9), torch.float32, seed=1)
    assert chunk_rows_for(4 * 5000 * 5, 5000, torch.float32, torch.device("cpu")) == 5  # 36 rows -> 8 chunks
    got = _fused(hidden, weight, tokens, 0.9, w_logp, w_ent, chunk_bytes=4 * 5000 * 5)
    ref = _reference(hidden, weight, tokens, 0.9, w_logp, w_ent)
    _assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_matches_the_logits_path():
    """bf16 weights: the same numbers as Megatron's bf16 logits fed to the chunked statistics."""
    hidden, weight, tokens, w_logp, w_ent = _inputs(700, 16, (2, 13), torch.bfloat16, seed=2)
    got = _fused(hidden, weight, tokens, 1.0, w_logp, w_ent, chunk_bytes=2 * 700 * 4)
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent, ebar = vocab_parallel_token_stats(x @ w.t(), tokens, vocab_start=0)
    ((logp * w_logp.float()).sum() + (ent * w_ent.float()).sum()).backward()
    torch.testing.assert_close(got["logp"], logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["entropy"], ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["ebar"], ebar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["gx"].float(), x.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got["gw"].float(), w.grad.float(), rtol=2e-2, atol=2e-2)
    assert got["gx"].dtype == got["gw"].dtype == torch.bfloat16


def test_tied_weight_accumulates_both_gradients():
    """The output weight is also the embedding table: its gradient is the sum of both uses."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(300, 8, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 300, (2, 9), generator=g)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)
    targets = torch.roll(ids, -1, dims=1)

    def run(stats):
        w = table.clone().requires_grad_()
        hidden = torch.tanh(w[ids] @ mix)
        logp, ent = stats(hidden, w)
        (logp.sum() - 0.1 * ent.sum()).backward()
        return w.grad

    fused = run(lambda x, w: fused_linear_token_stats(x, w, targets, chunk_bytes=8 * 300 * 4)[:2])
    ref = run(lambda x, w: full_vocab_token_stats(x @ w.t(), targets)[:2])
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)


def test_ebar_skipped_when_not_asked():
    hidden, weight, tokens, w_logp, w_ent = _inputs(400, 8, (2, 5), torch.float64)
    with_ebar = _fused(hidden, weight, tokens, 1.0, w_logp, w_ent)
    without = _fused(hidden, weight, tokens, 1.0, w_logp, w_ent, ebar=False)
    assert torch.isnan(without["ebar"]).all() and not with_ebar["ebar"].isnan().any()
    for key in ("logp", "entropy", "gx", "gw"):
        torch.testing.assert_close(without[key], with_ebar[key], rtol=0, atol=0)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any ``[..., V]`` tensor an op produces (flattened leading dims)."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v, self.rows = v, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.v:
                self.rows = max(self.rows, t.numel() // self.v)
        return out


def test_never_holds_the_logits_of_all_tokens():
    v, rows_per_chunk = 3000, 7
    # hidden size 4 < 7: the [h, V] transposed weight view is not mistaken for a logits chunk
    hidden, weight, tokens, w_logp, w_ent = _inputs(v, 4, (4, 20), torch.float32)
    with _LargestVocabTensor(v) as seen:
        _fused(hidden, weight, tokens, 1.0, w_logp, w_ent, chunk_bytes=4 * v * rows_per_chunk)
    assert 0 < seen.rows <= rows_per_chunk  # 80 tokens, chunks of 7 rows
    with _LargestVocabTensor(v) as seen_ref:
        _reference(hidden, weight, tokens, 1.0, w_logp, w_ent)
    assert seen_ref.rows == 80  # the reference does hold them


def test_input_validation():
    x, w, t = torch.zeros(2, 3, 4), torch.zeros(10, 4), torch.zeros(2, 3, dtype=torch.long)
    for kwargs, match in [
        ({"hidden": torch.zeros(2, 3, 5)}, "hidden must be"),
        ({"weight": torch.zeros(10)}, "weight must be"),
        ({"hidden": x.double()}, "share one float dtype"),
        ({"tokens": t[:, :2]}, "tokens must have shape"),
        ({"tokens": t.float()}, "integer ids"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"vocab_start": 3}, "vocab_start"),
    ]:
        args = {"hidden": x, "weight": w, "tokens": t, **kwargs}
        with pytest.raises(ValueError, match=match):
            fused_linear_token_stats(
                args.pop("hidden"), args.pop("weight"), args.pop("tokens"), **args
            )
    with pytest.raises(ValueError, match=r"token ids \[10, 10"):
        fused_linear_token_stats(x, w, torch.full((2, 3), 10))


# ---------------------------------------------------------------------------- TP = 2
WORLD = 2
TP_V, TP_H = 1200, 16  # shards of 600 ids; chunks of 9 rows


def _tp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        hidden, weight, tokens, w_logp, w_ent, temperature = torch.load(
            os.path.join(out_dir, "case.pt"), weights_only=False
        )
        v_local = TP_V // WORLD
        out = _fused(
            hidden, weight[rank * v_local : (rank + 1) * v_local], tokens, temperature, w_logp, w_ent,
            vocab_start=rank * v_local, group=dist.group.WORLD, chunk_bytes=8 * v_local * 9,
        )
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_two_shards_equal_reference(tmp_path):
    import torch.multiprocessing as mp

    hidden, weight, tokens, w_logp, w_ent = _inputs(TP_V, TP_H, (3, 14), torch.float64, seed=4)
    torch.save((hidden, weight, tokens, w_logp, w_ent, 0.8), tmp_path / "case.pt")
    mp.start_processes(
        _tp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _reference(hidden, weight, tokens, 0.8, w_logp, w_ent)
    for r in ranks:  # every rank: the full-vocabulary values and the all-reduced hidden gradient
        for key in ("logp", "entropy", "ebar", "gx"):
            torch.testing.assert_close(r[key], ref[key], rtol=1e-10, atol=1e-12, msg=key)
    # each rank: the gradient of its own vocabulary rows of the weight
    torch.testing.assert_close(torch.cat([r["gw"] for r in ranks]), ref["gw"], rtol=1e-10, atol=1e-12)
