"""The checks made before anything is built: the CLI's ``check_launch`` and the trainer's own (library callers)."""

from __future__ import annotations

import pytest

from nemo_gdro.trainer.config import compose, load
from nemo_gdro.trainer.loop import Trainer
from nemo_gdro.trainer.preflight import check_launch
from nemo_gdro.typed_config import ConfigError
from tests.models.hf_damage import damaged_copy


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    pytest.importorskip("transformers")
    from nemo_gdro.testing.tiny_hf import build_tiny_hf

    return build_tiny_hf(tmp_path_factory.mktemp("preflight") / "qwen3", arch="qwen3", seed=7)


def _hf(path, out, *extra):
    return ["model=hf", f"model.path={path}", "tokenizer.name=hf", f"run.output_dir={out}", *extra]


@pytest.mark.parametrize("case, names", [
    ("truncated_shard", "model-00002-of-00002.safetensors"),
    ("wrong_shape", "model.embed_tokens.weight"),
    ("no_tokenizer_files", "tokenizer files are missing"),
])
def test_check_launch_refuses_a_damaged_checkpoint(tiny_qwen3, tmp_path, case, names):
    directory, expected = damaged_copy(tiny_qwen3, tmp_path / "ckpt", case)
    with pytest.raises(ConfigError, match=names) as info:
        check_launch(load(overrides=_hf(directory, tmp_path / "run")))
    assert all(text in str(info.value) for text in expected), str(info.value)


def test_check_launch_accepts_the_intact_checkpoint(tiny_qwen3, tmp_path):
    check_launch(load(overrides=_hf(tiny_qwen3, tmp_path / "run")))


def test_the_trainer_refuses_it_before_building_or_writing_anything(tiny_qwen3, tmp_path):
    """Library callers skip the CLI: the Trainer checks the directory before the lock, the data and the model."""
    directory, expected = damaged_copy(tiny_qwen3, tmp_path / "ckpt", "missing_tensor")
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        Trainer(compose(overrides=_hf(directory, out)))
    assert all(text in str(info.value) for text in expected), str(info.value)
    assert not out.exists()
