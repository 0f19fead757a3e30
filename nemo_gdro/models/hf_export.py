"""Stream a Megatron ``GPTModel``'s weights out as full Hugging Face tensors, one at a time.

:func:`iter_hf_tensors` walks the model's tensors in HF order (embedding,
layers 0..L-1, final norm, lm_head). For each Megatron tensor the pipeline
stage that holds it gathers its TP shards (one all-gather over the TP group),
then the full tensor goes to its receivers: every rank of the model-parallel
group (one broadcast over the PP group) or only a destination rank (one
point-to-point send); fused qkv and gate/up are split into HF's q/k/v and
gate/up. Peak extra memory is about one full tensor, never the model.

The same stream feeds :func:`nemo_gdro.models.hf_save.save_hf_checkpoint`
(rank 0 writes shards as tensors arrive) and a rollout engine's
``load_weights`` (every rank receives every full tensor, as vLLM's per-parameter
loaders expect).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist

from nemo_gdro.models.gpt import GPTSpec
from nemo_gdro.models.hf_mapping import (
    OUTPUT_LAYER,
    TensorMap,
    check_architecture,
    hf_shapes,
    megatron_shape,
    merge_tp_shards,
    split_to_hf,
    tensor_maps,
)
from nemo_gdro.models.model_layout import (
    ModelLayout,
    check_partition,
    global_param_names,
    model_layout,
    unwrap,
)

__all__ = ["iter_hf_tensors"]


def _gather_tp(tm: TensorMap, shard: torch.Tensor, layout: ModelLayout) -> torch.Tensor:
    """The full tensor from this stage's TP shards (on every TP rank of the stage)."""
    if layout.tp_size == 1 or tm.tp_dim is None:
        return shard
    shards = [torch.empty_like(shard) for _ in range(layout.tp_size)]
    dist.all_gather(shards, shard.contiguous(), group=layout.tp_group)
    return merge_tp_shards(tm, shards)


def _coordinates(layout: ModelLayout) -> dict[tuple[int, int], int]:
    """(tp_rank, pp_rank) -> global rank, for this rank's model-parallel group (one small all-gather)."""
    if not layout.distributed:
        return {(0, 0): layout.mp_ranks[0]}
    coords: list[Any] = [None] * len(layout.mp_ranks)
    dist.all_gather_object(coords, (layout.tp_rank, layout.pp_rank, dist.get_rank()), group=layout.mp_group)
    return {(tp, pp): rank for tp, pp, rank in coords}


@torch.no_grad()
def iter_hf_tensors(
    model: torch.nn.Module,
    spec: GPTSpec,
    *,
    dst: int | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield ``(hf_name, full_tensor)`` for every HF tensor of ``model``, one at a time, in HF order.

    Collective: every rank of the model-parallel (TP x PP) group must iterate
    the stream to the end, in step (each item involves collectives). Other
    data-parallel replicas need not take part.

    Args:
        model: Megatron ``GPTModel`` (possibly DDP-wrapped) built for ``spec``.
        spec: the architecture.
        dst: ``None``: every rank of the group receives every full tensor;
            a global rank of this rank's model-parallel group: only that rank
            receives, the others get ``(hf_name, None)`` (same names, same order).
        dtype: cast to this dtype before communication (default: the model's).
    Yields:
        ``(hf_name, tensor)``: a fresh contiguous tensor of the full HF shape
        on the model's device (the caller may keep it while training
        continues), or ``None`` on a rank that does not receive. With tied
        embeddings there is no ``lm_head.weight`` (HF ties it on load).
    """
    check_architecture(spec)
    module = unwrap(model)
    layout = model_layout(module)
    names = global_param_names(module)
    local = {
        names[n]: p
        for n, p in module.named_parameters()
        # The last stage's copy of a tied embedding (kept equal by Megatron) is not exported.
        if not (spec.tie_word_embeddings and names[n] == OUTPUT_LAYER)
    }
    if dst is not None and dst not in layout.mp_ranks:
        raise ValueError(f"dst={dst} is not a rank of this model-parallel group {list(layout.mp_ranks)}")
    first_param = next(iter(local.values()))
    out_dtype = dtype or first_param.dtype
    device = first_param.device
    if layout.pp_size > 1:
        held: list[Any] = [None] * layout.pp_size
        dist.all_gather_object(held, sorted(local), group=layout.pp_group)
        owner = {name: stage for stage, stage_names in enumerate(held) for name in stage_names}
    else:
        owner = {name: 0 for name in local}
    coords = _coordinates(layout) if dst is not None else {}
    me = dist.get_rank() if layout.distributed else layout.mp_ranks[0]
    dst_tp = next((tp for (tp, _), r in coords.items() if r == dst), 0)
    shapes = hf_shapes(spec)

    for tm in tensor_maps(spec):
        if tm.megatron not in owner:
            raise KeyError(f"no pipeline stage holds Megatron parameter {tm.megatron!r} (needed for {list(tm.hf)})")
        stage = owner[tm.megatron]
        full: torch.Tensor | None = None
        if stage == layout.pp_rank:
            param = local[tm.megatron]
            check_partition(tm.megatron, param, tm.tp_dim, layout.tp_size)
            full = _gather_tp(tm, param.detach().to(out_dtype), layout)
        shape = megatron_shape(tm, shapes)
        if dst is None:
            if layout.pp_size > 1:
                src = layout.pp_ranks[stage]
                buf = full.contiguous() if me == src else torch.empty(shape, dtype=out_dtype, device=device)
                dist.broadcast(buf, src=src, group=layout.pp_group)
                full = buf
        else:
            # The owner stage's rank on dst's TP coordinate sends (every TP rank of that stage has it).
            sender = coords[(dst_tp, stage)]
            if me == sender and me != dst:
                dist.send(full.contiguous(), dst=dst)
            elif me == dst and me != sender:
                full = torch.empty(shape, dtype=out_dtype, device=device)
                dist.recv(full, src=sender)
            if me != dst:
                full = None
        if full is None:
            for hf_name in tm.hf:
                yield hf_name, None
        else:
            yield from split_to_hf(tm, full, spec)
