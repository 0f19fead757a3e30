"""The architecture of a Qwen2/Qwen3-style decoder (:class:`GPTSpec`) and the named presets.

Plain data, no torch: the run config checks ``model.preset`` and ``model.overrides``
before anything heavy is imported. :mod:`nemo_gdro.models.gpt` builds the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["GPTSpec", "HF_ARCHITECTURES", "PRESETS", "TRANSFORMER_IMPLS", "spec_from_overrides"]


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
