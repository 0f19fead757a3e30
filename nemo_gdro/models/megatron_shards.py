"""Offline: the full HF state dict from saved per-rank Megatron model shards (no Megatron, no process group).

For ``nemo-gdro export <checkpoint> <out_dir>``: each TP x PP rank saved its
``GPTModel.state_dict()`` (local layer names ``decoder.layers.0..``; the
``_extra_state`` entries may be present or absent; local or Transformer Engine
layer-spec names). Stage ``p`` of ``pp``
holds global layers ``p L/pp .. (p+1) L/pp - 1`` (Megatron's even split, the
only one :func:`nemo_gdro.models.gpt.build_gpt` makes); TP shards are merged
along each tensor's partition dim (fc1 from the per-rank ``[gate_k; up_k]``)
by the same table as the live export, so both give identical tensors.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from nemo_gdro.models.gpt import GPTSpec
from nemo_gdro.models.hf_mapping import (
    OUTPUT_LAYER,
    canonical_megatron_name,
    hf_shapes,
    megatron_shape,
    merge_tp_shards,
    split_to_hf,
    tensor_maps,
)

__all__ = ["hf_state_dict_from_megatron_shards"]

_LAYOUT_KEYS = ("tp", "pp", "tp_rank", "pp_rank")


def _check_layouts(layouts: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """The (tp, pp) sizes; every (tp_rank, pp_rank) exactly once."""
    if not layouts:
        raise ValueError("no Megatron shards given")
    for i, layout in enumerate(layouts):
        bad = [k for k in _LAYOUT_KEYS if not isinstance(layout.get(k), int) or isinstance(layout.get(k), bool)]
        if bad:
            raise ValueError(f"shard {i}: layout {dict(layout)!r} needs integer keys {list(_LAYOUT_KEYS)} (bad: {bad})")
    tp, pp = layouts[0]["tp"], layouts[0]["pp"]
    seen: dict[tuple[int, int], int] = {}
    for i, layout in enumerate(layouts):
        if (layout["tp"], layout["pp"]) != (tp, pp):
            raise ValueError(
                f"shard {i}: layout tp={layout['tp']}, pp={layout['pp']} differs from shard 0's tp={tp}, pp={pp}"
            )
        coord = (layout["tp_rank"], layout["pp_rank"])
        if not (0 <= coord[0] < tp and 0 <= coord[1] < pp):
            raise ValueError(f"shard {i}: tp_rank={coord[0]}, pp_rank={coord[1]} outside tp={tp}, pp={pp}")
        if coord in seen:
            raise ValueError(f"shards {seen[coord]} and {i} are both tp_rank={coord[0]}, pp_rank={coord[1]}")
        seen[coord] = i
    missing = [(t, p) for p in range(pp) for t in range(tp) if (t, p) not in seen]
    if missing:
        raise ValueError(f"missing shard(s) (tp_rank, pp_rank) {missing} of tp={tp}, pp={pp}")
    return tp, pp


def hf_state_dict_from_megatron_shards(
    spec: GPTSpec, shards: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Merge per-rank Megatron ``state_dict()``s into the full HF state dict of ``spec``.

    Args:
        spec: the architecture the shards were built for.
        shards: ``(layout, model_state_dict)`` per TP x PP rank (any order);
            ``layout`` has integer keys ``tp, pp, tp_rank, pp_rank``.
    Returns:
        HF name -> full tensor (fresh copies, stored dtype), in
        :func:`nemo_gdro.models.hf_mapping.hf_key_names` order. With tied
        embeddings there is no ``lm_head.weight``.
    Raises:
        ValueError: inconsistent or incomplete layouts, a layer index outside
            the stage, a merged shape that does not match ``spec``.
        KeyError: a tensor missing from a shard or not part of ``spec``
            (naming the tensor and the shard).
    """
    tp, pp = _check_layouts([layout for layout, _ in shards])
    if spec.num_layers % pp != 0:
        raise ValueError(f"model.num_layers ({spec.num_layers}) is not divisible by pipeline_parallel ({pp})")
    per_stage = spec.num_layers // pp
    maps = tensor_maps(spec)
    expected = {tm.megatron for tm in maps}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    origin: dict[str, int] = {}  # global name -> pp stage it came from
    for layout, state in shards:
        tp_rank, pp_rank = layout["tp_rank"], layout["pp_rank"]
        where = f"shard tp_rank={tp_rank}, pp_rank={pp_rank}"
        for key, value in state.items():
            if key.endswith("_extra_state"):
                continue
            if spec.tie_word_embeddings and key == OUTPUT_LAYER:
                continue  # the last stage's copy of the tied embedding
            name = key
            if key.startswith("decoder.layers."):
                parts = key.split(".", 3)
                if len(parts) < 4 or not parts[2].isdigit():
                    raise KeyError(f"{where}: tensor {key!r} is not a Megatron layer parameter")
                local = int(parts[2])
                if local >= per_stage:
                    raise ValueError(
                        f"{where}: tensor {key!r} has local layer {local}, but each of pp={pp} stages holds "
                        f"{per_stage} of num_layers={spec.num_layers}"
                    )
                name = canonical_megatron_name(f"decoder.layers.{pp_rank * per_stage + local}.{parts[3]}")
            if name not in expected:
                raise KeyError(f"{where}: tensor {key!r} is not part of the {spec.hf_architecture} spec")
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
            if origin.setdefault(name, pp_rank) != pp_rank:
                raise ValueError(f"{where}: tensor {key!r} is also held by pp_rank={origin[name]}")
            pieces.setdefault(name, {})[tp_rank] = value
    shapes = hf_shapes(spec)
    out: dict[str, torch.Tensor] = {}
    for tm in maps:
        got = pieces.get(tm.megatron, {})
        absent = [r for r in range(tp) if r not in got]
        if absent:
            stage = origin.get(tm.megatron)
            holder = f"pp_rank={stage}" if stage is not None else "any pipeline stage"
            raise KeyError(f"tensor {tm.megatron!r} missing from tp_rank(s) {absent} of {holder}")
        full = merge_tp_shards(tm, [got[r] for r in range(tp)])
        want = megatron_shape(tm, shapes)
        if tuple(full.shape) != want:
            raise ValueError(
                f"tensor {tm.megatron!r}: merged shape {tuple(full.shape)} over tp={tp}, expected {want} for the spec"
            )
        out.update(split_to_hf(tm, full, spec))
    return out
