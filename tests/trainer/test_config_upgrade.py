"""``upgrade_saved_config``: a checkpoint's config written before keys were renamed or added reads with today's keys;
``nemo-gdro eval`` of such a real checkpoint works, while ``run.resume`` still refuses the difference."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from nemo_gdro.stages.setup import MOVED_KEYS, RETIRED_KEYS
from nemo_gdro.trainer.checkpoint import CONFIG_NAME, MANIFEST_NAME, CheckpointManager
from nemo_gdro.trainer.config import compose, validate
from nemo_gdro.trainer.config_upgrade import describe, upgrade_saved_config, upgraded_keys
from nemo_gdro.trainer.resume_check import check_resume_config
from nemo_gdro.typed_config import ConfigError


def _old_form(tree: DictConfig, ratio: float = 0.5, staleness: int = 3) -> DictConfig:
    """``tree`` as an earlier version wrote it: replay under algorithm.r2vpo, no prompt_skip, no epochs_per_batch."""
    old = OmegaConf.create(OmegaConf.to_container(tree, resolve=True))
    OmegaConf.set_struct(old, False)
    old.algorithm.pop("prompt_skip")
    old.algorithm.pop("replay")
    old.algorithm.r2vpo.replay_ratio = ratio
    old.algorithm.r2vpo.staleness = staleness
    old.trainer.pop("epochs_per_batch")
    return old


@pytest.fixture(scope="module")
def defaults() -> DictConfig:
    return compose("train")


def test_moved_keys_are_the_renames_among_retired_keys():
    assert MOVED_KEYS == {"algorithm.r2vpo.replay_ratio": "algorithm.replay.ratio",
                          "algorithm.r2vpo.staleness": "algorithm.replay.staleness"}
    for old, new in MOVED_KEYS.items():
        assert RETIRED_KEYS[old].startswith(f"use {new} ")


def test_an_old_config_upgrades_to_one_that_validates_with_its_values(defaults):
    saved = _old_form(compose("train", ["algorithm.r2vpo.delta=0.07"]))
    with pytest.raises(ConfigError):
        validate(saved)
    before = OmegaConf.to_yaml(saved)
    up, notes = upgrade_saved_config(saved, defaults)
    assert OmegaConf.to_yaml(saved) == before  # the input is not modified
    cfg = validate(up)
    assert (cfg.algorithm.replay.ratio, cfg.algorithm.replay.staleness) == (0.5, 3)  # saved values, new names
    assert cfg.algorithm.r2vpo.delta == 0.07  # everything else as saved
    assert "replay_ratio" not in up.algorithm.r2vpo and "staleness" not in up.algorithm.r2vpo
    assert up.algorithm.prompt_skip == defaults.algorithm.prompt_skip and cfg.trainer.epochs_per_batch == 1
    assert notes == ["algorithm.r2vpo.replay_ratio -> algorithm.replay.ratio",
                     "algorithm.r2vpo.staleness -> algorithm.replay.staleness",
                     "algorithm.prompt_skip", "trainer.epochs_per_batch"]
    assert upgraded_keys(notes) == ["algorithm.r2vpo.replay_ratio", "algorithm.replay.ratio", "algorithm.r2vpo.staleness",
                                    "algorithm.replay.staleness", "algorithm.prompt_skip", "trainer.epochs_per_batch"]
    line = describe(notes, "ckpt")
    assert "\n" not in line and "renamed algorithm.r2vpo.replay_ratio -> algorithm.replay.ratio" in line
    assert "filled with today's defaults algorithm.prompt_skip, trainer.epochs_per_batch" in line


def test_a_missing_leaf_is_filled_and_a_current_config_is_left_alone(defaults):
    saved = OmegaConf.create(OmegaConf.to_container(defaults, resolve=True))
    up, notes = upgrade_saved_config(saved, defaults)
    assert notes == [] and up == saved
    saved.algorithm.prompt_gdro.pop("normalize_over")
    up, notes = upgrade_saved_config(saved, defaults)
    assert notes == ["algorithm.prompt_gdro.normalize_over"]
    assert up.algorithm.prompt_gdro.normalize_over == defaults.algorithm.prompt_gdro.normalize_over


def test_only_the_feature_sections_are_filled(defaults):
    """An absent key elsewhere can mean something (model.*, data.*): it stays absent and validation names it."""
    saved = OmegaConf.create(OmegaConf.to_container(defaults, resolve=True))
    OmegaConf.set_struct(saved, False)
    saved.trainer.pop("max_steps")
    up, notes = upgrade_saved_config(saved, defaults)
    assert notes == [] and "max_steps" not in up.trainer


def test_a_config_with_both_names_keeps_the_new_one(defaults):
    saved = OmegaConf.create(OmegaConf.to_container(defaults, resolve=True))
    OmegaConf.set_struct(saved, False)
    saved.algorithm.replay.ratio = 0.25
    saved.algorithm.r2vpo.replay_ratio = 0.5
    up, notes = upgrade_saved_config(saved, defaults)
    assert up.algorithm.replay.ratio == 0.25 and "replay_ratio" not in up.algorithm.r2vpo
    assert notes == ["algorithm.r2vpo.replay_ratio -> algorithm.replay.ratio"]


# ------------------------------------------------------------------ a real checkpoint
@pytest.fixture(scope="module")
def old_checkpoint(tiny_run: Path, tmp_path_factory) -> Path:
    """The tiny run's newest checkpoint with its config.yaml rewritten to the old form (manifest entry updated)."""
    src = CheckpointManager(tiny_run / "checkpoints").latest()
    step = tmp_path_factory.mktemp("old_ckpt") / src.name
    shutil.copytree(src, step)
    tree = OmegaConf.load(step / CONFIG_NAME)
    # The run's own replay values (replay was off), under the old names.
    data = OmegaConf.to_yaml(_old_form(tree, tree.algorithm.replay.ratio, tree.algorithm.replay.staleness)).encode()
    (step / CONFIG_NAME).write_bytes(data)
    manifest = json.loads((step / MANIFEST_NAME).read_text())
    manifest["files"][CONFIG_NAME] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return step


def test_eval_of_an_old_checkpoint_works_and_names_the_keys_once(old_checkpoint, capsys):
    from nemo_gdro.trainer.eval_run import evaluate_target

    metrics = evaluate_target(old_checkpoint, ["eval.k=1"])
    assert {"eval/pass@1", "eval/mean@k"} <= metrics.keys()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "today's keys" in ln]
    assert len(lines) == 1
    assert str(old_checkpoint) in lines[0] and "algorithm.r2vpo.staleness -> algorithm.replay.staleness" in lines[0]
    assert "algorithm.prompt_skip" in lines[0] and "trainer.epochs_per_batch" in lines[0]


def test_eval_keeps_the_users_allow_list_and_overrides(old_checkpoint):
    from nemo_gdro.trainer.eval_run import _config_for

    lines: list[str] = []
    cfg, ckpt = _config_for(old_checkpoint, ["eval.k=1", "run.allow_config_change=[seed]"], "train", log=lines.append)
    assert ckpt == old_checkpoint and cfg.eval.k == 1 and len(lines) == 1
    assert cfg.run.allow_config_change[0] == "seed" and "algorithm.prompt_skip" in cfg.run.allow_config_change


def test_resume_still_refuses_the_old_config_and_names_the_keys(old_checkpoint, tiny_run):
    """Training on from an old checkpoint is a config change (refused unless allowed), not an upgrade."""
    tree = OmegaConf.load(tiny_run / "checkpoints" / old_checkpoint.name / CONFIG_NAME)
    with pytest.raises(ConfigError, match=r"run.allow_config_change=\[.*algorithm.prompt_skip.adapt.*algorithm.r2vpo"):
        check_resume_config(CheckpointManager.read_config(old_checkpoint), tree, [], str(old_checkpoint))


def test_resume_names_the_new_key_with_the_saved_value_of_a_renamed_one(defaults):
    old = _old_form(defaults, 0.5, 3)
    with pytest.raises(ConfigError, match=r"renamed since .*also give algorithm.replay.ratio=0.5 algorithm.replay.staleness=3$"):
        check_resume_config(OmegaConf.to_yaml(old), defaults, [], "ckpt")
    # Without a renamed key there is no such hint.
    current = OmegaConf.create(OmegaConf.to_container(defaults, resolve=True))
    current.algorithm.r2vpo.delta = 0.5
    with pytest.raises(ConfigError) as err:
        check_resume_config(OmegaConf.to_yaml(defaults), current, [], "ckpt")
    assert "renamed" not in str(err.value)
