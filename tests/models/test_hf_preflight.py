"""The HF directory checks made before anything is built, on real tiny checkpoints damaged one way per case."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from nemo_gdro.models.hf_preflight import (
    check_hf_checkpoint,
    check_hf_inputs,
    check_tokenizer_files,
    read_safetensors_header,
)
from nemo_gdro.typed_config import ConfigError
from tests.models.hf_damage import CASES, DOWN, INDEX, TOKENIZER_CASES, damaged_copy, shard_of

WEIGHT_CASES = sorted(set(CASES) - TOKENIZER_CASES)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_untied", "qwen2", "llama"])
def test_every_tiny_checkpoint_passes_and_gives_its_spec(tiny_dirs, name):
    spec = check_hf_checkpoint(tiny_dirs[name])
    assert spec.hf_architecture == name.split("_")[0]
    assert spec.tie_word_embeddings == (name == "qwen3")
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size) == (2, 32, 151_936)


def test_a_single_file_checkpoint_passes(tmp_path):
    pytest.importorskip("transformers")
    from nemo_gdro.testing.tiny_hf import build_tiny_hf

    src = build_tiny_hf(tmp_path / "one", arch="llama", max_shard_bytes=2**30, tokenizer=False)
    assert sorted(p.name for p in src.glob("*.safetensors")) == ["model.safetensors"]
    assert check_hf_checkpoint(src).hf_architecture == "llama"


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_each_damage_is_one_config_error_naming_the_file_and_tensor(tiny_dirs, tmp_path, case):
    directory, expected = damaged_copy(tiny_dirs["qwen3"], tmp_path / "ckpt", case)
    with pytest.raises(ConfigError) as info:
        check_hf_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, (text, message)


def test_header_is_read_without_the_data(tiny_dirs):
    """Headers only: checking a shard is independent of its size (the 19 MB embedding shard included)."""
    shard = shard_of(tiny_dirs["qwen3"], "model.embed_tokens.weight")
    start = time.perf_counter()
    header = read_safetensors_header(shard)
    assert time.perf_counter() - start < 0.5
    assert header["model.embed_tokens.weight"].shape == (151_936, 32)
    assert header["model.embed_tokens.weight"].dtype == "F32"


def test_a_tensor_the_index_does_not_list_is_named_with_its_shard(tiny_dirs, tmp_path):
    """The index is authoritative (as for the loader); a tensor only a shard holds is named in the error."""
    import json

    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["qwen3"], directory)
    index = json.loads((directory / INDEX).read_text())
    shard = index["weight_map"].pop(DOWN)
    (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"missing tensor '{DOWN}'.*{directory / shard} holds '{DOWN}' but "
                                          rf"{INDEX} does not list it"):
        check_hf_checkpoint(directory)


def test_quantized_weights_are_named_as_such(tiny_dirs, tmp_path):
    import torch

    from tests.models.hf_damage import resave_shard, weight_map

    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["qwen3"], directory)
    resave_shard(directory, weight_map(directory)[DOWN], lambda t: t.update({DOWN: t[DOWN].to(torch.float8_e4m3fn)}))
    with pytest.raises(ConfigError, match=rf"{shard_of(directory, DOWN)}: tensor '{DOWN}' has dtype F8_E4M3; weights "
                                          r"must be one of BF16, F16, F32, F64 \(quantized checkpoints are not"):
        check_hf_checkpoint(directory)


def test_tokenizer_files_missing_names_the_directory_and_the_files(tiny_dirs, tmp_path):
    directory, expected = damaged_copy(tiny_dirs["qwen3"], tmp_path / "ckpt", "no_tokenizer_files")
    check_hf_checkpoint(directory)  # the weights are fine
    with pytest.raises(ConfigError) as info:
        check_tokenizer_files(directory, key="model.path")
    for text in [*expected, "vocab.json + merges.txt", "tokenizer.model", "model.safetensors.index.json"]:
        assert text in str(info.value), (text, str(info.value))
    check_tokenizer_files(tiny_dirs["qwen3"])


def test_the_tokenizer_itself_refuses_a_directory_without_tokenizer_files(tiny_dirs):
    """Library callers of HFTokenizer get the same cause (not an empty vocabulary [0, 1))."""
    from nemo_gdro.data.hf_tokenizer import HFTokenizer

    with pytest.raises(ValueError, match=r"the tokenizer files are missing in .*llama: expected tokenizer.json"):
        HFTokenizer(tiny_dirs["llama"])  # built with tokenizer=False


def test_check_hf_inputs_follows_the_config(tiny_dirs, tmp_path):
    from nemo_gdro.trainer.config import load

    llama = tiny_dirs["llama"]  # weights, no tokenizer files
    check_hf_inputs(load(overrides=["model=hf", f"model.path={llama}"]))  # char tokenizer: no tokenizer files needed
    with pytest.raises(ConfigError, match=rf"^model.path={llama}: the tokenizer files are missing"):
        check_hf_inputs(load(overrides=["model=hf", f"model.path={llama}", "tokenizer.name=hf"]))
    with pytest.raises(ConfigError, match=r"^tokenizer.path=/nonexistent: no such directory"):
        check_hf_inputs(load(overrides=["model=hf", f"model.path={llama}", "tokenizer.name=hf",
                                        "tokenizer.path=/nonexistent"]))
    check_hf_inputs(load(overrides=["model=hf", f"model.path={llama}", "tokenizer.name=hf",
                                    f"tokenizer.path={tiny_dirs['qwen3']}"]))
    check_hf_inputs(load(overrides=["model.preset=tiny"]))  # nothing to check for a preset


def test_the_check_imports_no_torch(tiny_dirs):
    probe = (
        "import sys\n"
        "from nemo_gdro.models.hf_preflight import check_hf_checkpoint, check_tokenizer_files\n"
        "check_hf_checkpoint(sys.argv[1]); check_tokenizer_files(sys.argv[1])\n"
        "print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tiny_dirs["qwen3"])], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "heavy: []" in done.stdout, done.stdout
