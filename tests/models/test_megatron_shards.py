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
