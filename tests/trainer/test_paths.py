"""Input paths are stored absolute: the config a checkpoint keeps names the same files from any directory."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from nemo_gdro.trainer.config import compose, load
from nemo_gdro.trainer.paths import is_path_key, resolve_input_paths, same_path_value
from nemo_gdro.typed_config import ConfigError


def test_relative_input_paths_are_resolved_once_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(overrides=[
        "model=hf", "model.path=models/qwen3", "tokenizer.name=hf", "tokenizer.path=./tok", "run.resume=ckpt/step_00000002",
        "data=math", "reward.verifier=dapo_math", "sft.steps=0", "data.train_files=[a.parquet,/abs/b.jsonl]",
        "+data.eval_files.math500=m.jsonl", "+data.eval_files.aime24=[x/aime.parquet]",
    ])
    assert cfg.model.path == str(tmp_path / "models" / "qwen3")
    assert cfg.tokenizer.path == str(tmp_path / "tok")
    assert cfg.run.resume == str(tmp_path / "ckpt" / "step_00000002")
    assert list(cfg.data.train_files) == [str(tmp_path / "a.parquet"), "/abs/b.jsonl"]
    assert cfg.data.eval_files == {"math500": str(tmp_path / "m.jsonl"), "aime24": [str(tmp_path / "x" / "aime.parquet")]}
    # What a checkpoint stores (config.yaml) holds the absolute paths too.
    stored = OmegaConf.create(cfg.to_yaml())
    assert stored.model.path == cfg.model.path and list(stored.data.train_files)[0] == str(tmp_path / "a.parquet")
    # Loading the stored config elsewhere keeps them.
    monkeypatch.chdir("/")
    assert load(overrides=[]).run.resume == "auto"
    again = resolve_input_paths(stored)
    assert again.model.path == cfg.model.path and again.data.eval_files.math500 == str(tmp_path / "m.jsonl")


def test_words_and_missing_values_are_left_alone():
    assert load(overrides=["run.resume=auto"]).run.resume == "auto"
    assert load(overrides=["run.resume=null"]).run.resume is None
    assert load(overrides=[]).tokenizer.path is None
    with pytest.raises(ConfigError, match="model.source=hf needs model.path"):
        load(overrides=["model=hf", "model.path=''"])
    with pytest.raises(ConfigError, match="data.train_files must be a list, got '\\?\\?\\?'"):
        load(overrides=["data=math"])
    tree = resolve_input_paths(compose(overrides=["model=hf"]))
    assert OmegaConf.is_missing(tree.model, "path")  # the mandatory value not given stays so (named when used)


def test_same_path_value_compares_the_files_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    assert same_path_value(["data/a.parquet"], [str(tmp_path / "data" / "a.parquet")], "data.train_files")
    assert same_path_value("data/a.parquet", str(tmp_path / "link" / "a.parquet"), "model.path")
    assert not same_path_value(["data/a.parquet"], ["data/b.parquet"], "data.train_files")
    assert not same_path_value(["a", "b"], ["a"], "data.train_files")
    assert not same_path_value(None, "a", "tokenizer.path")
    assert is_path_key("data.eval_files.aime24") and is_path_key("model.path") and not is_path_key("data.seed")
