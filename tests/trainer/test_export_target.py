"""Where ``nemo-gdro export`` may write: every target that would destroy data is refused before anything is loaded."""

from __future__ import annotations

import os
import shutil

import pytest

from nemo_gdro.models.hf_export_marker import EXPORT_MARKER
from nemo_gdro.trainer.export_target import check_export_target, run_content
from nemo_gdro.typed_config import ConfigError


def _step(run):
    return sorted((run / "checkpoints").glob("step_*"))[-1]


@pytest.mark.parametrize("where", ["", "checkpoints", "checkpoints/step_00000001", "checkpoints/step_00000000",
                                   "plots", "metrics.jsonl", "new_sub_dir", "checkpoints/step_00000001/new"])
def test_a_run_dir_and_anything_inside_it_is_refused(tiny_run, where):
    target = tiny_run / where if where else tiny_run
    assert run_content(target) is not None
    with pytest.raises(ConfigError, match="training run or checkpoint directory") as info:
        check_export_target(target, checkpoint=_step(tiny_run))
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_a_directory_above_the_checkpoint_is_refused(tiny_run):
    with pytest.raises(ConfigError, match="holds the checkpoint being exported"):
        check_export_target(tiny_run.parent, checkpoint=_step(tiny_run))


def test_the_runs_sources_are_refused(tmp_path, tiny_run):
    model = tmp_path / "Qwen3-Base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for target in (model, model / "export"):
        with pytest.raises(ConfigError, match=r"overlaps model.path="):
            check_export_target(target, checkpoint=_step(tiny_run), sources=[("model.path", str(model))], overwrite=True)


def test_a_new_or_empty_directory_is_accepted(tmp_path, tiny_run):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "a" / "b" / "new"):
        assert check_export_target(target, checkpoint=_step(tiny_run)) == target
    assert not (tmp_path / "a").exists()  # checking creates nothing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_foreign_directory_is_refused_even_with_overwrite(tmp_path, tiny_run):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "mine" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not empty and is not an HF checkpoint \(notes.txt\)"):
        check_export_target(tmp_path / "mine", checkpoint=_step(tiny_run), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_previous_export_needs_overwrite(tmp_path, tiny_run):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "model.safetensors", EXPORT_MARKER):
        (out / name).write_text("{}")
    with pytest.raises(ConfigError, match="already holds a previous nemo-gdro export: pass --overwrite"):
        check_export_target(out, checkpoint=_step(tiny_run))
    assert check_export_target(out, checkpoint=_step(tiny_run), overwrite=True) == out


def test_a_file_and_unwritable_places_are_one_line(tmp_path, tiny_run):
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "file", "is an existing file"),
        (tmp_path / "file" / "out", "is a file, not a directory"),
        # /proc refuses new entries to everyone, root included (chmod does not stop root).
        ("/proc/nemo_gdro_export_test", "/proc is not writable"),
    ]
    for target, expected in cases:
        with pytest.raises(ConfigError, match=expected) as info:
            check_export_target(target, checkpoint=_step(tiny_run))
        assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0555 directory; /proc covers it above")
def test_a_read_only_parent_is_refused(tmp_path, tiny_run):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_export_target(parent / "out", checkpoint=_step(tiny_run))
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent)
