"""GPT builder and presets on Megatron-Core's local layer spec (CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")

from nemo_gdro.models.gpt import PRESETS, build_gpt, spec_from_overrides  # noqa: E402
from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed, seed_everything  # noqa: E402


@pytest.fixture(scope="module")
def dist_env():
    info = init_distributed(seed=0)
    yield info
    destroy_distributed()


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def test_qwen3_presets_match_released_configs():
    # Values of the released Qwen3 config.json files.
    expect = {
        "qwen3_0p6b": (1024, 28, 16, 8, 3072, True),
        "qwen3_1p7b": (2048, 28, 16, 8, 6144, True),
        "qwen3_4b": (2560, 36, 32, 8, 9728, True),
        "qwen3_8b": (4096, 36, 32, 8, 12288, False),
    }
    for name, (h, layers, heads, kv, ffn, tied) in expect.items():
        s = PRESETS[name]
        assert (s.hidden_size, s.num_layers, s.num_attention_heads, s.num_query_groups) == (h, layers, heads, kv)
        assert (s.ffn_hidden_size, s.tie_word_embeddings) == (ffn, tied)
        assert s.vocab_size == 151_936 and s.kv_channels == 128 and s.rotary_base == 1e6
        assert s.qk_layernorm and not s.qkv_bias and s.hf_architecture == "qwen3"


def test_spec_validation_and_overrides():
    s = spec_from_overrides("tiny", num_layers=3)
    assert s.num_layers == 3 and s.hidden_size == PRESETS["tiny"].hidden_size
    with pytest.raises(ValueError, match="num_hiden_layers"):
        spec_from_overrides("tiny", num_hiden_layers=3)
    with pytest.raises(ValueError, match="model.preset"):
        spec_from_overrides("huge")
    with pytest.raises(ValueError, match="num_query_groups"):
        dataclasses.replace(PRESETS["tiny"], num_query_groups=3)
    with pytest.raises(ValueError, match="model.hidden_size"):
        dataclasses.replace(PRESETS["tiny"], hidden_size=0)
    assert PRESETS["tiny"].vocab_size % 8 == 0


def test_tiny_parameters_and_logits_shape(dist_env):
    spec = PRESETS["tiny"]
    model = build_gpt(spec)
    params = dict(model.named_parameters())
    d = spec.kv_channels
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (qkv_rows, spec.hidden_size)
    assert params["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * spec.ffn_hidden_size, spec.hidden_size)
    assert params["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (d,)
    assert "output_layer.weight" not in params  # tied
    assert not any(name.endswith(".bias") for name in params)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    tokens = torch.randint(0, spec.vocab_size, (3, 11))
    logits = model(tokens, _positions(tokens), None)
    assert logits.shape == (3, 11, spec.vocab_size)


def test_variants_untied_qkv_bias_no_qk_norm(dist_env):
    spec = dataclasses.replace(
        PRESETS["tiny"], tie_word_embeddings=False, qkv_bias=True, qk_layernorm=False, hf_architecture="qwen2"
    )
    params = dict(build_gpt(spec).named_parameters())
    assert params["output_layer.weight"].shape == (spec.vocab_size, spec.hidden_size)
    assert "decoder.layers.1.self_attention.linear_qkv.bias" in params
    assert not any("layernorm.weight" in n and ("q_" in n or "k_" in n) for n in params)
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in params


def test_explicit_head_dim(dist_env):
    spec = dataclasses.replace(PRESETS["tiny"], head_dim=32)  # != 64 / 4, as in Qwen3-4B
    model = build_gpt(spec)
    w = dict(model.named_parameters())["decoder.layers.0.self_attention.linear_proj.weight"]
    assert w.shape == (spec.hidden_size, spec.num_attention_heads * 32)
    tokens = torch.randint(0, spec.vocab_size, (2, 5))
    assert model(tokens, _positions(tokens), None).shape == (2, 5, spec.vocab_size)


def test_seeded_init_is_reproducible_and_attention_is_causal(dist_env):
    spec = PRESETS["tiny"]
    seed_everything(3)
    a = build_gpt(spec)
    seed_everything(3)
    b = build_gpt(spec)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    tokens = torch.randint(0, spec.vocab_size, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % spec.vocab_size
    with torch.no_grad():
        la = a(tokens, _positions(tokens), None)
        lb = a(changed, _positions(changed), None)
    torch.testing.assert_close(la[:, :8], lb[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


# ---------------------------------------------------------------------------- layer spec selection
def test_local_layer_spec_is_megatrons_local_one():
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from nemo_gdro.models.gpt import layer_spec

    spec = layer_spec("local", qk_layernorm=True)
    assert spec.module is TransformerLayer
    attention = spec.submodules.self_attention.submodules
    assert attention.q_layernorm is not gpt_layer_specs.IdentityOp  # Qwen3's q/k norm is built
    assert layer_spec("local", qk_layernorm=False).submodules.self_attention.submodules.q_layernorm is gpt_layer_specs.IdentityOp


def test_transformer_engine_spec_needs_megatrons_te(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    from nemo_gdro.models.gpt import layer_spec

    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)
    with pytest.raises(RuntimeError, match="megatron.transformer_impl=transformer_engine.*HAVE_TE is False"):
        layer_spec("transformer_engine", qk_layernorm=True)
    with pytest.raises(ValueError, match="megatron.transformer_impl must be one of"):
        layer_spec("te", qk_layernorm=True)


@pytest.mark.parametrize("qk_layernorm", [True, False])
def test_transformer_engine_spec_is_requested_with_qk_layernorm(monkeypatch, qk_layernorm):
    from megatron.core.models.gpt import gpt_layer_specs

    from nemo_gdro.models.gpt import layer_spec

    calls = []
    sentinel = object()

    def fake_te_spec(**kwargs):
        calls.append(kwargs)
        return sentinel

    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", fake_te_spec)
    assert layer_spec("transformer_engine", qk_layernorm=qk_layernorm) is sentinel
    assert calls == [{"qk_layernorm": qk_layernorm}]
