"""Per-token log-prob, entropy and Ebar straight from the final hidden states and the output weight.

:func:`fused_linear_token_stats` computes what
:func:`nemo_gdro.parallel.vocab_parallel.vocab_parallel_token_stats` computes
from ``logits = hidden @ weight.T``, without ever holding the ``[tokens, vocab]``
logits of the whole input: the tokens are walked in *chunks* of
``chunk_rows`` rows; a chunk's logits are written by one matmul into a reused
buffer, reduced to per-token scalars (:func:`~nemo_gdro.parallel.vocab_parallel.chunk_stats`:
the same tile kernel and, under TP, the same two all-reduces per chunk), and
dropped. The backward recomputes each chunk's logits, turns them in place into
``dL/dlogits`` (:func:`~nemo_gdro.parallel.vocab_parallel.tile_grad`) and
accumulates ``dL/dhidden = G @ W`` and ``dL/dW += G.T @ hidden`` (the way fused
linear-cross-entropy kernels do). Only ``lse`` and ``H`` per token are saved.

Tensor parallelism: ``weight`` is this rank's vocabulary shard ``[V_local, h]``
(rows ``[vocab_start, vocab_start + V_local)``) and ``hidden`` the full
(not sequence-parallel) hidden states, identical on every TP rank. Each rank's
``dL/dhidden`` is then the contribution of its vocabulary slice, so the backward
all-reduces it over ``group`` -- what Megatron's ``ColumnParallelLinear`` does
for its input gradient. ``dL/dW`` stays local to the shard.

Precision: the chunk's logits have the weight's dtype (as
``ColumnParallelLinear`` produces them: a bf16 model gives bf16 logits); the
statistics and ``dL/dlogits`` are computed in fp32 (fp64 for fp64 weights),
``dL/dlogits`` is rounded to the weight dtype for the two backward matmuls
(as autograd would hand it to the linear layer), and ``dL/dW`` is accumulated
over chunks in fp32, then returned in the weight dtype.

Memory (bytes; ``V = V_local``, ``b_w`` the weight's element size, ``h`` the hidden size):
forward ``chunk_rows * V * b_w`` (logits buffer) + two tile workspaces; backward
the same plus, for the weight gradient, ``V * h * 4`` (fp32 accumulator) and,
for non-fp32 weights, ``V * h * b_w`` (per-chunk product). Per token only
``O(h)`` (the hidden-state gradient) and a few scalars -- nothing grows with
``tokens x vocabulary``.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_gdro.parallel import comm
from nemo_gdro.parallel.vocab_parallel import (
    StatBuffers,
    TokenStats,
    _compute_dtype,
    _group_size,
    _tile_rows,
    chunk_stats,
    grad_coefficients,
    tile_grad,
)

__all__ = ["fused_linear_token_stats", "chunk_rows_for"]

# Default bound (bytes) of the per-chunk logits buffer: big enough that the chunk's
# matmul runs at full speed, small enough to be invisible next to the model.
_CPU_CHUNK_BYTES = 32 * 2**20
_GPU_CHUNK_BYTES = 512 * 2**20


def chunk_rows_for(chunk_bytes: int | None, v_local: int, dtype: torch.dtype, device: torch.device) -> int:
    """Token rows per chunk so that one chunk's ``[rows, v_local]`` logits fit ``chunk_bytes``
    (``None``: 32 MiB on CPU, 512 MiB on GPU); at least 1."""
    if chunk_bytes is None:
        chunk_bytes = _GPU_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, chunk_bytes // (v_local * itemsize))


class _FusedLinearTokenStats(torch.autograd.Function):
    """``(hidden [..., h], weight [V_local, h], tokens [...]) -> (logp, H, Ebar)``, each ``[...]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        vocab_start: int,
        temperature: float,
        group: Any,
        chunk_rows: int,
        tile_rows: int,
        want_ebar: bool,
    ) -> TokenStats:
        lead = hidden.shape[:-1]
        x = hidden.reshape(-1, hidden.shape[-1])
        n_tok = x.shape[0]
        v_local = weight.shape[0]
        ct = _compute_dtype(weight)
        dev = hidden.device
        flat_tokens = tokens.reshape(-1).long()

        out = StatBuffers(n_tok, ct, dev)

        rows_buf = torch.empty(max(1, min(chunk_rows, n_tok)), v_local, dtype=weight.dtype, device=dev)
        ws_rows = max(1, min(tile_rows, rows_buf.shape[0]))
        work_w = torch.empty(ws_rows, v_local, dtype=ct, device=dev)
        work_e = torch.empty_like(work_w)
        w_t = weight.t()
        for c0 in range(0, n_tok, chunk_rows):
            n = min(chunk_rows, n_tok - c0)
            rows = slice(c0, c0 + n)
            logits = rows_buf[:n]
            torch.mm(x[rows], w_t, out=logits)
            tiles = [(t0, logits[t0 : t0 + tile_rows]) for t0 in range(0, n, tile_rows)]
            out.store(rows, chunk_stats(
                tiles, flat_tokens[rows], vocab_start=vocab_start, temperature=temperature, group=group,
                work_w=work_w, work_e=work_e, ebar=want_ebar,
            ))
        del rows_buf, work_w, work_e
        out.finish(flat_tokens)

        ctx.save_for_backward(hidden, weight, flat_tokens, out.lse, out.entropy)
        ctx.cfg = (vocab_start, temperature, group, chunk_rows, tile_rows)
        ebar = out.ebar.view(lead)
        ctx.mark_non_differentiable(ebar)
        ctx.set_materialize_grads(False)
        return out.logp.view(lead), out.entropy.view(lead), ebar

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, _grad_ebar: Any
    ) -> tuple[Any, ...]:
        none7 = (None,) * 7
        hidden, weight, flat_tokens, lse, entropy = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_x or need_w):
            return (None, None, *none7)
        vocab_start, temperature, group, chunk_rows, tile_rows = ctx.cfg
        x = hidden.reshape(-1, hidden.shape[-1])
        n_tok, v_local = x.shape[0], weight.shape[0]
        ct, dev = lse.dtype, hidden.device
        coef, const, target = grad_coefficients(grad_logp, grad_entropy, flat_tokens, entropy, temperature)

        in_place = weight.dtype == ct  # fp32: dL/dlogits is written over the recomputed logits
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=ct, device=dev) if need_w else None
        w_tmp = torch.empty_like(weight) if need_w and not in_place else None
        rows_buf = torch.empty(max(1, min(chunk_rows, n_tok)), v_local, dtype=weight.dtype, device=dev)
        ws_rows = max(1, min(tile_rows, rows_buf.shape[0]))
        work_a = None if in_place else torch.empty(ws_rows, v_local, dtype=ct, device=dev)
        work_p = torch.empty(ws_rows, v_local, dtype=ct, device=dev)
        w_t = weight.t()
        for c0 in range(0, n_tok, chunk_rows):
            n = min(chunk_rows, n_tok - c0)
            rows = slice(c0, c0 + n)
            g = rows_buf[:n]
            torch.mm(x[rows], w_t, out=g)  # the chunk's logits again
            for t0 in range(0, n, tile_rows):
                tile = g[t0 : t0 + tile_rows]
                k = tile.shape[0]
                out = tile if in_place else work_a[:k]  # type: ignore[index]
                sl = slice(c0 + t0, c0 + t0 + k)
                tile_grad(
                    tile, out, work_p, flat_tokens[sl], lse[sl], coef[sl], const[sl], target[sl],
                    vocab_start=vocab_start, temperature=temperature,
                )
                if not in_place:
                    tile.copy_(out)  # dL/dlogits in the weight dtype, as the linear layer would get it
            if grad_x is not None:
                torch.mm(g, weight, out=grad_x[rows])
            if grad_w is not None:
                if in_place:
                    grad_w.addmm_(g.t(), x[rows])
                else:
                    torch.mm(g.t(), x[rows], out=w_tmp)
                    grad_w.add_(w_tmp)
        if grad_x is not None and _group_size(group) > 1:
            # Every shard contributes its vocabulary slice's part of dL/dhidden ([N, h]: small next to logits).
            grad_x = comm.all_reduce(grad_x, group=group)
        gx = None if grad_x is None else grad_x.view(hidden.shape)
        gw = None if grad_w is None else grad_w.to(weight.dtype)
        return (gx, gw, *none7)


def fused_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    vocab_start: int = 0,
    temperature: float = 1.0,
    group: Any = None,
    chunk_bytes: int | None = None,
    workspace_bytes: int | None = None,
    ebar: bool = True,
) -> TokenStats:
    """Per-token ``(logp, entropy, ebar)`` of ``softmax(hidden @ weight.T / T)`` without the full logits.

    Args:
        hidden: ``[..., h]`` final hidden states (after the final norm), the same
            on every rank of ``group``; gradients flow into it.
        weight: ``[V_local, h]`` output-layer weight (this rank's vocabulary
            shard under TP; the embedding weight when tied); gradients flow into it.
        tokens: ``[...]`` integer global target ids; a negative id is ignored
            (``logp = 0``, no gradient).
        vocab_start: first global id of this shard (0 without a group).
        temperature: ``T > 0``.
        group: the TP group the vocabulary is split over (``None`` / size 1: no communication).
        chunk_bytes: bound of one chunk's logits buffer (``None``: 32 MiB CPU, 512 MiB GPU);
            a chunk holds ``max(1, chunk_bytes // (V_local * weight element size))`` token rows.
        workspace_bytes: tile workspace size (see :func:`~nemo_gdro.parallel.vocab_parallel.vocab_parallel_token_stats`).
        ebar: compute ``Ebar`` (``False``: returned as NaN).
    Returns:
        ``(logp, entropy, ebar)``, each ``[...]`` fp32 (fp64 for fp64 weights) nats;
        ``logp`` and ``entropy`` have exact gradients wrt ``hidden`` and ``weight``
        (equal, up to rounding, to those through ``vocab_parallel_token_stats(hidden @ weight.T)``).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V_local >= 1, h], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [..., {weight.shape[1]}] to match weight, got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1 or None, got {chunk_bytes}")
    if workspace_bytes is not None and workspace_bytes < 1:
        raise ValueError(f"workspace_bytes must be >= 1 or None, got {workspace_bytes}")
    if vocab_start < 0 or (_group_size(group) == 1 and vocab_start != 0):
        raise ValueError(f"vocab_start must be >= 0, and 0 for a single shard, got {vocab_start}")
    v_local = weight.shape[0]
    ct = _compute_dtype(weight)
    chunk_rows = chunk_rows_for(chunk_bytes, v_local, weight.dtype, weight.device)
    tile_rows = _tile_rows(workspace_bytes, v_local, ct, weight.device)
    return _FusedLinearTokenStats.apply(
        hidden, weight, tokens.to(hidden.device), int(vocab_start), float(temperature), group, chunk_rows,
        tile_rows, bool(ebar),
    )
