"""The HF <-> Megatron tensor table of a :class:`~nemo_gdro.models.spec.GPTSpec`, without torch.

Which HF tensors (names, shapes) a Qwen3 / Qwen2 / Llama model of a given
spec has, and which Megatron tensor each one feeds (see
:mod:`nemo_gdro.models.hf_mapping` for the fused layouts and the transforms).
Importing this module costs nothing heavy, so the checks made before torch is
imported (:mod:`nemo_gdro.models.hf_preflight`) read the same table as the
weight loader and the exporters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from nemo_gdro.models.spec import GPTSpec

__all__ = [
    "HF_CLASS_NAMES",
    "EMBEDDING",
    "OUTPUT_LAYER",
    "TE_FUSED_NORMS",
    "canonical_megatron_name",
    "check_architecture",
    "TensorMap",
    "tensor_maps",
    "hf_key_names",
    "hf_shapes",
    "megatron_shape",
]

#: ``GPTSpec.hf_architecture`` -> the ``architectures`` entry of ``config.json``.
HF_CLASS_NAMES: dict[str, str] = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"

#: Transformer Engine layer-spec name (inside ``decoder.layers.N.``) -> local-spec name.
#: TE's ``LayerNormColumnParallelLinear`` holds the norm that precedes the linear layer.
TE_FUSED_NORMS: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_PREFIX = "decoder.layers."


def canonical_megatron_name(name: str) -> str:
    """A Megatron parameter name in local-layer-spec terms (TE's fused norm names mapped back).

    ``decoder.layers.3.self_attention.linear_qkv.layer_norm_weight`` ->
    ``decoder.layers.3.input_layernorm.weight``; every other name is returned
    unchanged (both specs name the remaining tensors alike).
    """
    if not name.startswith(_LAYER_PREFIX):
        return name
    parts = name.split(".", 3)
    if len(parts) < 4:
        return name
    local = TE_FUSED_NORMS.get(parts[3])
    return name if local is None else ".".join(parts[:3]) + "." + local


def check_architecture(spec: GPTSpec) -> None:
    """Fail if ``spec`` has no layout in its ``hf_architecture`` (bias / q-k norm combination)."""
    if spec.hf_architecture == "qwen3":
        if spec.qkv_bias:
            # Qwen3's attention_bias also adds an o_proj bias, which Megatron's add_qkv_bias lacks.
            raise ValueError("model.qkv_bias=True has no Qwen3 layout (attention_bias also biases o_proj); use qwen2")
        if not spec.qk_layernorm:
            raise ValueError("Qwen3 layout needs model.qk_layernorm=True")
    elif spec.hf_architecture == "qwen2":
        if not spec.qkv_bias or spec.qk_layernorm:
            raise ValueError("Qwen2 layout needs model.qkv_bias=True and model.qk_layernorm=False")
    elif spec.qkv_bias or spec.qk_layernorm:
        raise ValueError("Llama layout needs model.qkv_bias=False and model.qk_layernorm=False")


# ---------------------------------------------------------------------------- the tensor table
@dataclass(frozen=True)
class TensorMap:
    """One tensor of the full (TP = PP = 1) Megatron model and its HF counterpart(s).

    Attributes:
        megatron: Megatron parameter name with the global layer number.
        hf: HF tensor names: one for ``copy``, ``(q, k, v)`` for ``qkv``,
            ``(gate, up)`` for ``glu``.
        kind: how the Megatron tensor is built from the HF ones.
        tp_dim: dimension Megatron splits over TP ranks, ``None`` if replicated.
        layer: global layer index, ``None`` for the embedding, final norm and output layer.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: Literal["copy", "qkv", "glu"]
    tp_dim: int | None
    layer: int | None = None


def tensor_maps(spec: GPTSpec) -> list[TensorMap]:
    """Every Megatron tensor of ``spec`` in model order: embedding, layers 0..L-1, final norm, output layer.

    With tied embeddings there is no output layer entry (HF ties
    ``lm_head`` to ``model.embed_tokens`` on load; a last pipeline stage's
    copy is loaded from the embedding).
    """
    check_architecture(spec)
    maps = [TensorMap(EMBEDDING, ("model.embed_tokens.weight",), "copy", 0)]
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = f"{h}self_attn."
        maps.append(TensorMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy", None, i))
        maps.append(
            TensorMap(
                m + "self_attention.linear_qkv.weight",
                tuple(f"{attn}{p}_proj.weight" for p in "qkv"),
                "qkv",
                0,
                i,
            )
        )
        if spec.qkv_bias:
            maps.append(
                TensorMap(
                    m + "self_attention.linear_qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv", 0, i
                )
            )
        if spec.qk_layernorm:
            maps.append(TensorMap(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "copy", None, i))
            maps.append(TensorMap(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "copy", None, i))
        maps.append(TensorMap(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy", 1, i))
        maps.append(
            TensorMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy", None, i)
        )
        maps.append(
            TensorMap(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "glu", 0, i)
        )
        maps.append(TensorMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy", 1, i))
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None))
    if not spec.tie_word_embeddings:
        maps.append(TensorMap(OUTPUT_LAYER, ("lm_head.weight",), "copy", 0))
    return maps


def hf_key_names(spec: GPTSpec) -> list[str]:
    """All HF tensor names of ``spec`` in export (stream) order."""
    return [name for tm in tensor_maps(spec) for name in tm.hf]


def hf_shapes(spec: GPTSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor of ``spec`` (export order)."""
    h, f, v, d = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size, spec.kv_channels
    nq, nkv = spec.num_attention_heads * d, spec.num_query_groups * d
    # Keyed by the Megatron name without the ``decoder.layers.N.`` prefix.
    by_suffix: dict[str, list[tuple[int, ...]]] = {
        EMBEDDING: [(v, h)],
        OUTPUT_LAYER: [(v, h)],
        "decoder.final_layernorm.weight": [(h,)],
        "input_layernorm.weight": [(h,)],
        "pre_mlp_layernorm.weight": [(h,)],
        "self_attention.linear_qkv.weight": [(nq, h), (nkv, h), (nkv, h)],
        "self_attention.linear_qkv.bias": [(nq,), (nkv,), (nkv,)],
        "self_attention.q_layernorm.weight": [(d,)],
        "self_attention.k_layernorm.weight": [(d,)],
        "self_attention.linear_proj.weight": [(h, nq)],
        "mlp.linear_fc1.weight": [(f, h), (f, h)],
        "mlp.linear_fc2.weight": [(h, f)],
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for tm in tensor_maps(spec):
        key = tm.megatron.split(".", 3)[3] if tm.layer is not None else tm.megatron
        shapes.update(zip(tm.hf, by_suffix[key], strict=True))
    return shapes


def megatron_shape(tm: TensorMap, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the full Megatron tensor ``tm`` given its HF sources' ``shapes``."""
    parts = [shapes[name] for name in tm.hf]
    if tm.kind == "copy":
        return tuple(parts[0])
    return (sum(p[0] for p in parts), *parts[0][1:])
