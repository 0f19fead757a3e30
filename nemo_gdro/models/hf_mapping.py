"""Megatron GPT (any TP/PP layout) <-> Hugging Face Qwen3 / Qwen2 / Llama weight layout.

Megatron fuses two pairs of projections that HF keeps separate:

* ``self_attention.linear_qkv.weight`` ``[(n_q + 2 n_kv) d, h]`` is laid out
  per query group: for group ``g`` (``0 <= g < n_kv``) the rows are the
  ``r = n_q / n_kv`` query heads of that group, then its key head, then its
  value head (``[q_g0 .. q_g(r-1), k_g, v_g]``, each ``d`` rows). HF's
  ``q_proj`` holds query head ``j`` at rows ``j d .. (j+1) d`` and query head
  ``j`` attends with key/value head ``j // r`` -- the same grouping. The
  optional qkv bias ``[(n_q + 2 n_kv) d]`` follows the same layout.
* ``mlp.linear_fc1.weight`` ``[2 f, h]`` is ``[gate; up]`` (megatron's GLU
  applies the activation to the first half).

The remaining tensors map one to one. Names are those of Megatron's local
layer spec; Transformer Engine's spec fuses the input norm into
``linear_qkv`` and the pre-MLP norm into ``linear_fc1`` (``layer_norm_weight``
of those modules), which :func:`canonical_megatron_name` maps back, so both
layer specs share the table. :func:`tensor_maps` lists every
Megatron tensor of the TP = PP = 1 model ("full", global layer numbers) with
its HF sources, its kind (``copy`` / ``qkv`` / ``glu``) and the dimension
Megatron splits it along over TP; every conversion in this package (live
import and export, safetensors loading, the offline merge of saved shards)
is driven by that one table.

Tensor and pipeline parallelism
-------------------------------
A pipeline stage holds the layers ``layer_number - 1`` of its
``TransformerLayer``s (local names ``decoder.layers.0..``), the first stage
the embedding, the last the final norm and output layer (with tied
embeddings, a copy of the embedding kept equal by Megatron's embedding-group
all-reduce). The vocab-parallel embedding and output layer and the
column-parallel qkv/fc1 split dim 0, the row-parallel proj/fc2 dim 1; norms
are replicated. Two consequences of the fused layouts:

* qkv: every rank holds whole query groups in order (Megatron requires
  ``n_kv % tp == 0``), so the full fused tensor is the concatenation of the
  shards, and rank ``k``'s shard is the fusion of contiguous row ranges of
  ``q``, ``k`` and ``v``;
* fc1: rank ``k`` holds ``[gate_k; up_k]``, so the full ``[gate; up]`` is
  ``[gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}]``.

``spec.vocab_size`` is the (padded, TP-divisible) embedding size, so the
vocab shards concatenate to exactly ``vocab_size`` rows: there are no extra
padding rows to strip.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from nemo_gdro._optional import import_optional
from nemo_gdro.models.gpt import GPTSpec

# The tensor table itself is torch-free (checked before torch is imported); re-exported here.
from nemo_gdro.models.hf_table import (
    EMBEDDING,
    HF_CLASS_NAMES,
    OUTPUT_LAYER,
    TE_FUSED_NORMS,
    TensorMap,
    canonical_megatron_name,
    check_architecture,
    hf_key_names,
    hf_shapes,
    megatron_shape,
    tensor_maps,
)

__all__ = [
    "HF_CLASS_NAMES",
    "TE_FUSED_NORMS",
    "canonical_megatron_name",
    "TensorMap",
    "tensor_maps",
    "hf_key_names",
    "hf_shapes",
    "megatron_shape",
    "split_to_hf",
    "fuse_from_hf",
    "shard_bounds",
    "fuse_shard",
    "merge_tp_shards",
    "check_architecture",
    "hf_config",
    "export_to_hf",
    "import_from_hf",
]


def _transformers() -> Any:
    return import_optional("transformers", "hf", "the Hugging Face mapping")


def hf_config(spec: GPTSpec, torch_dtype: torch.dtype = torch.float32) -> Any:
    """``transformers`` ``Qwen3Config`` / ``Qwen2Config`` / ``LlamaConfig`` describing ``spec``.

    ``architectures`` is set, so the config saved as ``config.json`` loads
    with ``AutoModelForCausalLM``.
    """
    check_architecture(spec)
    transformers = _transformers()
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=float(spec.rotary_base),
        rms_norm_eps=spec.norm_epsilon,
        tie_word_embeddings=spec.tie_word_embeddings,
        hidden_act="silu",
        attention_dropout=0.0,
        architectures=[HF_CLASS_NAMES[spec.hf_architecture]],
    )
    # transformers >= 4.56 calls it ``dtype`` and warns about ``torch_dtype``.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    common["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype
    if spec.hf_architecture == "qwen3":
        return transformers.Qwen3Config(
            head_dim=spec.kv_channels, attention_bias=False, use_sliding_window=False, **common
        )
    if spec.hf_architecture == "llama":
        return transformers.LlamaConfig(head_dim=spec.kv_channels, attention_bias=False, mlp_bias=False, **common)
    if spec.kv_channels != spec.hidden_size // spec.num_attention_heads:
        raise ValueError("Qwen2 derives head_dim from hidden_size / num_attention_heads; model.head_dim must match")
    return transformers.Qwen2Config(use_sliding_window=False, **common)


# ---------------------------------------------------------------------------- pure transforms
def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, spec: GPTSpec) -> torch.Tensor:
    """HF ``q [groups r d, ...]``, ``k, v [groups d, ...]`` -> Megatron's per-group ``[q.., k, v]`` rows."""
    d, r = spec.kv_channels, spec.num_attention_heads // spec.num_query_groups
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(groups, r, d, *rest), k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)], dim=1
    )
    return grouped.reshape(groups * (r + 2) * d, *rest)


def _split_qkv(qkv: torch.Tensor, spec: GPTSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_fuse_qkv` for the full tensor."""
    g, d = spec.num_query_groups, spec.kv_channels
    r = spec.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, r + 2, d, *rest)
    q = grouped[:, :r].reshape(g * r * d, *rest)
    k = grouped[:, r].reshape(g * d, *rest)
    v = grouped[:, r + 1].reshape(g * d, *rest)
    return q, k, v


def split_to_hf(tm: TensorMap, full: torch.Tensor, spec: GPTSpec) -> list[tuple[str, torch.Tensor]]:
    """Full Megatron tensor -> its HF tensors, as fresh contiguous copies (callers may keep them)."""
    if tm.kind == "copy":
        parts: Sequence[torch.Tensor] = (full,)
    elif tm.kind == "qkv":
        parts = _split_qkv(full, spec)
    else:
        parts = full.chunk(2, dim=0)
    return [(name, part.contiguous().clone()) for name, part in zip(tm.hf, parts, strict=True)]


def fuse_from_hf(tm: TensorMap, parts: Sequence[torch.Tensor], spec: GPTSpec) -> torch.Tensor:
    """HF tensors (in ``tm.hf`` order) -> the full Megatron tensor (inverse of :func:`split_to_hf`)."""
    return fuse_shard(tm, parts, spec, tp_size=1)


def shard_bounds(
    tm: TensorMap, spec: GPTSpec, tp_rank: int, tp_size: int
) -> list[tuple[int, int, int] | None]:
    """What TP rank ``tp_rank`` needs of each HF source of ``tm``: ``(dim, start, stop)`` or ``None`` (all).

    Reading these slices and :func:`fuse_shard` gives the rank's Megatron
    shard without materialising the full tensor. Raises ``ValueError``
    naming the tensor when the split dimension is not divisible by ``tp_size``.
    """
    if tm.tp_dim is None or tp_size == 1:
        return [None] * len(tm.hf)
    shapes = hf_shapes(spec)

    def rows(name: str, size: int) -> tuple[int, int, int]:
        if size % tp_size != 0:
            raise ValueError(
                f"HF tensor {name!r}: dim {tm.tp_dim} of size {size} is not divisible by tensor_parallel={tp_size}"
            )
        n = size // tp_size
        return (tm.tp_dim, tp_rank * n, (tp_rank + 1) * n)  # type: ignore[return-value]

    if tm.kind == "qkv" and spec.num_query_groups % tp_size != 0:
        raise ValueError(
            f"{tm.megatron!r}: num_query_groups={spec.num_query_groups} is not divisible by tensor_parallel={tp_size}"
        )
    # qkv: whole query groups per rank, i.e. contiguous row ranges of q, k and v alike.
    return [rows(name, shapes[name][tm.tp_dim]) for name in tm.hf]


def fuse_shard(tm: TensorMap, parts: Sequence[torch.Tensor], spec: GPTSpec, tp_size: int) -> torch.Tensor:
    """A TP rank's Megatron shard from its slices of the HF sources (see :func:`shard_bounds`)."""
    if tm.kind == "copy":
        return parts[0]
    if tm.kind == "qkv":
        groups = spec.num_query_groups // (tp_size if tm.tp_dim is not None else 1)
        return _fuse_qkv(parts[0], parts[1], parts[2], groups, spec)
    return torch.cat(list(parts), dim=0)


def merge_tp_shards(tm: TensorMap, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full Megatron tensor from its TP shards in rank order (inverse of the split).

    Column/row-parallel tensors concatenate along ``tm.tp_dim`` (qkv needs no
    regrouping: each rank holds whole groups in order); fc1's per-rank
    ``[gate_k; up_k]`` become ``[gate_0 .. gate_{n-1}; up_0 .. up_{n-1}]``;
    replicated tensors come from rank 0.
    """
    if tm.tp_dim is None or len(shards) == 1:
        return shards[0]
    if tm.kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=tm.tp_dim)


# ---------------------------------------------------------------------------- whole-model helpers
def export_to_hf(model: torch.nn.Module, spec: GPTSpec) -> dict[str, torch.Tensor]:
    """Megatron ``GPTModel`` (possibly DDP-wrapped, any TP/PP layout) -> full HF state dict, on every rank.

    ``dict`` of :func:`nemo_gdro.models.hf_export.iter_hf_tensors`: collective
    over the model-parallel (TP x PP) group; detached copies in the model's
    dtype and device. With tied embeddings there is no ``lm_head.weight``.
    """
    from nemo_gdro.models.hf_export import iter_hf_tensors  # that module builds on this one

    return dict(iter_hf_tensors(model, spec))


def import_from_hf(model: torch.nn.Module, spec: GPTSpec, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a full HF state dict into a Megatron ``GPTModel`` in place (any TP/PP layout).

    Every rank passes the same full state dict and takes its own shard (see
    :func:`nemo_gdro.models.hf_weights.load_hf_weights`, which also reads a
    safetensors directory without materialising the model). Raises
    ``KeyError`` naming missing or unexpected keys and ``ValueError`` naming
    a key whose shape does not match ``spec``.
    """
    from nemo_gdro.models.hf_weights import load_hf_weights  # that module builds on this one

    load_hf_weights(model, spec, hf_state_dict)
