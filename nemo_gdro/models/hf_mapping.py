"""Megatron GPT (any TP/PP layout) <-> Hugging Face Qwen2/Qwen3 weight layout.

Megatron fuses two pairs of projections that HF keeps separate:

* ``self_attention.linear_qkv.weight`` ``[(n_q + 2 n_kv) d, h]`` is laid out
  per query group: for group ``g`` (``0 <= g < n_kv``) the rows are the
  ``r = n_q / n_kv`` query heads of that group, then its key head, then its
  value head (``[q_g0 .. q_g(r-1), k_g, v_g]``, each ``d`` rows). HF's
  ``q_proj`` holds query head ``j`` at rows ``j d .. (j+1) d`` and query head
  ``j`` attends with key/value head ``j // r`` — the same grouping. The
  optional qkv bias ``[(n_q + 2 n_kv) d]`` follows the same layout.
* ``mlp.linear_fc1.weight`` ``[2 f, h]`` is ``[gate; up]`` (megatron's GLU
  applies the activation to the first half).

The remaining tensors map one to one. Exported tensors are fresh copies
(``clone``), so the caller may keep them while the model trains on.

Tensor and pipeline parallelism
-------------------------------
Both directions go through the TP = PP = 1 Megatron layout ("full", global
layer numbers). A pipeline stage holds the layers ``layer_number - 1`` of its
``TransformerLayer``s (local names ``decoder.layers.0..``), the first stage
the embedding, the last the final norm and output layer (with tied
embeddings, a copy of the embedding kept equal by Megatron's embedding-group
all-reduce). Megatron marks each TP-split parameter (``tensor_model_parallel``,
``partition_dim``): the vocab-parallel embedding and output layer and the
column-parallel qkv/fc1 split dim 0, the row-parallel proj/fc2 dim 1; norms
are replicated. Two consequences of the fused layouts:

* qkv: every rank holds whole query groups in order (Megatron requires
  ``n_kv % tp == 0``), so the full fused tensor is the concatenation of the
  shards and the per-group split above applies unchanged;
* fc1: rank ``k`` holds ``[gate_k; up_k]``, so the full ``[gate; up]`` is
  ``[gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}]``.

``spec.vocab_size`` is the (padded, TP-divisible) embedding size, so the
vocab shards concatenate to exactly ``vocab_size`` rows: there are no extra
padding rows to strip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from nemo_gdro._optional import import_optional
from nemo_gdro.models.gpt import GPTSpec

__all__ = ["hf_config", "export_to_hf", "import_from_hf", "hf_key_names"]


def _transformers() -> Any:
    return import_optional("transformers", "hf", "the Hugging Face mapping")


def _check_architecture(spec: GPTSpec) -> None:
    if spec.hf_architecture == "qwen3" and spec.qkv_bias:
        # Qwen3's attention_bias also adds an o_proj bias, which Megatron's add_qkv_bias lacks.
        raise ValueError("model.qkv_bias=True has no Qwen3 layout (attention_bias also biases o_proj); use qwen2")
    if spec.hf_architecture == "qwen2" and (not spec.qkv_bias or spec.qk_layernorm):
        raise ValueError("Qwen2 layout needs model.qkv_bias=True and model.qk_layernorm=False")


def hf_config(spec: GPTSpec, torch_dtype: torch.dtype = torch.float32) -> Any:
    """``transformers`` ``Qwen3Config``/``Qwen2Config`` describing ``spec``."""
    _check_architecture(spec)
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
        use_sliding_window=False,
    )
    # transformers >= 4.56 calls it ``dtype`` and warns about ``torch_dtype``.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    common["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype
    if spec.hf_architecture == "qwen3":
        return transformers.Qwen3Config(head_dim=spec.kv_channels, attention_bias=False, **common)
    if spec.kv_channels != spec.hidden_size // spec.num_attention_heads:
        raise ValueError("Qwen2 derives head_dim from hidden_size / num_attention_heads; model.head_dim must match")
    return transformers.Qwen2Config(**common)


def _megatron_to_hf_names(spec: GPTSpec) -> dict[str, str]:
    """One-to-one tensors: megatron parameter name -> HF name."""
    names = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
    }
    if not spec.tie_word_embeddings:
        names["output_layer.weight"] = "lm_head.weight"
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        names[m + "input_layernorm.weight"] = h + "input_layernorm.weight"
        names[m + "pre_mlp_layernorm.weight"] = h + "post_attention_layernorm.weight"
        names[m + "self_attention.linear_proj.weight"] = h + "self_attn.o_proj.weight"
        names[m + "mlp.linear_fc2.weight"] = h + "mlp.down_proj.weight"
        if spec.qk_layernorm:
            names[m + "self_attention.q_layernorm.weight"] = h + "self_attn.q_norm.weight"
            names[m + "self_attention.k_layernorm.weight"] = h + "self_attn.k_norm.weight"
    return names


def hf_key_names(spec: GPTSpec) -> list[str]:
    """All HF tensor names of ``spec`` in export order."""
    keys = list(_megatron_to_hf_names(spec).values())
    for i in range(spec.num_layers):
        h = f"model.layers.{i}."
        for p in ("q", "k", "v"):
            keys.append(f"{h}self_attn.{p}_proj.weight")
            if spec.qkv_bias:
                keys.append(f"{h}self_attn.{p}_proj.bias")
        keys += [f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"]
    return keys


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/Float16Module wrappers (anything with a ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


# ---------------------------------------------------------------------------- parallel layout
@dataclass(frozen=True)
class _Layout:
    """Where this rank's shard of the model sits (TP/PP sizes, ranks and groups)."""

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    pp_size: int = 1
    pp_group: Any = None


def _layout(model: torch.nn.Module) -> _Layout:
    """The parallel layout of ``model`` (TP = PP = 1 when Megatron's state is not initialised).

    The model's own config records the layout it was built for; a parallel
    state that disagrees (e.g. a TP=1 model under TP=2) cannot be mapped
    because the local parameters are not the shards the state implies.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return _Layout()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = getattr(model, "config", None)
    built_tp = getattr(config, "tensor_model_parallel_size", tp)
    built_pp = getattr(config, "pipeline_model_parallel_size", pp)
    if (built_tp, built_pp) != (tp, pp):
        raise NotImplementedError(
            f"the model was built for tensor_parallel={built_tp}, pipeline_parallel={built_pp} but the parallel "
            f"state has tp={tp}, pp={pp}; re-sharding a model to another layout is not supported"
        )
    if tp == 1 and pp == 1:
        return _Layout()
    return _Layout(
        tp_size=tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_size=pp,
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
    )


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> name in the TP = PP = 1 model (global layer numbers).

    A pipeline stage numbers its layers ``decoder.layers.0..`` locally; each
    ``TransformerLayer`` knows its 1-based global ``layer_number``.
    """
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
    return out


def _is_glu_fc1(name: str) -> bool:
    # Megatron's column-parallel fc1 of a gated MLP holds [gate_k; up_k] on rank k,
    # so the full [gate; up] is not the plain concatenation of the shards.
    return name.endswith("mlp.linear_fc1.weight")


def _tp_partition_dim(param: torch.Tensor) -> int | None:
    """The dimension along which Megatron split ``param`` over TP ranks, or ``None`` if replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def _gather_tp(name: str, param: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Full (TP = 1) tensor of a parameter from its TP shards (a fresh copy on every TP rank).

    Column-parallel weights (qkv, fc1, output layer) and the vocab-parallel
    embedding are split along dim 0, row-parallel ones (proj, fc2) along dim
    1. The fused qkv needs no regrouping: each rank holds whole query groups
    (``[q.., k, v]`` blocks), in order.
    """
    dim = _tp_partition_dim(param)
    local = param.detach()
    if layout.tp_size == 1 or dim is None:
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(layout.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=layout.tp_group)
    if _is_glu_fc1(name):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _shard_tp(name: str, full: torch.Tensor, param: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """This TP rank's slice of the full tensor ``full`` for ``param`` (inverse of :func:`_gather_tp`)."""
    dim = _tp_partition_dim(param)
    if layout.tp_size == 1 or dim is None:
        return full
    k, n = layout.tp_rank, layout.tp_size
    if _is_glu_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(n, dim=0)[k], up.chunk(n, dim=0)[k]], dim=0)
    if full.shape[dim] % n != 0:
        raise ValueError(f"{name!r}: dim {dim} of size {full.shape[dim]} is not divisible by tensor_parallel={n}")
    return full.chunk(n, dim=dim)[k]


def _all_gather_stages(local: dict[str, torch.Tensor], layout: _Layout) -> dict[str, torch.Tensor]:
    """Union of every pipeline stage's ``local`` dict, on every stage.

    Stage by stage, the source broadcasts the names, shapes and dtypes
    (one small pickled object) and then each tensor over the PP group.
    """
    if layout.pp_size == 1:
        return local
    ranks = dist.get_process_group_ranks(layout.pp_group)
    me = dist.get_rank()
    device = next(iter(local.values())).device if local else torch.device("cpu")
    merged = dict(local)
    for src in ranks:
        meta: list[Any] = [[(k, tuple(v.shape), v.dtype) for k, v in local.items()] if src == me else None]
        dist.broadcast_object_list(meta, src=src, group=layout.pp_group)
        for key, shape, dtype in meta[0]:
            buf = local[key].contiguous() if src == me else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=src, group=layout.pp_group)
            if src != me:
                merged[key] = buf
    return merged


def _split_qkv(qkv: torch.Tensor, spec: GPTSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused qkv ``[(n_q + 2 n_kv) d, ...]`` -> HF ``q [n_q d, ...]``, ``k, v [n_kv d, ...]``."""
    g, d = spec.num_query_groups, spec.kv_channels
    r = spec.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, r + 2, d, *rest)
    q = grouped[:, :r].reshape(g * r * d, *rest)
    k = grouped[:, r].reshape(g * d, *rest)
    v = grouped[:, r + 1].reshape(g * d, *rest)
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: GPTSpec) -> torch.Tensor:
    """Inverse of :func:`_split_qkv`."""
    g, d = spec.num_query_groups, spec.kv_channels
    r = spec.num_attention_heads // g
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(g, r, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1)
    return grouped.reshape(g * (r + 2) * d, *rest)


def _full_megatron_to_hf(full: Mapping[str, torch.Tensor], spec: GPTSpec) -> dict[str, torch.Tensor]:
    """TP = PP = 1 Megatron tensors (global names) -> HF names; splits qkv and fc1 (fresh copies)."""
    out: dict[str, torch.Tensor] = {}
    for m_name, h_name in _megatron_to_hf_names(spec).items():
        if m_name not in full:
            raise KeyError(f"Megatron model has no parameter {m_name!r} (needed for {h_name!r})")
        out[h_name] = full[m_name].clone()
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(full[m + "self_attention.linear_qkv.weight"], spec)
        out[h + "self_attn.q_proj.weight"] = q.clone()
        out[h + "self_attn.k_proj.weight"] = k.clone()
        out[h + "self_attn.v_proj.weight"] = v.clone()
        if spec.qkv_bias:
            qb, kb, vb = _split_qkv(full[m + "self_attention.linear_qkv.bias"], spec)
            out[h + "self_attn.q_proj.bias"] = qb.clone()
            out[h + "self_attn.k_proj.bias"] = kb.clone()
            out[h + "self_attn.v_proj.bias"] = vb.clone()
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"] = gate.clone()
        out[h + "mlp.up_proj.weight"] = up.clone()
    return out


@torch.no_grad()
def export_to_hf(model: torch.nn.Module, spec: GPTSpec) -> dict[str, torch.Tensor]:
    """Megatron ``GPTModel`` (possibly DDP-wrapped, any TP/PP layout) -> full HF Qwen2/Qwen3 state dict.

    Collective over the model-parallel (TP x PP) group when TP or PP > 1:
    every rank gets the FULL state dict (TP shards gathered, vocab-parallel
    embedding/output rows concatenated, every stage's layers under their
    global layer numbers). Returns detached copies in the model's dtype and
    device. With tied embeddings there is no ``lm_head.weight`` (HF ties it
    on load); the last stage's duplicate of the embedding is skipped.
    """
    _check_architecture(spec)
    model = _unwrap(model)
    layout = _layout(model)
    names = _global_names(model)
    local: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if spec.tie_word_embeddings and name == "output_layer.weight":
            continue  # the last stage's copy of the tied embedding (kept equal by Megatron)
        local[names[name]] = _gather_tp(name, param, layout)
    return _full_megatron_to_hf(_all_gather_stages(local, layout), spec)


def _expected_hf_shapes(spec: GPTSpec) -> dict[str, tuple[int, ...]]:
    h, f, v, d = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size, spec.kv_channels
    nq, nkv = spec.num_attention_heads * d, spec.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (nq, h),
                p + "self_attn.k_proj.weight": (nkv, h),
                p + "self_attn.v_proj.weight": (nkv, h),
                p + "self_attn.o_proj.weight": (h, nq),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        if spec.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (nq,),
                    p + "self_attn.k_proj.bias": (nkv,),
                    p + "self_attn.v_proj.bias": (nkv,),
                }
            )
        if spec.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def _hf_to_full_megatron(spec: GPTSpec, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate an HF state dict against ``spec`` and map it to TP = PP = 1 Megatron names (fuses qkv, fc1).

    Raises ``KeyError`` naming missing or unexpected keys and ``ValueError``
    naming a key whose shape does not match ``spec``.
    """
    expected = _expected_hf_shapes(spec)
    given = dict(hf_state_dict)
    if spec.tie_word_embeddings and "lm_head.weight" in given:
        lm_head = given.pop("lm_head.weight")
        embed = given.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(lm_head.to(embed.dtype), embed):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight but model.tie_word_embeddings=True")
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise KeyError(f"HF state dict does not match the spec: missing keys {missing}, unexpected keys {unexpected}")
    for key, shape in expected.items():
        if tuple(given[key].shape) != shape:
            raise ValueError(f"HF tensor {key!r} has shape {tuple(given[key].shape)}, expected {shape}")

    full = {m_name: given[h_name] for m_name, h_name in _megatron_to_hf_names(spec).items()}
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        full[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            given[h + "self_attn.q_proj.weight"], given[h + "self_attn.k_proj.weight"],
            given[h + "self_attn.v_proj.weight"], spec,
        )
        if spec.qkv_bias:
            full[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                given[h + "self_attn.q_proj.bias"], given[h + "self_attn.k_proj.bias"],
                given[h + "self_attn.v_proj.bias"], spec,
            )
        gate, up = given[h + "mlp.gate_proj.weight"], given[h + "mlp.up_proj.weight"]
        full[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
    return full


@torch.no_grad()
def import_from_hf(model: torch.nn.Module, spec: GPTSpec, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a full HF Qwen2/Qwen3 state dict into a Megatron ``GPTModel`` in place (any TP/PP layout).

    Every rank passes the same full state dict and takes its own shard: the
    layers of its pipeline stage (by global layer number) and its TP slice of
    each partitioned tensor (inverse of :func:`export_to_hf`); no
    communication. Values are cast to each parameter's dtype/device. With
    tied embeddings an ``lm_head.weight`` in the input is accepted only if it
    equals the embedding (HF state dicts of tied models often carry it), and
    a last pipeline stage's duplicate of the embedding is loaded from it.
    Raises ``KeyError`` naming missing or unexpected keys and ``ValueError``
    naming a key whose shape does not match ``spec``.
    """
    _check_architecture(spec)
    full = _hf_to_full_megatron(spec, hf_state_dict)
    model = _unwrap(model)
    layout = _layout(model)
    names = _global_names(model)
    for name, target in model.named_parameters():
        global_name = names[name]
        if spec.tie_word_embeddings and name == "output_layer.weight":
            global_name = "embedding.word_embeddings.weight"
        if global_name not in full:
            raise KeyError(f"Megatron parameter {name!r} ({global_name!r}) has no HF counterpart")
        value = _shard_tp(name, full[global_name], target, layout)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"Megatron parameter {name!r} has shape {tuple(target.shape)}, got {tuple(value.shape)}")
        target.copy_(value.to(dtype=target.dtype, device=target.device))
