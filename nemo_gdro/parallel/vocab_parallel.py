"""Per-token log-prob, entropy and DynaMO's exact Ebar from vocabulary-parallel logits.

Under tensor parallelism (Megatron's ``VocabParallel`` layout) rank ``k`` of
the TP group holds the logits of the vocabulary slice
``[vocab_start_k, vocab_start_k + V_k)``. :func:`vocab_parallel_token_stats`
computes, for every token position, three scalars of the full-vocabulary
distribution ``pi = softmax(logits / T)`` without ever gathering the
vocabulary and without materialising a ``[tokens, vocab]`` fp32 copy of the
whole input. It walks over the tokens in *chunks* (``chunk_tokens`` positions;
each costs two all-reduces over the TP group: MAX of the row maxima, then one
SUM of the stacked per-token partial sums) and does the local work of a chunk
in *tiles* of a few rows that run through two reused fp32 workspaces (4 MiB
each on CPU, so a tile's successive passes stay in cache; 64 MiB on GPU).
Peak extra memory is therefore two tile workspaces plus ``O(chunk_tokens)``
per-token scalars, whatever the vocabulary size and the number of tokens.

Notation (one token position; ``a`` runs over the whole vocabulary, all
quantities in nats)
--------------------------------------------------------------------------
``z_a = logit_a / T``, ``m = max_a z_a`` (all-reduce MAX), ``w_a = z_a - m <= 0``,
``e_a = exp(w_a)`` and the four shard-additive sums (all-reduce SUM, stacked
into one tensor together with the target pick)::

    s  = sum_a e_a              q1 = sum_a e_a w_a
    q2 = sum_a e_a^2            r  = sum_a e_a^2 w_a
    w_t = z_t - m               (only the shard owning token t contributes; others add 0)

Then, with ``log pi_a = w_a - log s`` and ``lse = m + log s``:

* ``logp  = log pi_t = w_t - log s``;
* ``H     = -sum_a pi_a log pi_a = log s - q1 / s``  (a sum of two non-negative
  terms, so no cancellation);
* ``Ebar  = sum_a pi_a^2 (log pi_a + H)``. Since ``log pi_a + H = w_a - q1/s``
  (the centred logit ``z_a - E_pi[z]``) and ``pi_a^2 = e_a^2 / s^2``::

      Ebar = (r - q2 q1 / s) / s^2.

  Its units are nats (a probability-weighted log-probability).

Gradients (exact; derivations)
------------------------------
``d pi_b / d z_a = pi_b (delta_ab - pi_a)``.

* Log-prob: ``log pi_t = z_t - lse`` and ``d lse / d z_a = pi_a``, so::

      d logp / d z_a = delta_at - pi_a                         [nats per unit logit]

* Entropy: ``H = lse - sum_b pi_b z_b``. Then
  ``d/dz_a sum_b pi_b z_b = pi_a + sum_b z_b pi_b (delta_ab - pi_a)
  = pi_a + pi_a (z_a - E_pi[z])``, hence::

      d H / d z_a = pi_a - pi_a - pi_a (z_a - E_pi[z])
                  = -pi_a (z_a - E_pi[z]) = -pi_a (log pi_a + H)   [nats per unit logit]

  (``log pi_a + H = z_a - lse + lse - E_pi[z]``.)

For upstream gradients ``g_l = dL/dlogp`` and ``g_H = dL/dH`` (per token) and
``z = logit / T``::

    dL/dlogit_a = ( g_l delta_at - pi_a (g_l + g_H (log pi_a + H)) ) / T

Every factor is local to the shard that owns ``a`` once the per-token scalars
``lse`` and ``H`` are known, so the backward pass needs no communication: it
saves ``lse [N]`` and ``H [N]`` (plus references to the inputs, which autograd
keeps anyway) and recomputes ``pi`` tile by tile. ``Ebar`` is returned
detached (DynaMO uses it only inside detached advantage factors).

Tokens
------
``tokens`` are global vocabulary ids. A negative id (for example ``-100``
padding) is *ignored*: its ``logp`` is 0 and carries no gradient, while its
entropy and Ebar are still those of the distribution at that position. A
non-negative id that no shard owns (``>= V``) raises ``ValueError`` (checked
once per call, after the last chunk, with one host synchronisation).

Precision
---------
All arithmetic is in fp32 (fp64 when the logits are fp64, like the
reference :func:`nemo_gdro.algorithms.token_stats.full_vocab_token_stats`),
whatever the logits' dtype (bf16 logits are upcast one tile at a time). The
outputs have that compute dtype. Ebar is evaluated as
``(r/s - (q2/s)(q1/s))/s``; in fp32 it is within ~1e-6 relative of the float64
reference for ordinary logits (the plain fp32 reference loses more).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_token_stats", "make_token_stats_fn", "chunk_stats", "tile_grad", "grad_coefficients"]

# Default size (bytes) of each of the two compute-dtype tile workspaces. On CPU a
# few MiB keeps a tile's successive passes (subtract, exp, products, sums) in the
# last-level cache, which makes the chunked pass as fast as one log_softmax; on
# GPU larger tiles amortise the kernel launches.
_CPU_TILE_BYTES = 4 * 2**20
_GPU_TILE_BYTES = 64 * 2**20

TokenStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------- helpers
def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # At least fp32 (as the reference does); fp64 input stays fp64.
    return torch.promote_types(torch.float32, logits.dtype)


def _group_size(group: Any) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _row_blocks(x: torch.Tensor, offset: int = 0) -> list[tuple[int, torch.Tensor]]:
    """Split ``x [..., V]`` into 2-D row views ``(first flat row, block [n, V])``, copying nothing.

    ``reshape(-1, V)`` of a non-viewable tensor (the actor passes
    ``logits[:, :-1]``) would copy the whole input; instead the leading
    dimension is split until every block can be viewed as a matrix.
    """
    v = x.shape[-1]
    if x.dim() == 1:
        return [(offset, x.unsqueeze(0))]
    try:
        return [(offset, x.view(-1, v))]
    except RuntimeError:
        per = x[0].numel() // v if x.shape[0] > 0 else 0
        blocks: list[tuple[int, torch.Tensor]] = []
        for i in range(x.shape[0]):
            blocks.extend(_row_blocks(x[i], offset + i * per))
        return blocks


def _chunks(blocks: list[tuple[int, torch.Tensor]], rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(flat start row, [n <= rows, V] view)`` over all blocks in token order."""
    for offset, block in blocks:
        for start in range(0, block.shape[0], rows):
            yield offset + start, block[start : start + rows]


def _pieces(blocks: list[tuple[int, torch.Tensor]], start: int, stop: int) -> list[tuple[int, torch.Tensor]]:
    """The row views ``(flat start row, view)`` covering flat token rows ``[start, stop)``.

    Chunk boundaries are flat token positions, so every rank issues the same
    collectives whatever the memory layout of its shard.
    """
    out = []
    for offset, block in blocks:
        lo, hi = max(start, offset), min(stop, offset + block.shape[0])
        if lo < hi:
            out.append((lo, block[lo - offset : hi - offset]))
    return out


def _tile_rows(workspace_bytes: int | None, v_local: int, dtype: torch.dtype, device: torch.device) -> int:
    if workspace_bytes is None:
        workspace_bytes = _GPU_TILE_BYTES if device.type == "cuda" else _CPU_TILE_BYTES
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, workspace_bytes // (v_local * itemsize))


def _target_index(tokens: torch.Tensor, vocab_start: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local index clamped into [0, V_local), owned by this shard)`` for ``tokens [n]``."""
    local = tokens - vocab_start
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned


# ---------------------------------------------------------------------------- shared kernels
def chunk_stats(
    tiles: list[tuple[int, torch.Tensor]],
    tokens: torch.Tensor,
    *,
    vocab_start: int,
    temperature: float,
    group: Any,
    work_w: torch.Tensor,
    work_e: torch.Tensor,
    ebar: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Statistics of the ``n = tokens.numel()`` token rows of one chunk (module doc's notation).

    Args:
        tiles: ``(row offset within the chunk, [k, V_local] logits view)`` covering rows ``[0, n)``.
        tokens: int64 ``[n]`` global target ids of the chunk's rows.
        group: TP group (``None``: this shard is the whole vocabulary, no communication).
        work_w, work_e: compute-dtype workspaces of at least ``max k`` rows (overwritten).
        ebar: compute ``Ebar`` (one more product and row sum per element).
    Returns:
        ``(logp, entropy, ebar or None, lse, found)``, each ``[n]`` compute dtype; ``lse`` is
        ``log sum_a exp(z_a)`` and ``found > 0`` where some shard owns the target id. Costs
        two all-reduces of ``O(n)`` elements with a group, none without.
    """
    n = tokens.numel()
    ct, dev = work_w.dtype, work_w.device
    v_local = work_w.shape[-1]
    distributed = _group_size(group) > 1
    scaled = temperature != 1.0
    m_raw = torch.empty(n, dtype=ct, device=dev)  # max of the raw (unscaled) logits
    if distributed:
        for t0, tile in tiles:
            m_raw[t0 : t0 + tile.shape[0]] = tile.amax(dim=-1)
        dist.all_reduce(m_raw, op=dist.ReduceOp.MAX, group=group)
    # rows: s, q1, q2, r, w_t, owned -- one all-reduce for all of them
    sums = torch.zeros(6, n, dtype=ct, device=dev)
    for t0, tile in tiles:
        k = tile.shape[0]
        sl = slice(t0, t0 + k)
        if not distributed:
            # Without communication each tile's max is taken while the tile is in cache.
            m_raw[sl] = tile.amax(dim=-1)
        w, e = work_w[:k], work_e[:k]
        # w = (x - max x) / T = z - m; a tensor-tensor op upcasts bf16 exactly.
        torch.sub(tile, m_raw[sl].unsqueeze(-1), out=w)
        if scaled:
            w.div_(temperature)
        torch.exp(w, out=e)
        idx, owned = _target_index(tokens[sl], vocab_start, v_local)
        sums[4, sl] = torch.where(owned, w.gather(1, idx.unsqueeze(-1)).squeeze(-1), 0.0)  # w_t
        sums[5, sl] = owned.to(ct)
        # In-place products and row sums on the cache-resident tile (no BLAS, no
        # temporaries): w -> e w -> e^2 w, e -> e^2.
        torch.sum(e, dim=-1, out=sums[0, sl])  # s
        torch.sum(w.mul_(e), dim=-1, out=sums[1, sl])  # q1 = sum e w
        if ebar:
            torch.sum(w.mul_(e), dim=-1, out=sums[3, sl])  # r  = sum e^2 w
            torch.sum(e.mul_(e), dim=-1, out=sums[2, sl])  # q2 = sum e^2
    if distributed:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

    s, q1, q2, r, w_t, hit = sums.unbind(0)
    log_s = torch.log(s)
    mean_w = q1 / s  # E_pi[w] <= 0
    logp = w_t - log_s
    entropy = log_s - mean_w
    ebar_out = (r / s - (q2 / s) * mean_w) / s if ebar else None
    lse = (m_raw / temperature if scaled else m_raw) + log_s
    return logp, entropy, ebar_out, lse, hit


def check_found(flat_tokens: torch.Tensor, found: torch.Tensor) -> None:
    """Raise ``ValueError`` for non-negative target ids no shard owns (one host sync; the
    same decision on every rank, as ``found`` is all-reduced: no rank hangs)."""
    if flat_tokens.numel():
        missing = (found == 0) & (flat_tokens >= 0)
        if bool(missing.any()):
            bad = flat_tokens[missing][:5].tolist()
            raise ValueError(f"token ids {bad} lie outside the vocabulary covered by the shards")


class StatBuffers:
    """The per-token outputs of one statistics pass, filled chunk by chunk: ``logp``, ``entropy``,
    ``ebar`` (NaN where not computed), ``lse`` and ``found``, each ``[n_tok]`` in the compute dtype."""

    def __init__(self, n_tok: int, dtype: torch.dtype, device: torch.device) -> None:
        self.logp = torch.empty(n_tok, dtype=dtype, device=device)
        self.entropy = torch.empty_like(self.logp)
        self.ebar = torch.full_like(self.logp, float("nan"))
        self.lse = torch.empty_like(self.logp)
        self.found = torch.empty_like(self.logp)  # > 0 where some shard owns the target id

    def store(self, rows: slice, stats: tuple[torch.Tensor, ...]) -> None:
        """One chunk's :func:`chunk_stats` result at token positions ``rows``."""
        lp, h, eb, ls, hit = stats
        self.logp[rows], self.entropy[rows], self.lse[rows], self.found[rows] = lp, h, ls, hit
        if eb is not None:
            self.ebar[rows] = eb

    def finish(self, flat_tokens: torch.Tensor) -> None:
        """Every target id was found on some shard; ignored targets (< 0) get log-prob 0."""
        check_found(flat_tokens, self.found)
        self.logp.masked_fill_(flat_tokens < 0, 0.0)


def grad_coefficients(
    grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, flat_tokens: torch.Tensor,
    entropy: torch.Tensor, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(coef, const, target)``, each ``[N, 1]``, of
    ``dL/dlogit_a = pi_a (coef log pi_a + const) + delta_at target`` (module doc)."""
    ct = entropy.dtype
    inv_t = 1.0 / temperature
    zeros = torch.zeros_like(entropy)
    g_l = zeros if grad_logp is None else grad_logp.reshape(-1).to(ct)
    g_h = zeros if grad_entropy is None else grad_entropy.reshape(-1).to(ct)
    g_l = torch.where(flat_tokens < 0, 0.0, g_l)  # ignored targets: logp is a constant 0
    # dL/dlogit_a = (g_l delta_at - pi_a (g_l + g_H (log pi_a + H))) / T
    #             = pi_a (a_neg * log pi_a + c) + delta_at g_l / T  with per-token
    # a_neg = -g_H / T and c = -(g_l + g_H H) / T: one addcmul and one multiply per element.
    coef = (-g_h * inv_t).unsqueeze(-1)
    const = (-(g_l + g_h * entropy) * inv_t).unsqueeze(-1)
    target = (g_l * inv_t).unsqueeze(-1)
    return coef, const, target


def tile_grad(
    tile: torch.Tensor, out: torch.Tensor, work_p: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor,
    coef: torch.Tensor, const: torch.Tensor, target: torch.Tensor, *, vocab_start: int, temperature: float,
) -> None:
    """Write ``dL/dlogits`` of the ``k`` rows of ``tile [k, V_local]`` into ``out`` (compute dtype;
    may be ``tile`` itself when that has the compute dtype); ``work_p`` is a ``[>= k, V_local]``
    workspace; the per-token tensors are the tile's rows of :func:`grad_coefficients` and ``lse``."""
    k, v_local = tile.shape
    pi = work_p[:k]
    if temperature == 1.0:
        torch.sub(tile, lse.unsqueeze(-1), out=out)  # log pi
    else:
        out.copy_(tile)  # upcast first: bf16 / T would round in bf16
        out.div_(temperature).sub_(lse.unsqueeze(-1))
    torch.exp(out, out=pi)
    torch.addcmul(const, out, coef, out=out)
    out.mul_(pi)
    idx, owned = _target_index(tokens, vocab_start, v_local)
    out.scatter_add_(1, idx.unsqueeze(-1), torch.where(owned.unsqueeze(-1), target, 0.0))


# ---------------------------------------------------------------------------- autograd function
class _VocabParallelTokenStats(torch.autograd.Function):
    """``(logits shard [..., V_local], tokens [...]) -> (logp, H, Ebar)``, each ``[...]``.

    Forward: chunks of ``chunk_rows`` tokens, each with two all-reduces (MAX of
    the row maxima, SUM of the stacked per-token partial sums), the local work
    done in tiles of ``tile_rows`` through two reused workspaces. Backward:
    tiles, no communication. Without ``want_ebar`` the returned Ebar is NaN.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        vocab_start: int,
        temperature: float,
        group: Any,
        chunk_rows: int,
        tile_rows: int,
        want_ebar: bool,
    ) -> TokenStats:
        v_local = logits.shape[-1]
        lead = logits.shape[:-1]
        n_tok = tokens.numel()
        ct = _compute_dtype(logits)
        dev = logits.device
        distributed = _group_size(group) > 1
        flat_tokens = tokens.reshape(-1).long()

        out = StatBuffers(n_tok, ct, dev)

        # Two tile workspaces reused by every tile: fresh allocations of this size
        # cost page faults on CPU (allocator churn on GPU), and small tiles stay in cache.
        ws_rows = max(1, min(tile_rows, n_tok))
        work_w = torch.empty(ws_rows, v_local, dtype=ct, device=dev)  # w = z - m, then e w, e^2 w
        work_e = torch.empty_like(work_w)  # e = exp(w), then e^2
        # Without communication there is one chunk (each tile's max is taken in cache).
        chunk_rows = chunk_rows if distributed else max(n_tok, 1)
        blocks = _row_blocks(logits)

        for c0 in range(0, n_tok, chunk_rows):
            n = min(chunk_rows, n_tok - c0)
            tiles = [
                (p0 - c0 + t0, piece[t0 : t0 + tile_rows])
                for p0, piece in _pieces(blocks, c0, c0 + n)
                for t0 in range(0, piece.shape[0], tile_rows)
            ]  # (row offset within the chunk, [k, V_local] view)
            rows = slice(c0, c0 + n)
            out.store(rows, chunk_stats(
                tiles, flat_tokens[rows], vocab_start=vocab_start, temperature=temperature, group=group,
                work_w=work_w, work_e=work_e, ebar=want_ebar,
            ))

        del work_w, work_e
        out.finish(flat_tokens)

        ctx.save_for_backward(logits, flat_tokens, out.lse, out.entropy)
        ctx.vocab_start = vocab_start
        ctx.temperature = temperature
        ctx.tile_rows = tile_rows
        ebar = out.ebar.view(lead)
        ctx.mark_non_differentiable(ebar)  # the returned object itself must be marked
        ctx.set_materialize_grads(False)
        return out.logp.view(lead), out.entropy.view(lead), ebar

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, _grad_ebar: Any
    ) -> tuple[torch.Tensor | None, None, None, None, None, None, None, None]:
        none7 = (None,) * 7
        logits, flat_tokens, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None, *none7)
        v_local = logits.shape[-1]
        ct = lse.dtype
        tile_rows = ctx.tile_rows
        coef, const, target = grad_coefficients(grad_logp, grad_entropy, flat_tokens, entropy, ctx.temperature)

        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        grad_flat = grad.view(-1, v_local)
        in_place = grad.dtype == ct  # fp32 logits: work directly in the output rows
        ws_rows = max(1, min(tile_rows, lse.numel()))
        work_a = None if in_place else torch.empty(ws_rows, v_local, dtype=ct, device=logits.device)
        work_p = torch.empty(ws_rows, v_local, dtype=ct, device=logits.device)

        for t0, tile in _chunks(_row_blocks(logits), tile_rows):
            k = tile.shape[0]
            sl = slice(t0, t0 + k)
            a = grad_flat[sl] if in_place else work_a[:k]  # type: ignore[index]
            tile_grad(
                tile, a, work_p, flat_tokens[sl], lse[sl], coef[sl], const[sl], target[sl],
                vocab_start=ctx.vocab_start, temperature=ctx.temperature,
            )
            if not in_place:
                grad_flat[sl].copy_(a)
        return (grad, *none7)


# ---------------------------------------------------------------------------- public API
def vocab_parallel_token_stats(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    *,
    vocab_start: int,
    temperature: float = 1.0,
    group: Any = None,
    chunk_tokens: int = 4096,
    workspace_bytes: int | None = None,
    ebar: bool = True,
) -> TokenStats:
    """Per-token ``(logp, entropy, ebar)`` from this rank's vocabulary slice of the logits.

    Args:
        logits_shard: ``[..., V_local]`` logits of the global vocabulary ids
            ``[vocab_start, vocab_start + V_local)`` (any float dtype, e.g. bf16;
            any strides, e.g. ``logits[:, :-1]``, which is never copied).
            Gradients flow into it.
        tokens: ``[...]`` integer global token ids (the sampled tokens); a
            negative id is ignored (``logp = 0``, no gradient).
        vocab_start: first global id of this shard (Megatron:
            ``tp_rank * V_local``). Must be 0 without a group.
        temperature: sampling temperature ``T > 0``; statistics are those of
            ``softmax(logits / T)``.
        group: TP process group over which the vocabulary is split; ``None`` or
            a group of size 1 means this shard is the whole vocabulary. Every
            rank of the group must call with the same ``tokens`` and
            ``chunk_tokens`` (shard widths may differ).
        chunk_tokens: token positions per chunk; each chunk costs two
            all-reduces of ``O(chunk_tokens)`` elements (none without a group).
        workspace_bytes: size of each of the two compute-dtype tile workspaces
            the local passes run in (``None``: 4 MiB on CPU, cache-sized; 64 MiB
            on GPU). A tile holds ``max(1, workspace_bytes // (4 V_local))``
            token rows.
        ebar: compute ``Ebar`` (``False``: it is returned as NaN and its two
            per-element passes are skipped).
    Returns:
        ``(logp, entropy, ebar)``, each ``[...]`` in the compute dtype (fp32, or
        fp64 for fp64 logits), in nats: ``logp = log pi(token)``,
        ``entropy = -sum_a pi_a log pi_a``, ``ebar = sum_a pi_a^2 (log pi_a + H)``
        (detached). ``logp`` and ``entropy`` have exact gradients (module doc).

    Memory: beyond its outputs the forward holds the two tile workspaces plus
    ``O(chunk_tokens)`` per-token scalars -- independent of the vocabulary
    size and the number of tokens; the backward additionally writes the
    gradient (the logits' shape and dtype). With one shard the result equals
    :func:`nemo_gdro.algorithms.token_stats.full_vocab_token_stats` up to rounding.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_shard.dim() < 1 or logits_shard.shape[-1] < 1:
        raise ValueError(f"logits_shard must be [..., V_local] with V_local >= 1, got {tuple(logits_shard.shape)}")
    if not logits_shard.is_floating_point():
        raise ValueError(f"logits_shard must be floating point, got {logits_shard.dtype}")
    if tokens.shape != logits_shard.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits_shard.shape[:-1])}, got {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if workspace_bytes is not None and workspace_bytes < 1:
        raise ValueError(f"workspace_bytes must be >= 1 or None, got {workspace_bytes}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if _group_size(group) == 1 and vocab_start != 0:
        raise ValueError(f"a single shard covers the whole vocabulary: vocab_start must be 0, got {vocab_start}")
    tile_rows = _tile_rows(workspace_bytes, logits_shard.shape[-1], _compute_dtype(logits_shard), logits_shard.device)
    return _VocabParallelTokenStats.apply(
        logits_shard,
        tokens.to(logits_shard.device),
        int(vocab_start),
        float(temperature),
        group,
        int(chunk_tokens),
        tile_rows,
        bool(ebar),
    )


def make_token_stats_fn(
    group: Any = None, *, chunk_tokens: int = 4096, workspace_bytes: int | None = None, ebar: bool = True
) -> Callable[[torch.Tensor, torch.Tensor, float], TokenStats]:
    """A :data:`nemo_gdro.trainer.actor.TokenStatsFn` over Megatron's vocabulary-parallel logits.

    Args:
        group: the TP process group; ``None`` takes Megatron's tensor-model-
            parallel group and rank (the parallel state must then be initialised).
        chunk_tokens, workspace_bytes, ebar: see :func:`vocab_parallel_token_stats`.
    Returns:
        ``fn(logits [..., V_local], tokens [...], temperature) -> (logp, entropy, ebar)``
        (the actor calls it with ``logits[:, :-1]`` of a micro-batch and
        ``tokens[:, 1:]``), where this rank's shard starts where Megatron puts
        it: ``VocabUtility.vocab_range_from_per_partition_vocab_size(V_local,
        tp_rank, tp_size)``, i.e. ``tp_rank * V_local`` (equal shards, as
        Megatron pads the vocabulary to a multiple of the TP size). The padded
        ids' logits take part in the softmax, as in Megatron's own
        vocab-parallel cross-entropy.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.utils import VocabUtility

    if group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    else:
        tp_group, tp_rank, tp_size = group, dist.get_rank(group), dist.get_world_size(group)

    def token_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> TokenStats:
        start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(logits.shape[-1], tp_rank, tp_size)
        return vocab_parallel_token_stats(
            logits,
            tokens,
            vocab_start=start,
            temperature=temperature,
            group=tp_group if tp_size > 1 else None,
            chunk_tokens=chunk_tokens,
            workspace_bytes=workspace_bytes,
            ebar=ebar,
        )

    return token_stats
