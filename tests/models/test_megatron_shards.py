"""Offline merge of saved Megatron shards: TP = PP = 1 here (TP = 2 / PP = 2 shards in test_hf_checkpoint_layouts.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from nemo_gdro.models.gpt import build_gpt  # noqa: E402
from nemo_gdro.models.hf_config import spec_from_hf_config  # noqa: E402
from nemo_gdro.models.hf_mapping import export_to_hf  # noqa: E402
from nemo_gdro.models.hf_weights import load_hf_weights  # noqa: E402
from nemo_gdro.models.megatron_shards import hf_state_dict_from_megatron_shards  # noqa: E402

ONE = {"tp": 1, "pp": 1, "tp_rank": 0, "pp_rank": 0}


@pytest.fixture(scope="module")
def saved(dist_env, tiny_dirs):
    directory = tiny_dirs["qwen3_untied"]
    spec = spec_from_hf_config(directory)
    model = build_gpt(spec)
    load_hf_weights(model, spec, directory)
    return spec, model.state_dict(), export_to_hf(model, spec)


def test_single_shard_merge_equals_live_export(saved):
    spec, state, live = saved
    assert any(k.endswith("_extra_state") for k in state)
    for variant in (state, {k: v for k, v in state.items() if not k.endswith("_extra_state")}):
        merged = hf_state_dict_from_megatron_shards(spec, [(ONE, variant)])
        assert list(merged) == list(live) and all(torch.equal(merged[k], live[k]) for k in live)


def _fails(spec, shards, exc: type, *fragments: str) -> None:
    with pytest.raises(exc) as info:
        hf_state_dict_from_megatron_shards(spec, shards)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_layout_errors(saved):
    spec, state, _ = saved
    _fails(spec, [], ValueError, "no Megatron shards")
    _fails(spec, [({"tp": 1, "pp": 1, "tp_rank": 0}, state)], ValueError, "pp_rank")
    _fails(spec, [(ONE, state), (ONE, state)], ValueError, "shards 0 and 1", "tp_rank=0, pp_rank=0")
    _fails(spec, [(dict(ONE, tp=2), state)], ValueError, "missing shard(s)", "(1, 0)")
    _fails(spec, [(ONE, state), (dict(ONE, tp=2, tp_rank=1), state)], ValueError, "shard 1", "tp=2")
    _fails(spec, [(dict(ONE, pp=3), state)], ValueError, "missing shard(s)", "(0, 1), (0, 2)")
    _fails(spec, [(dict(ONE, tp_rank=1), state)], ValueError, "outside tp=1")


def test_tensor_errors_name_tensor_and_shard(saved):
    spec, state, _ = saved
    missing = {k: v for k, v in state.items() if k != "decoder.layers.1.mlp.linear_fc2.weight"}
    _fails(spec, [(ONE, missing)], KeyError, "decoder.layers.1.mlp.linear_fc2.weight")
    extra = dict(state, **{"decoder.layers.0.mlp.linear_fc3.weight": torch.zeros(1)})
    _fails(spec, [(ONE, extra)], KeyError, "shard tp_rank=0, pp_rank=0", "decoder.layers.0.mlp.linear_fc3.weight")
    beyond = dict(state, **{"decoder.layers.2.input_layernorm.weight": torch.zeros(32)})
    _fails(spec, [(ONE, beyond)], ValueError, "decoder.layers.2.input_layernorm.weight", "local layer 2")
    wrong = dict(state, **{"decoder.final_layernorm.weight": torch.zeros(31)})
    _fails(spec, [(ONE, wrong)], ValueError, "decoder.final_layernorm.weight", "(31,)", "(32,)")
    # Two TP ranks that pretend to be halves of a TP=1 model's tensors: the merged shapes are wrong.
    _fails(
        spec,
        [(dict(ONE, tp=2), state), (dict(ONE, tp=2, tp_rank=1), state)],
        ValueError,
        "embedding.word_embeddings.weight",
        "over tp=2",
    )


# ---------------------------------------------------------------------------- Transformer Engine names
#: The local-spec names TE's layer spec replaces (its fused norm + linear modules).
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _te_named(state: dict) -> dict:
    """The same tensors under Transformer Engine's names (TE also keeps ``_extra_state`` per module)."""
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        parts = key.split(".", 3)
        if key.startswith("decoder.layers.") and parts[3] in _TE_NAMES:
            key = ".".join(parts[:3]) + "." + _TE_NAMES[parts[3]]
        out[key] = value
        if key.endswith("linear_qkv.weight") or key.endswith("linear_fc1.weight"):
            out[key.replace(".weight", "._extra_state")] = None
    return out


def test_canonical_names():
    from nemo_gdro.models.hf_mapping import canonical_megatron_name

    assert canonical_megatron_name("decoder.layers.7.self_attention.linear_qkv.layer_norm_weight") == (
        "decoder.layers.7.input_layernorm.weight"
    )
    assert canonical_megatron_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.0.pre_mlp_layernorm.weight"
    )
    for same in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight",
                 "embedding.word_embeddings.weight", "decoder.layers.x", "output_layer.weight"):
        assert canonical_megatron_name(same) == same


def test_te_named_state_dict_gives_the_same_hf_tensors(saved):
    spec, state, live = saved
    te_state = _te_named(state)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_state
    assert "decoder.layers.0.input_layernorm.weight" not in te_state
    merged = hf_state_dict_from_megatron_shards(spec, [(ONE, te_state)])
    assert list(merged) == list(live) and all(torch.equal(merged[k], live[k]) for k in live)


def test_te_named_tp_shards_merge_like_local_ones(saved):
    """TP = 2 shards (split as Megatron splits them) under both naming schemes give the same HF tensors."""
    from nemo_gdro.models.hf_mapping import canonical_megatron_name, tensor_maps

    spec, state, live = saved
    dims = {tm.megatron: tm.tp_dim for tm in tensor_maps(spec)}
    shards = [{}, {}]
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        dim = dims[canonical_megatron_name(key)]
        if dim is None:
            parts = (value, value)
        elif key.endswith("linear_fc1.weight"):  # rank k holds [gate_k; up_k]
            gate, up = value.chunk(2, dim=0)
            parts = tuple(torch.cat([g, u]) for g, u in zip(gate.chunk(2), up.chunk(2)))
        else:
            parts = value.chunk(2, dim=dim)
        for rank in range(2):
            shards[rank][key] = parts[rank].clone()
    layouts = [{"tp": 2, "pp": 1, "tp_rank": r, "pp_rank": 0} for r in range(2)]
    local = hf_state_dict_from_megatron_shards(spec, list(zip(layouts, shards)))
    te = hf_state_dict_from_megatron_shards(spec, list(zip(layouts, [_te_named(s) for s in shards])))
    assert list(local) == list(te) == list(live)
    assert all(torch.equal(local[k], live[k]) and torch.equal(te[k], live[k]) for k in live)
