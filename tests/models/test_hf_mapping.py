"""HF Qwen2/Qwen3 <-> Megatron weight mapping: logits parity and exact round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from nemo_gdro.models.gpt import PRESETS, GPTSpec, build_gpt  # noqa: E402
from nemo_gdro.models.hf_mapping import export_to_hf, hf_config, hf_key_names, import_from_hf  # noqa: E402
from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed, seed_everything  # noqa: E402

TINY = PRESETS["tiny"]
SPECS = {
    "qwen3_tied": TINY,
    "qwen3_untied_mqa": dataclasses.replace(TINY, tie_word_embeddings=False, num_query_groups=1),
    "qwen3_head_dim": dataclasses.replace(TINY, head_dim=32, num_attention_heads=4, num_query_groups=4),
    "qwen2_bias": dataclasses.replace(TINY, hf_architecture="qwen2", qkv_bias=True, qk_layernorm=False),
    "qwen2_bias_untied": dataclasses.replace(
        TINY, hf_architecture="qwen2", qkv_bias=True, qk_layernorm=False, tie_word_embeddings=False
    ),
}


@pytest.fixture(scope="module")
def dist_env():
    info = init_distributed(seed=0)
    yield info
    destroy_distributed()


def _random_hf_model(spec: GPTSpec, seed: int) -> torch.nn.Module:
    """A randomly initialised HF model; norms and biases randomised too (HF inits them to 1 / 0)."""
    torch.manual_seed(seed)
    cls = transformers.Qwen3ForCausalLM if spec.hf_architecture == "qwen3" else transformers.Qwen2ForCausalLM
    model = cls(hf_config(spec)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def _megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hf_import_gives_same_logits(dist_env, name):
    spec = SPECS[name]
    hf = _random_hf_model(spec, seed=1)
    model = build_gpt(spec).eval()
    import_from_hf(model, spec, hf.state_dict())
    tokens = torch.randint(0, spec.vocab_size, (3, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(_megatron_logits(model, tokens), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_export_import_round_trip_is_exact(dist_env, name):
    spec = SPECS[name]
    seed_everything(11)
    source = build_gpt(spec)
    with torch.no_grad():  # non-trivial norms/biases so that a swapped tensor would show
        for n, p in source.named_parameters():
            if p.dim() == 1:
                p.normal_()
    exported = export_to_hf(source, spec)
    assert sorted(exported) == sorted(hf_key_names(spec))
    seed_everything(12)
    target = build_gpt(spec)
    import_from_hf(target, spec, exported)
    for (n, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b), n
    again = export_to_hf(target, spec)
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    # The export is a valid HF checkpoint with identical logits.
    hf = transformers.Qwen3ForCausalLM if spec.hf_architecture == "qwen3" else transformers.Qwen2ForCausalLM
    hf_model = hf(hf_config(spec)).eval()
    missing, unexpected = hf_model.load_state_dict(exported, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing) and spec.tie_word_embeddings == bool(missing)
    if spec.tie_word_embeddings:
        hf_model.tie_weights()
    tokens = torch.randint(0, spec.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, _megatron_logits(source, tokens), rtol=0, atol=1e-4)


def test_qkv_layout_is_grouped_per_query_group(dist_env):
    """Megatron's fused qkv rows are [q heads of group g, k_g, v_g] per group, not [Q; K; V]."""
    spec = TINY  # 4 query heads, 2 groups, head_dim 16
    model = build_gpt(spec)
    d, r = spec.kv_channels, spec.num_attention_heads // spec.num_query_groups
    with torch.no_grad():
        qkv = dict(model.named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"]
        qkv.copy_(torch.arange(qkv.shape[0], dtype=torch.float32).unsqueeze(1).expand_as(qkv))
    out = export_to_hf(model, spec)
    rows = lambda key: out[f"model.layers.0.self_attn.{key}_proj.weight"][::d, 0].long().tolist()  # noqa: E731
    group = (r + 2) * d
    assert rows("q") == [0, d, group, group + d]
    assert rows("k") == [r * d, group + r * d]
    assert rows("v") == [(r + 1) * d, group + (r + 1) * d]


def test_import_errors_name_the_key(dist_env):
    spec = TINY
    model = build_gpt(spec)
    good = export_to_hf(model, spec)
    missing = dict(good)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        import_from_hf(model, spec, missing)
    extra = dict(good, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        import_from_hf(model, spec, extra)
    bad = dict(good, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight"):
        import_from_hf(model, spec, bad)
    # A tied checkpoint may carry lm_head.weight equal to the embedding.
    import_from_hf(model, spec, dict(good, **{"lm_head.weight": good["model.embed_tokens.weight"]}))
    with pytest.raises(ValueError, match="lm_head.weight"):
        wrong_head = torch.zeros_like(good["model.embed_tokens.weight"])
        import_from_hf(model, spec, dict(good, **{"lm_head.weight": wrong_head}))


def test_unsupported_layouts(dist_env, monkeypatch):
    with pytest.raises(ValueError, match="qwen2"):
        hf_config(dataclasses.replace(TINY, qkv_bias=True))
    with pytest.raises(ValueError, match="Qwen2"):
        hf_config(dataclasses.replace(TINY, hf_architecture="qwen2"))
    from megatron.core import parallel_state

    model = build_gpt(TINY)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="tensor_parallel=1"):
        export_to_hf(model, TINY)


def test_hf_config_fields():
    cfg = hf_config(PRESETS["qwen3_8b"])
    assert type(cfg).__name__ == "Qwen3Config"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 12288, 36)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-6
