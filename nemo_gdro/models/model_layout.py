"""Where a rank's shard of a Megatron ``GPTModel`` sits in the TP x PP layout.

Shared by the live HF import (:mod:`nemo_gdro.models.hf_weights`) and export
(:mod:`nemo_gdro.models.hf_export`): the TP/PP sizes, ranks and groups of the
model, and the map from a stage's local parameter names (``decoder.layers.0..``)
to the names of the TP = PP = 1 model (global layer numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ModelLayout", "model_layout", "global_param_names", "unwrap", "check_partition"]


@dataclass(frozen=True)
class ModelLayout:
    """The parallel layout of one rank's model shard.

    Attributes:
        tp_size, tp_rank, tp_group: tensor parallelism (group ``None`` when ``tp_size == 1``).
        pp_size, pp_rank, pp_group: pipeline parallelism (group ``None`` when ``pp_size == 1``).
        pp_ranks: global ranks of this rank's pipeline group, in stage order
            (``(rank,)`` without PP).
        mp_ranks: global ranks of this rank's model-parallel (TP x PP) group.
    """

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Any = None
    pp_ranks: tuple[int, ...] = (0,)
    mp_ranks: tuple[int, ...] = (0,)
    mp_group: Any = field(default=None, compare=False)

    @property
    def distributed(self) -> bool:
        """Whether the model spans several ranks (collectives needed)."""
        return self.tp_size * self.pp_size > 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/Float16Module wrappers (anything with a ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_layout(model: torch.nn.Module) -> ModelLayout:
    """The parallel layout of ``model`` (TP = PP = 1 when Megatron's state is not initialised).

    The model's own config records the layout it was built for; a parallel
    state that disagrees (e.g. a TP=1 model under TP=2) cannot be mapped
    because the local parameters are not the shards the state implies.
    """
    from megatron.core import parallel_state

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not parallel_state.model_parallel_is_initialized():
        return ModelLayout(pp_ranks=(rank,), mp_ranks=(rank,))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = getattr(unwrap(model), "config", None)
    built_tp = getattr(config, "tensor_model_parallel_size", tp)
    built_pp = getattr(config, "pipeline_model_parallel_size", pp)
    if (built_tp, built_pp) != (tp, pp):
        raise NotImplementedError(
            f"the model was built for tensor_parallel={built_tp}, pipeline_parallel={built_pp} but the parallel "
            f"state has tp={tp}, pp={pp}; re-sharding a model to another layout is not supported"
        )
    if tp == 1 and pp == 1:
        return ModelLayout(pp_ranks=(rank,), mp_ranks=(rank,))
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    mp_group = parallel_state.get_model_parallel_group()
    return ModelLayout(
        tp_size=tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
        pp_size=pp,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_group=pp_group if pp > 1 else None,
        pp_ranks=tuple(dist.get_process_group_ranks(pp_group)) if pp > 1 else (rank,),
        mp_ranks=tuple(dist.get_process_group_ranks(mp_group)),
        mp_group=mp_group,
    )


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> name in the TP = PP = 1 model (global layer numbers, local-spec names).

    A pipeline stage numbers its layers ``decoder.layers.0..`` locally; each
    ``TransformerLayer`` knows its 1-based global ``layer_number``. Transformer
    Engine's fused norm names become the local spec's
    (:func:`~nemo_gdro.models.hf_mapping.canonical_megatron_name`).
    """
    from nemo_gdro.models.hf_mapping import canonical_megatron_name

    model = unwrap(model)
    prefix_map = {
        f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
        for i, layer in enumerate(model.decoder.layers)
    }
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        out[name] = name
        if name.startswith("decoder.layers."):
            local_prefix = ".".join(name.split(".")[:3]) + "."
            out[name] = prefix_map[local_prefix] + name[len(local_prefix) :]
        out[name] = canonical_megatron_name(out[name])
    return out


def check_partition(name: str, param: torch.Tensor, expected_dim: int | None, tp_size: int) -> None:
    """Fail if Megatron split ``param`` over TP differently from what the HF mapping assumes.

    The mapping's partition dims are a name-based table (the offline shard
    merge has no model to ask); this guards against a layer spec that splits
    a tensor otherwise.
    """
    if tp_size == 1:
        return
    actual = int(param.partition_dim) if getattr(param, "tensor_model_parallel", False) else None
    if actual != expected_dim:
        raise NotImplementedError(
            f"Megatron parameter {name!r} is split over TP along dim {actual}, but the HF mapping expects "
            f"{expected_dim}; this layer spec is not supported"
        )
