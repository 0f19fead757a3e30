"""GPTSpec from HF config.json: the three families, both transformers layouts, clear refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("transformers")

from nemo_gdro.models.gpt import PRESETS, GPTSpec  # noqa: E402
from nemo_gdro.models.hf_config import HFConfigError, spec_from_hf_config  # noqa: E402
from nemo_gdro.models.hf_save import hf_config_json  # noqa: E402
from nemo_gdro.testing.tiny_hf import tiny_hf_config  # noqa: E402

# Qwen3-8B's config.json as released (transformers 4.x layout: top-level rope_theta, rope_scaling).
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def _json(config) -> dict:
    return json.loads(config.to_json_string(use_diff=True))


def test_released_qwen3_8b_config_gives_the_preset():
    assert spec_from_hf_config(QWEN3_8B_CONFIG) == PRESETS["qwen3_8b"]


def test_tiny_configs_of_each_family():
    q3 = spec_from_hf_config(_json(tiny_hf_config("qwen3")))
    assert (q3.hf_architecture, q3.qk_layernorm, q3.qkv_bias, q3.tie_word_embeddings) == ("qwen3", True, False, True)
    assert (q3.vocab_size, q3.hidden_size, q3.kv_channels, q3.num_query_groups) == (151_936, 32, 16, 2)
    assert q3.rotary_base == 1e6
    q2 = spec_from_hf_config(_json(tiny_hf_config("qwen2")))
    assert (q2.hf_architecture, q2.qk_layernorm, q2.qkv_bias, q2.tie_word_embeddings) == ("qwen2", False, True, False)
    assert q2.kv_channels == 8
    llama = spec_from_hf_config(_json(tiny_hf_config("llama")))
    assert (llama.hf_architecture, llama.qk_layernorm, llama.qkv_bias) == ("llama", False, False)
    assert llama.rotary_base == 5e5


@pytest.mark.parametrize(
    "spec",
    [
        PRESETS["qwen3_8b"],
        PRESETS["qwen3_4b"],
        dataclasses.replace(PRESETS["tiny"], hf_architecture="qwen2", qkv_bias=True, qk_layernorm=False),
        dataclasses.replace(PRESETS["tiny"], hf_architecture="llama", qk_layernorm=False, head_dim=16),
    ],
    ids=["qwen3_8b", "qwen3_4b", "qwen2", "llama"],
)
def test_written_config_reads_back_as_the_spec(spec: GPTSpec):
    import torch

    assert spec_from_hf_config(json.loads(hf_config_json(spec, torch.bfloat16))) == spec


def test_qwen25_style_unused_sliding_window_is_accepted():
    cfg = dict(QWEN3_8B_CONFIG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=4096)
    cfg.update(head_dim=None, sliding_window=131072, max_window_layers=21, use_sliding_window=False)
    spec = spec_from_hf_config(cfg)
    assert spec.qkv_bias and not spec.qk_layernorm


@pytest.mark.parametrize(
    "change, key",
    [
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "architectures"),
        ({"architectures": ["Qwen3ForCausalLM", "X"]}, "architectures"),
        ({"model_type": "qwen2"}, "model_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
        ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 0}, "use_sliding_window"),
        ({"layer_types": ["sliding_attention"] * 36}, "layer_types"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_experts": 8}, "num_experts"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_unsupported_configs_name_the_file_and_key(tmp_path, change, key):
    cfg = {k: v for k, v in dict(QWEN3_8B_CONFIG, **change).items() if v is not None or k != "hidden_size"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(HFConfigError) as info:
        spec_from_hf_config(tmp_path)
    assert str(path) in str(info.value) and repr(key) in str(info.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(HFConfigError, match="config.json: no such file"):
        spec_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFConfigError, match="config.json: not valid JSON"):
        spec_from_hf_config(tmp_path / "config.json")
