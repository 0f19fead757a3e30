"""Megatron GPT <-> Hugging Face Qwen2/Qwen3 weight layout (TP = PP = 1).

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
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_gdro.models.gpt import GPTSpec

__all__ = ["hf_config", "export_to_hf", "import_from_hf", "hf_key_names"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "transformers is required for the Hugging Face mapping; install the 'hf' extra "
            "(pip install 'nemo_gdro[hf]')"
        ) from exc
    return transformers


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


def _check_tp1() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if tp != 1 or pp != 1:
            raise NotImplementedError(
                f"HF weight mapping supports tensor_parallel=1 and pipeline_parallel=1 only, got tp={tp}, pp={pp} "
                "(gathering sharded weights is a later issue)"
            )


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


@torch.no_grad()
def export_to_hf(model: torch.nn.Module, spec: GPTSpec) -> dict[str, torch.Tensor]:
    """Megatron ``GPTModel`` (possibly DDP-wrapped) -> HF Qwen2/Qwen3 state dict.

    Returns detached copies in the model's dtype and device. With tied
    embeddings there is no ``lm_head.weight`` (HF ties it on load).
    """
    _check_tp1()
    _check_architecture(spec)
    params = dict(_unwrap(model).named_parameters())
    out: dict[str, torch.Tensor] = {}
    for m_name, h_name in _megatron_to_hf_names(spec).items():
        if m_name not in params:
            raise KeyError(f"Megatron model has no parameter {m_name!r} (needed for {h_name!r})")
        out[h_name] = params[m_name].detach().clone()
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(params[m + "self_attention.linear_qkv.weight"], spec)
        out[h + "self_attn.q_proj.weight"] = q.clone()
        out[h + "self_attn.k_proj.weight"] = k.clone()
        out[h + "self_attn.v_proj.weight"] = v.clone()
        if spec.qkv_bias:
            qb, kb, vb = _split_qkv(params[m + "self_attention.linear_qkv.bias"], spec)
            out[h + "self_attn.q_proj.bias"] = qb.clone()
            out[h + "self_attn.k_proj.bias"] = kb.clone()
            out[h + "self_attn.v_proj.bias"] = vb.clone()
        gate, up = params[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"] = gate.clone()
        out[h + "mlp.up_proj.weight"] = up.clone()
    return out


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


@torch.no_grad()
def import_from_hf(model: torch.nn.Module, spec: GPTSpec, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy an HF Qwen2/Qwen3 state dict into a Megatron ``GPTModel`` in place.

    Values are cast to each parameter's dtype/device. With tied embeddings an
    ``lm_head.weight`` in the input is accepted only if it equals the
    embedding (HF state dicts of tied models often carry it). Raises
    ``KeyError`` naming missing or unexpected keys and ``ValueError`` naming a
    key whose shape does not match ``spec``.
    """
    _check_tp1()
    _check_architecture(spec)
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

    params = dict(_unwrap(model).named_parameters())

    def put(m_name: str, value: torch.Tensor) -> None:
        if m_name not in params:
            raise KeyError(f"Megatron model has no parameter {m_name!r}")
        target = params[m_name]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"Megatron parameter {m_name!r} has shape {tuple(target.shape)}, got {tuple(value.shape)}")
        target.copy_(value.to(dtype=target.dtype, device=target.device))

    for m_name, h_name in _megatron_to_hf_names(spec).items():
        put(m_name, given[h_name])
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        put(
            m + "self_attention.linear_qkv.weight",
            _fuse_qkv(
                given[h + "self_attn.q_proj.weight"],
                given[h + "self_attn.k_proj.weight"],
                given[h + "self_attn.v_proj.weight"],
                spec,
            ),
        )
        if spec.qkv_bias:
            put(
                m + "self_attention.linear_qkv.bias",
                _fuse_qkv(given[h + "self_attn.q_proj.bias"], given[h + "self_attn.k_proj.bias"],
                          given[h + "self_attn.v_proj.bias"], spec),
            )
        fc1 = torch.cat([given[h + "mlp.gate_proj.weight"], given[h + "mlp.up_proj.weight"]])
        put(m + "mlp.linear_fc1.weight", fc1)
