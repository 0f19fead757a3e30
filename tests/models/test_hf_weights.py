"""Loading safetensors checkpoints into Megatron (TP = PP = 1 here; TP/PP in test_hf_checkpoint_layouts.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from nemo_gdro.models.gpt import build_gpt  # noqa: E402
from nemo_gdro.models.hf_config import spec_from_hf_config  # noqa: E402
from nemo_gdro.models.hf_mapping import export_to_hf  # noqa: E402
from nemo_gdro.models.hf_weights import SAFETENSORS_INDEX, load_hf_weights  # noqa: E402
from nemo_gdro.testing.tiny_hf import build_tiny_hf  # noqa: E402

TOKENS = torch.randint(0, 151_936, (2, 11), generator=torch.Generator().manual_seed(5))


def _megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", ["qwen3", "qwen3_untied", "qwen2", "llama"])
def test_loaded_checkpoint_gives_transformers_logits(dist_env, tiny_dirs, name):
    directory = tiny_dirs[name]
    if name.startswith("qwen3"):
        assert len(list(directory.glob("*.safetensors"))) >= 2 and (directory / SAFETENSORS_INDEX).is_file()
    spec = spec_from_hf_config(directory)
    model = build_gpt(spec).eval()
    load_hf_weights(model, spec, directory)
    expected = _hf_logits(directory, TOKENS)
    assert expected.abs().max() > 1e-2  # not a degenerate model
    torch.testing.assert_close(_megatron_logits(model, TOKENS), expected, rtol=1e-5, atol=1e-5)
    # Loading is exact: exporting gives back the checkpoint's tensors bit for bit.
    stored = {}
    for f in directory.glob("*.safetensors"):
        stored.update(load_file(f))
    exported = export_to_hf(model, spec)
    assert exported.keys() == stored.keys()
    assert all(torch.equal(exported[k], stored[k]) for k in stored)


def test_dtype_casts_both_ways(dist_env, tiny_dirs, tmp_path):
    directory = tiny_dirs["qwen3"]
    spec = spec_from_hf_config(directory)
    embed = load_file(directory / "model-00001-of-00002.safetensors")["model.embed_tokens.weight"]
    bf16_model = build_gpt(spec, params_dtype=torch.bfloat16)
    load_hf_weights(bf16_model, spec, directory)
    assert torch.equal(bf16_model.embedding.word_embeddings.weight, embed.to(torch.bfloat16))
    bf16_dir = build_tiny_hf(tmp_path / "bf16", seed=1, dtype=torch.bfloat16, tokenizer=False)
    fp32_model = build_gpt(spec)
    load_hf_weights(fp32_model, spec, bf16_dir)
    assert fp32_model.embedding.word_embeddings.weight.dtype == torch.float32
    assert torch.equal(fp32_model.embedding.word_embeddings.weight, embed.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------- errors name file and tensor
SHARD2 = "model-00002-of-00002.safetensors"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenizer.json", "vocab.json", "merges.txt"))
    return dst


def _edit_shard(directory: Path, edit, *, index: bool = True) -> None:
    """Apply ``edit(tensors)`` to shard 2 and (``index``) make the index agree with the result."""
    path = directory / SHARD2
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    if index:
        data = json.loads((directory / SAFETENSORS_INDEX).read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != SHARD2}
        data["weight_map"].update({k: SHARD2 for k in tensors})
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(data))


@pytest.fixture
def broken(tiny_dirs, tmp_path) -> Path:
    return _copy(tiny_dirs["qwen3"], tmp_path / "broken")


@pytest.fixture(scope="module")
def target(dist_env, tiny_dirs):
    spec = spec_from_hf_config(tiny_dirs["qwen3"])
    return spec, build_gpt(spec)


def _load_fails(target, directory: Path, exc: type, *fragments: str) -> None:
    spec, model = target
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc) as info:
        load_hf_weights(model, spec, directory)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    # Validation runs before any copy: a refused checkpoint leaves the model as it was.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_shard_file(target, broken):
    (broken / SHARD2).unlink()
    _load_fails(target, broken, FileNotFoundError, SAFETENSORS_INDEX, SHARD2)


def test_missing_tensor(target, broken):
    _edit_shard(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _load_fails(target, broken, KeyError, SAFETENSORS_INDEX, "model.layers.1.mlp.up_proj.weight", "(64, 32)")


def test_index_lists_a_tensor_the_file_lacks(target, broken):
    _edit_shard(broken, lambda t: t.pop("model.layers.0.self_attn.q_norm.weight"), index=False)
    _load_fails(target, broken, KeyError, SHARD2, "model.layers.0.self_attn.q_norm.weight")


def test_unexpected_tensor(target, broken):
    _edit_shard(broken, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}))
    _load_fails(target, broken, KeyError, SHARD2, "model.layers.2.mlp.up_proj.weight", "unexpected")


def test_shape_mismatch_names_expected_and_got(target, broken):
    _edit_shard(broken, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 32)}))
    _load_fails(
        target, broken, ValueError, SHARD2, "model.layers.0.self_attn.k_proj.weight", "(16, 32)", "expected (32, 32)"
    )


def test_tied_lm_head_must_equal_the_embedding(target, broken):
    spec, model = target
    embed = load_file(broken / "model-00001-of-00002.safetensors")["model.embed_tokens.weight"]
    _edit_shard(broken, lambda t: t.update({"lm_head.weight": embed.clone()}))
    load_hf_weights(model, spec, broken)  # equal: accepted
    wrong = embed.clone()
    wrong[7, 3] += 1.0
    _edit_shard(broken, lambda t: t.update({"lm_head.weight": wrong}))
    spec, model = target
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: tensor 'lm_head.weight' differs"):
        load_hf_weights(model, spec, broken)


def test_no_weights_at_all(target, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    _load_fails(target, tmp_path, FileNotFoundError, str(tmp_path), "pytorch_model.bin")
    _load_fails(target, tmp_path / "absent", FileNotFoundError, "absent")


def test_truncated_shard(target, broken):
    data = (broken / SHARD2).read_bytes()
    (broken / SHARD2).write_bytes(data[: len(data) // 2])
    spec, model = target
    with pytest.raises(ValueError, match=SHARD2):
        load_hf_weights(model, spec, broken)
