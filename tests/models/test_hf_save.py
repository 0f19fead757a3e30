"""Streaming export and the atomic HF directory writer (TP = PP = 1; layouts in test_hf_checkpoint_layouts.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from nemo_gdro.models.gpt import build_gpt  # noqa: E402
from nemo_gdro.models.hf_config import spec_from_hf_config  # noqa: E402
from nemo_gdro.models.hf_export import iter_hf_tensors  # noqa: E402
from nemo_gdro.models.hf_mapping import export_to_hf, hf_key_names  # noqa: E402
from nemo_gdro.models.hf_save import HFMetadata, save_hf_checkpoint, write_hf_dir  # noqa: E402
from nemo_gdro.models.hf_weights import SAFETENSORS_INDEX, load_hf_weights  # noqa: E402
from nemo_gdro.testing.tiny_hf import QWEN3_BOS_ID, QWEN3_EOS_IDS, QWEN3_TOKENIZER_FILES  # noqa: E402

TOKENS = torch.randint(0, 151_936, (2, 7), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def loaded(dist_env, tiny_dirs):
    """The tiny tied Qwen3 checkpoint loaded into Megatron, its spec, and its logits."""
    directory = tiny_dirs["qwen3"]
    spec = spec_from_hf_config(directory)
    model = build_gpt(spec).eval()
    load_hf_weights(model, spec, directory)
    with torch.no_grad():
        logits = model(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)
    return spec, model, logits


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_stream_is_export_order_and_dst_only_on_dst(loaded):
    spec, model, _ = loaded
    stream = list(iter_hf_tensors(model, spec))
    assert [n for n, _ in stream] == hf_key_names(spec)
    full = export_to_hf(model, spec)
    assert all(torch.equal(full[n], t) for n, t in stream)
    # Fresh copies: training on does not change what was streamed.
    param_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in param_storage for _, t in stream)
    assert [n for n, _ in iter_hf_tensors(model, spec, dst=0)] == hf_key_names(spec)
    with pytest.raises(ValueError, match="dst=3"):
        next(iter_hf_tensors(model, spec, dst=3))
    bf16 = dict(iter_hf_tensors(model, spec, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())


def test_saved_directory_loads_in_transformers_with_same_logits(loaded, tiny_dirs, tmp_path):
    spec, model, logits = loaded
    source = tiny_dirs["qwen3"]
    out = tmp_path / "export"
    meta = HFMetadata(tokenizer_dir=source, eos_token_id=QWEN3_EOS_IDS, bos_token_id=QWEN3_BOS_ID)
    save_hf_checkpoint(model, spec, out, metadata=meta, max_shard_bytes=2**20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    assert sorted(index["weight_map"]) == sorted(hf_key_names(spec)) and set(index["weight_map"].values()) == set(
        shards
    )
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in model.parameters())
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": QWEN3_BOS_ID, "eos_token_id": list(QWEN3_EOS_IDS)}
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["dtype"], config["eos_token_id"]) == (
        ["Qwen3ForCausalLM"],
        "float32",
        151643,
    )
    for name in QWEN3_TOKENIZER_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, logits, rtol=1e-5, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<think>") == 151_667
    assert spec_from_hf_config(out) == spec


def test_bf16_single_shard_and_copied_generation_config(loaded, tiny_dirs, tmp_path):
    spec, model, _ = loaded
    source = tiny_dirs["qwen3"]
    out = tmp_path / "bf16"
    save_hf_checkpoint(model, spec, out, dtype=torch.bfloat16, metadata=HFMetadata(generation_config_source=source))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, model.embedding.word_embeddings.weight.detach().to(torch.bfloat16))


def test_failed_write_leaves_the_old_directory(loaded, tmp_path):
    spec, model, _ = loaded
    out = tmp_path / "hf"
    good = export_to_hf(model, spec)
    write_hf_dir(out, good.items(), spec, dtype=torch.float32, max_shard_bytes=2**20)
    before = _digest(out)

    def failing():
        for i, item in enumerate(good.items()):
            if i == 20:  # after the first shard (the embedding) was written to the temp dir
                raise RuntimeError("collective broke mid-stream")
            yield item

    with pytest.raises(RuntimeError, match="mid-stream"):
        write_hf_dir(out, failing(), spec, dtype=torch.float32, max_shard_bytes=2**20)
    bad_shape = dict(good, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), expected \(32,\)"):
        write_hf_dir(out, bad_shape.items(), spec, dtype=torch.float32)
    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj.weight"):
        write_hf_dir(out, missing.items(), spec, dtype=torch.float32)
    with pytest.raises(ValueError, match="unexpected tensor 'lm_head.weight'"):
        write_hf_dir(
            out, dict(good, **{"lm_head.weight": good["model.embed_tokens.weight"]}).items(), spec, dtype=torch.float32
        )
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        write_hf_dir(
            out,
            good.items(),
            spec,
            dtype=torch.float32,
            metadata=HFMetadata(tokenizer_dir=tmp_path / "no_such_tokenizer"),
        )
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # A complete write replaces the directory.
    write_hf_dir(out, good.items(), spec, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_write_hf_dir_never_replaces_a_directory_that_is_not_an_hf_checkpoint(loaded, tmp_path):
    spec, model, _ = loaded
    good = export_to_hf(model, spec)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match=r"not an HF checkpoint directory \(checkpoints/, metrics.jsonl\)"):
        write_hf_dir(out, good.items(), spec, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        write_hf_dir(tmp_path / "file", good.items(), spec, dtype=torch.float32)
