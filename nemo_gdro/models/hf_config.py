"""A :class:`GPTSpec` from a Hugging Face ``config.json`` (Qwen3, Qwen2, Llama dense decoders).

Reads the JSON directly (no ``transformers`` import), so it accepts the
layouts written by both transformers 4.x (``rope_theta`` / ``rope_scaling``
at the top level) and 5.x (``rope_parameters``). What Megatron's local layer
spec cannot reproduce is an error naming ``config.json`` and the key:
another architecture (MoE included), an activation other than SiLU, RoPE
scaling, a sliding window that some layer would use, attention/MLP biases
beyond Qwen2's q/k/v bias.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from nemo_gdro.models.spec import GPTSpec

__all__ = ["CONFIG_NAME", "HFConfigError", "SUPPORTED_ARCHITECTURES", "read_hf_config", "spec_from_hf_config"]

CONFIG_NAME = "config.json"

#: ``config.json`` ``architectures[0]`` -> (``GPTSpec.hf_architecture``, ``model_type``).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "LlamaForCausalLM": ("llama", "llama"),
}
_BY_MODEL_TYPE = {model_type: arch for arch, (_, model_type) in SUPPORTED_ARCHITECTURES.items()}


class HFConfigError(ValueError):
    """``config.json`` is missing, malformed or describes a model we cannot build."""


def read_hf_config(config_or_dir: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The parsed config and what to call it in errors (its path, or ``config.json``).

    Accepts a checkpoint directory, a path to ``config.json``, or an
    already-parsed mapping.
    """
    if isinstance(config_or_dir, Mapping):
        return dict(config_or_dir), CONFIG_NAME
    path = Path(config_or_dir)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise HFConfigError(f"{path}: no such file (an HF checkpoint directory needs a {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data, str(path)


def _architecture(cfg: Mapping[str, Any], where: str) -> str:
    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise HFConfigError(f"{where}: key 'architectures' must be a list with one class name, got {archs!r}")
        arch = archs[0]
    else:
        arch = _BY_MODEL_TYPE.get(str(cfg.get("model_type")), "")
        if not arch:
            raise HFConfigError(
                f"{where}: no key 'architectures' and model_type={cfg.get('model_type')!r} is not one of "
                f"{sorted(_BY_MODEL_TYPE)}"
            )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HFConfigError(
            f"{where}: key 'architectures' = [{arch!r}] is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            " (dense decoders only: no MoE, no vision)"
        )
    model_type = cfg.get("model_type")
    expected_type = SUPPORTED_ARCHITECTURES[arch][1]
    if model_type is not None and model_type != expected_type:
        raise HFConfigError(f"{where}: key 'model_type' = {model_type!r} does not match architectures [{arch!r}]")
    return arch


def _int(cfg: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HFConfigError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
    return value


def _float(cfg: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HFConfigError(f"{where}: key {key!r} must be a positive number, got {value!r}")
    return float(value)


def _rope_theta(cfg: Mapping[str, Any], where: str, default: float) -> float:
    """RoPE base; any scaling (yarn, llama3, linear, dynamic...) is refused."""
    for key in ("rope_scaling", "rope_parameters"):
        params = cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise HFConfigError(f"{where}: key {key!r} must be an object or null, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise HFConfigError(
                f"{where}: key {key!r} has rope_type {kind!r}; only unscaled RoPE ('default' or null) is supported"
            )
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return _float(params, "rope_theta", f"{where} (rope_parameters)", default)
    return _float(cfg, "rope_theta", where, default)


def _check_sliding_window(cfg: Mapping[str, Any], where: str, num_layers: int, max_positions: int) -> None:
    """Refuse a sliding window that some layer would actually use (Qwen2/Qwen3 semantics)."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise HFConfigError(f"{where}: key 'layer_types' must list {num_layers} layer types, got {layer_types!r}")
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise HFConfigError(f"{where}: key 'layer_types' has {other}; only 'full_attention' is supported")
    if not cfg.get("use_sliding_window", False):
        return
    window = cfg.get("sliding_window")
    first_sliding = cfg.get("max_window_layers", 0) or 0
    if window is not None and window < max_positions and first_sliding < num_layers:
        raise HFConfigError(
            f"{where}: key 'use_sliding_window' is true with sliding_window={window} < max_position_embeddings="
            f"{max_positions} for layers >= max_window_layers={first_sliding}; sliding-window attention is not supported"
        )


def spec_from_hf_config(config_or_dir: str | os.PathLike | Mapping[str, Any]) -> GPTSpec:
    """The :class:`GPTSpec` described by an HF ``config.json``.

    Args:
        config_or_dir: a checkpoint directory, its ``config.json``, or the parsed mapping.
    Returns:
        the spec; ``vocab_size`` is the checkpoint's embedding rows (which may
        exceed the tokenizer's vocabulary: padded rows are fine, fewer are
        the data side's error).
    Raises:
        HFConfigError: naming ``config.json`` and the offending key.
    """
    cfg, where = read_hf_config(config_or_dir)
    arch = _architecture(cfg, where)
    family = SUPPORTED_ARCHITECTURES[arch][0]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFConfigError(f"{where}: key 'hidden_act' = {act!r}; only 'silu' (SwiGLU) is supported")
    if cfg.get("attention_bias", False):
        # Qwen3/Llama attention_bias also biases o_proj, which Megatron's add_qkv_bias does not.
        raise HFConfigError(f"{where}: key 'attention_bias' = true is not supported for {arch}")
    if cfg.get("mlp_bias", False):
        raise HFConfigError(f"{where}: key 'mlp_bias' = true is not supported")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            raise HFConfigError(f"{where}: key {key!r} = {cfg[key]!r}: mixture-of-experts models are not supported")

    num_layers = _int(cfg, "num_hidden_layers", where)
    heads = _int(cfg, "num_attention_heads", where)
    hidden = _int(cfg, "hidden_size", where)
    groups = _int(cfg, "num_key_value_heads", where, default=heads)
    max_positions = _int(cfg, "max_position_embeddings", where)
    head_dim = cfg.get("head_dim")
    if head_dim is not None:
        head_dim = _int(cfg, "head_dim", where)
        if family == "qwen2" and head_dim * heads != hidden:
            raise HFConfigError(
                f"{where}: key 'head_dim' = {head_dim} but Qwen2 uses hidden_size / num_attention_heads = "
                f"{hidden / heads:g}"
            )
    if heads % groups != 0:
        raise HFConfigError(f"{where}: key 'num_key_value_heads' = {groups} must divide num_attention_heads = {heads}")
    _check_sliding_window(cfg, where, num_layers, max_positions)
    tie = cfg.get("tie_word_embeddings", False)  # the default of all three config classes
    if not isinstance(tie, bool):
        raise HFConfigError(f"{where}: key 'tie_word_embeddings' must be true or false, got {tie!r}")
    try:
        return GPTSpec(
            vocab_size=_int(cfg, "vocab_size", where),
            hidden_size=hidden,
            num_layers=num_layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=_int(cfg, "intermediate_size", where),
            max_position_embeddings=max_positions,
            rotary_base=_rope_theta(cfg, where, 10_000.0),  # 10k: the config classes' default
            norm_epsilon=_float(cfg, "rms_norm_eps", where, 1e-6),
            qkv_bias=family == "qwen2",
            qk_layernorm=family == "qwen3",
            tie_word_embeddings=tie,
            hf_architecture=family,  # type: ignore[arg-type]
            head_dim=head_dim,
        )
    except ValueError as exc:
        raise HFConfigError(f"{where}: {exc}") from exc
