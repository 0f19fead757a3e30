"""Qwen-style GPT models on Megatron-Core's local layer spec or Transformer Engine's.

A :class:`GPTSpec` is the architecture (what an HF ``config.json`` says);
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

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

def _qwen3(hidden: int, layers: int, heads: int, ffn: int, *, tie_word_embeddings: bool) -> GPTSpec:
    """A released Qwen3 dense model: what differs between sizes is the shape."""
    return GPTSpec(
        vocab_size=151_936,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=8,
        ffn_hidden_size=ffn,
        max_position_embeddings=40_960,
        rotary_base=1_000_000.0,
        norm_epsilon=1e-6,
        qkv_bias=False,
        qk_layernorm=True,
        tie_word_embeddings=tie_word_embeddings,
        hf_architecture="qwen3",
        head_dim=128,
    )


#: Hugging Face layouts a :class:`GPTSpec` can describe.
HF_ARCHITECTURES: tuple[str, ...] = ("qwen3", "qwen2", "llama")

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

#: ``megatron.transformer_impl`` values.
TRANSFORMER_IMPLS: tuple[str, ...] = ("local", "transformer_engine")


@dataclass(frozen=True)
class GPTSpec:
    """Architecture of a Qwen2/Qwen3-style decoder.

    Attributes:
        vocab_size: embedding rows (already padded; divisible by the TP size).
        hidden_size: model width ``h``.
        num_layers: transformer layers.
        num_attention_heads: query heads ``n_q``.
        num_query_groups: key/value heads ``n_kv`` (GQA); divides ``n_q``.
        ffn_hidden_size: SwiGLU inner width.
        max_position_embeddings: longest sequence (tokens) the model is built for.
        rotary_base: RoPE theta.
        norm_epsilon: RMSNorm epsilon.
        qkv_bias: bias on the q/k/v projections (Qwen2).
        qk_layernorm: per-head RMSNorm on queries and keys (Qwen3).
        tie_word_embeddings: output layer shares the input embedding matrix.
        hf_architecture: the Hugging Face layout this maps to (``qwen3``: q/k norm, no
            biases; ``qwen2``: qkv bias, no q/k norm; ``llama``: neither).
        head_dim: per-head width ``d``; ``None`` means ``hidden_size // num_attention_heads``
            (Qwen3-4B has ``d = 128 != 2560 / 32``).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rotary_base: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    qk_layernorm: bool = True
    tie_word_embeddings: bool = False
    hf_architecture: Literal["qwen3", "qwen2", "llama"] = "qwen3"
    head_dim: int | None = None

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "max_position_embeddings",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{key} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                f"({self.num_attention_heads}) unless model.head_dim is set"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ValueError(f"model.head_dim must be a positive even int, got {self.head_dim}")
        if not self.rotary_base > 0:
            raise ValueError(f"model.rotary_base must be > 0, got {self.rotary_base}")
        if not self.norm_epsilon > 0:
            raise ValueError(f"model.norm_epsilon must be > 0, got {self.norm_epsilon}")
        if self.hf_architecture not in HF_ARCHITECTURES:
            raise ValueError(
                f"model.hf_architecture must be one of {list(HF_ARCHITECTURES)}, got {self.hf_architecture!r}"
            )

    @property
    def kv_channels(self) -> int:
        """Per-head width ``d``."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads


PRESETS: dict[str, GPTSpec] = {
    # Trains in seconds on CPU: a ~40-symbol character vocabulary padded to 48.
    "tiny": GPTSpec(
        vocab_size=48,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        max_position_embeddings=128,
        rotary_base=10_000.0,
        norm_epsilon=1e-6,
        qkv_bias=False,
        qk_layernorm=True,
        tie_word_embeddings=True,
        hf_architecture="qwen3",
    ),
    # Hyperparameters of the released Qwen3 checkpoints (their config.json).
    "qwen3_0p6b": _qwen3(1024, 28, 16, 3072, tie_word_embeddings=True),
    "qwen3_1p7b": _qwen3(2048, 28, 16, 6144, tie_word_embeddings=True),
    "qwen3_4b": _qwen3(2560, 36, 32, 9728, tie_word_embeddings=True),
    "qwen3_8b": _qwen3(4096, 36, 32, 12_288, tie_word_embeddings=False),
}


def spec_from_overrides(name: str, **overrides: Any) -> GPTSpec:
    """Preset ``name`` with some fields replaced (config entry point).

    Raises ``ValueError`` naming an unknown preset or field.
    """
    if name not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(GPTSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


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
