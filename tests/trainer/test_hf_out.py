"""``export_checkpoint``: a marked HF directory, replaced only when asked, never anything else."""

from __future__ import annotations

import json

import pytest

from nemo_gdro.models.hf_export_marker import EXPORT_MARKER
from nemo_gdro.trainer.hf_out import export_checkpoint
from nemo_gdro.typed_config import ConfigError
from tests.trainer.tiny_run import snapshot


def test_export_is_marked_and_replaced_only_with_overwrite(tiny_run, tmp_path):
    before = snapshot(tiny_run)
    out = tmp_path / "hf"
    export_checkpoint(tiny_run, out)
    marker = json.loads((out / EXPORT_MARKER).read_text())
    step_dir = sorted((tiny_run / "checkpoints").glob("step_*"))[-1]
    assert marker["source"] == str(step_dir.resolve()) and marker["step"] == 1
    assert (marker["tokenizer"], marker["task"]) == ("char", "arithmetic")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    first = (out / "model.safetensors").read_bytes()

    with pytest.raises(ConfigError, match="already holds a previous nemo-gdro export: pass --overwrite"):
        export_checkpoint(tiny_run, out, dtype="bfloat16")
    assert (out / "model.safetensors").read_bytes() == first
    export_checkpoint(tiny_run, out, dtype="bfloat16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp sibling left
    assert snapshot(tiny_run) == before


def test_export_into_the_run_is_refused_before_loading(run_copy):
    before = snapshot(run_copy)
    for target in (run_copy, run_copy / "checkpoints", run_copy / "hf_export"):
        with pytest.raises(ConfigError, match="training run or checkpoint directory"):
            export_checkpoint(run_copy, target, overwrite=True)
    assert snapshot(run_copy) == before
