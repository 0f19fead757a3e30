"""The input-file checks made before anything is built: every problem named with its key, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from nemo_gdro.trainer.config import load
from nemo_gdro.trainer.input_check import check_inputs, data_file_problem, hf_problem, input_problems
from nemo_gdro.typed_config import ConfigError
from tests.data.fixtures import write_benchmark, write_plain


def _hf_cfg(path):
    return SimpleNamespace(model=SimpleNamespace(source="hf", path=path), tokenizer=SimpleNamespace(name="hf", path=None))


def test_model_folder_problems(tmp_path):
    assert hf_problem(_hf_cfg(None)) == "model.path is not set (a Hugging Face checkpoint directory)"
    assert "no such directory" in hf_problem(_hf_cfg(str(tmp_path / "x")))
    (tmp_path / "config.json").write_text("{}")
    assert "is a file" in hf_problem(_hf_cfg(str(tmp_path / "config.json")))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert "no config.json" in hf_problem(_hf_cfg(str(bare)))
    assert hf_problem(SimpleNamespace(model=SimpleNamespace(source="preset"), tokenizer=SimpleNamespace(name="char"))) is None


def test_data_file_problems_name_the_key_and_where_a_relative_path_points(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_plain(tmp_path / "plain.jsonl", 3)
    assert data_file_problem("data.train_files[0]", "plain.jsonl") is None
    assert data_file_problem("k", "nope.parquet") == f"k=nope.parquet (= {tmp_path}/nope.parquet): does not exist"
    assert data_file_problem("k", str(tmp_path)) == f"k={tmp_path}: is a directory, not a data file"
    # the file is a training file, not a MATH-500 one
    problem = data_file_problem("data.eval_files.math500[0]", "plain.jsonl", benchmark="math500")
    assert problem.startswith(f"data.eval_files.math500[0]=plain.jsonl (= {tmp_path}/plain.jsonl): not a math500 file")
    # a forced layout still needs a readable header
    (tmp_path / "empty.csv").write_text("")
    assert "cannot read as CSV" in data_file_problem("k", "empty.csv", layout="plain")


def test_every_problem_in_config_order_and_one_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    math500 = write_benchmark("math500", tmp_path / "m.jsonl", num=2).path
    cfg = load(overrides=[
        "+recipe=qwen3_0p6b_dapo", "model.path=absent_model", "model.dtype=float32", "rollout.engine=hf",
        "data.train_files=[a.txt,m.jsonl]", f"++data.eval_files.math500=[{math500},absent.jsonl]",
    ])
    problems = input_problems(cfg)
    assert [p.split("=", 1)[0] for p in problems] == [
        "model.path", "data.train_files[0]", "data.train_files[1]", "data.eval_files.math500[1]"
    ]
    assert "cannot tell the data layout" in problems[2]  # a MATH-500 file given as training data
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg)
    assert str(info.value).startswith(f"4 input file problems: model.path={tmp_path}/absent_model") and "\n" not in str(info.value)
    assert input_problems(load()) == []  # the arithmetic task reads no files


def test_the_checks_import_no_torch(tmp_path):
    probe = (
        "import sys\n"
        "from nemo_gdro.trainer.config import load\n"
        "from nemo_gdro.trainer.input_check import input_problems\n"
        f"cfg = load(overrides=['+recipe=qwen3_0p6b_dapo', 'model.path={tmp_path}', 'model.dtype=float32',\n"
        f"    'rollout.engine=hf', 'data.train_files=[{tmp_path}/t.parquet]', '++data.eval_files.gpqa_diamond=[x.csv]'])\n"
        "assert len(input_problems(cfg)) == 3\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
