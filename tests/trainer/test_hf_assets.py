"""The HF model's tokenizer and config files kept with a checkpoint, and the stored config pointed at them
once the model folder is gone (real Qwen3 tokenizer files, a tiny real Qwen3 checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from nemo_gdro.data.hf_tokenizer import HFTokenizer
from nemo_gdro.models.sources import HFSource
from nemo_gdro.testing.tiny_hf import build_tiny_hf
from nemo_gdro.trainer.config import compose, load
from nemo_gdro.trainer.hf_assets import ASSETS_DIR, MARKER, asset_files, stands_for, with_assets
from nemo_gdro.trainer.resume_check import check_resume_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_hf(tmp_path_factory.mktemp("assets") / "qwen3", arch="qwen3", seed=1)


def _checkpoint_with_assets(cfg, tokenizer, step_dir):
    for name, src in asset_files(cfg.model, tokenizer).items():
        (step_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / name).write_bytes(src if isinstance(src, bytes) else src.read_bytes())


def test_asset_files_are_the_tokenizer_and_config_files_without_weights(model_dir):
    cfg = load(overrides=["model=hf", f"model.path={model_dir}", "tokenizer.name=hf"])
    files = asset_files(cfg.model, HFTokenizer(model_dir))
    names = {name.split("/", 1)[1] for name in files}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
            "config.json", MARKER} <= names
    assert all(name.startswith(f"{ASSETS_DIR}/") for name in files)
    assert not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names)
    assert json.loads(files[f"{ASSETS_DIR}/{MARKER}"])["model_path"] == str(model_dir)
    # The character tokenizer and a preset model have nothing to keep.
    assert asset_files(load(overrides=[]).model, object()) == {}


def test_the_stored_config_points_at_the_copy_once_the_model_folder_is_gone(model_dir, tmp_path):
    """Item 21.5: the tokenizer and the model's architecture load from the checkpoint's copy; no weights from it."""
    folder = tmp_path / "qwen3"
    shutil.copytree(model_dir, folder)
    cfg = load(overrides=["model=hf", f"model.path={folder}", "tokenizer.name=hf"])
    step = tmp_path / "step_00000001"
    _checkpoint_with_assets(cfg, HFTokenizer(folder), step)
    stored = OmegaConf.create(cfg.to_yaml())
    assert with_assets(stored, step) is stored  # nothing missing: the original folder is used

    shutil.rmtree(folder)
    with pytest.warns(UserWarning, match=r"model folder this checkpoint was trained from is gone \(tokenizer.path="):
        moved = with_assets(stored, step)
    assert moved.model.path == moved.tokenizer.path == str(step / ASSETS_DIR)
    tokenizer = HFTokenizer(moved.tokenizer.path)
    assert tokenizer.vocab_size == HFTokenizer(model_dir).vocab_size and tokenizer.stop_ids == {151643, 151645}
    init = HFSource.build(moved.model, tokenizer)
    assert init.weights_dir is None and init.spec.vocab_size == 151936
    # The resume / eval check reads the copy as the same folder; another folder is still a change.
    changes = check_resume_config(cfg.to_yaml(), compose(overrides=[
        "model=hf", f"model.path={moved.model.path}", "tokenizer.name=hf", f"tokenizer.path={moved.tokenizer.path}"]),
        [], "ckpt")
    assert {c.kind for c in changes} == {"same_path"}
    assert stands_for(moved.model.path, str(folder)) and not stands_for(moved.model.path, "/elsewhere")
    assert not stands_for(str(model_dir), str(model_dir))


def test_without_a_copy_the_missing_folder_is_named(tmp_path):
    stored = compose(overrides=["model=hf", f"model.path={tmp_path / 'gone'}", "tokenizer.name=hf"])
    assert with_assets(stored, tmp_path / "step_00000001") is stored
