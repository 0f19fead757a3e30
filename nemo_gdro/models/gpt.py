"""Qwen-style GPT models on Megatron-Core's local layer spec or Transformer Engine's.

A :class:`~nemo_gdro.models.spec.GPTSpec` is the architecture (what an HF ``config.json`` says);
:func:`build_gpt` turns it into a ``megatron.core.models.gpt.GPTModel`` with
RMSNorm, SwiGLU MLP (``linear_fc1 = [gate; up]``), rotary position embeddings,
grouped-query attention, optional q/k RMSNorm (Qwen3) or qkv bias (Qwen2), no
other linear biases, and tied or untied input/output embeddings.
:func:`layer_spec` picks the layer implementation: Megatron's local modules
(CPU and GPU) or Transformer Engine's (GPU; FP8, sequence parallelism; the
input and pre-MLP norms are fused into ``linear_qkv`` / ``linear_fc1``, see
:func:`nemo_gdro.models.hf_mapping.canonical_megatron_name`).

Megatron's parallel state must be initialised first
(:func:`nemo_gdro.parallel.distributed.init_distributed`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from nemo_gdro.models.spec import HF_ARCHITECTURES, PRESETS, TRANSFORMER_IMPLS, GPTSpec, spec_from_overrides

__all__ = [
    "GPTSpec",
    "HF_ARCHITECTURES",
    "PRESETS",
    "TRANSFORMER_IMPLS",
    "spec_from_overrides",
    "transformer_config",
    "layer_spec",
    "build_gpt",
]


def transformer_config(
    spec: GPTSpec,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    **overrides: Any,
):  # -> megatron.core.transformer.TransformerConfig (lazy import keeps this module light)
    """Megatron ``TransformerConfig`` for ``spec`` on the current parallel state.

    Args:
        spec: the architecture.
        params_dtype: parameter dtype (fp32 on CPU; bf16 on GPU sets ``bf16=True``).
        use_cpu_initialization: initialise weights on CPU; default ``True`` when
            CUDA is unavailable (megatron's GPU init path would allocate on
            ``torch.cuda.current_device()``).
        overrides: further ``TransformerConfig`` fields (e.g. ``calculate_per_token_loss``).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=params_dtype,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(transformer_impl: str, qk_layernorm: bool):  # -> megatron.core.transformer.spec_utils.ModuleSpec
    """Megatron's transformer-layer spec for ``transformer_impl`` (``local`` | ``transformer_engine``).

    Raises ``RuntimeError`` for ``transformer_engine`` when Megatron-Core could
    not import Transformer Engine (``gpt_layer_specs.HAVE_TE``), instead of
    the ``NameError`` Megatron raises there.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if transformer_impl != "transformer_engine":
        raise ValueError(f"megatron.transformer_impl must be one of {list(TRANSFORMER_IMPLS)}, got {transformer_impl!r}")
    if not getattr(gpt_layer_specs, "HAVE_TE", False):
        raise RuntimeError(
            "megatron.transformer_impl=transformer_engine: Megatron-Core cannot import Transformer Engine "
            "(gpt_layer_specs.HAVE_TE is False); pip install 'nemo_gdro[te]' on a GPU host"
        )
    # Normalisation (RMSNorm) comes from the TransformerConfig through TENorm / TE's fused norm + linear.
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def build_gpt(
    spec: GPTSpec,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
    use_cpu_initialization: bool | None = None,
    transformer_impl: str = "local",
):  # -> megatron.core.models.gpt.GPTModel
    """Build the Megatron GPT model for ``spec`` on the ``transformer_impl`` layer spec.

    Args:
        spec: the architecture.
        params_dtype: parameter dtype.
        pre_process: this pipeline stage holds the input embedding.
        post_process: this pipeline stage holds the final norm and output layer.
        config_overrides: extra ``TransformerConfig`` fields.
        use_cpu_initialization: see :func:`transformer_config`.
        transformer_impl: ``local`` or ``transformer_engine`` (:func:`layer_spec`).
    Returns:
        ``GPTModel`` on CPU, or moved to the current CUDA device when CUDA is
        available. ``model(input_ids [b, s], position_ids [b, s], None)``
        returns logits ``[b, s, vocab_size / tp]`` (vocab-parallel shard).
    """
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(
        spec,
        params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        **dict(config_overrides or {}),
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(transformer_impl, spec.qk_layernorm),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(spec.rotary_base),
        parallel_output=True,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
