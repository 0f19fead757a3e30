"""``nemo-gdro export`` and ``eval`` as a hostile user drives them (issue 21, items 1 and 4).

Each export case runs the CLI on a private copy of a real tiny run and checks
the exit code, a one-line message naming the cause, and that the run and the
target are byte for byte what they were (a refused export writes nothing).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from nemo_gdro.cli import main
from nemo_gdro.testing.tiny_hf import build_tiny_hf
from tests.trainer.tiny_run import hold_lock, snapshot, train_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("export_eval") / "run")


def _foreign(tmp: Path, run: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return tmp / "mine"


def _file(tmp: Path, run: Path) -> Path:
    (tmp / "weights.bin").write_text("keep me")
    return tmp / "weights.bin"


def _under_file(tmp: Path, run: Path) -> Path:
    return _file(tmp, run) / "out"


# case -> (target from (tmp_path, run), extra args, exit code, text the one-line message must hold)
EXPORT_CASES: dict[str, tuple[Callable[[Path, Path], Path | str], list[str], int, str]] = {
    "into the run dir": (lambda t, r: r, [], 2, "is a training run or checkpoint directory"),
    "into the run dir, --overwrite": (lambda t, r: r, ["--overwrite"], 2, "is a training run or checkpoint directory"),
    "into checkpoints/": (lambda t, r: r / "checkpoints", [], 2, "which is a training run"),
    "into the step dir": (lambda t, r: r / "checkpoints" / "step_00000001", [], 2, "training run or checkpoint"),
    "into an older step dir": (lambda t, r: r / "checkpoints" / "step_00000000", [], 2, "training run or checkpoint"),
    "into a new dir inside the run": (lambda t, r: r / "export", [], 2, "which is a training run"),
    "into the run's parent": (lambda t, r: r.parent, ["--overwrite"], 2, "holds the checkpoint being exported"),
    "into a non-empty unrelated dir": (_foreign, ["--overwrite"], 2, "is not empty and is not an HF checkpoint (notes.txt)"),
    "onto a file": (_file, [], 2, "is an existing file"),
    "under a file": (_under_file, [], 2, "is a file, not a directory"),
    # Root ignores file modes; /proc refuses new entries to everyone.
    "into a read-only place": (lambda t, r: "/proc/nemo_gdro_export", [], 2, "/proc is not writable"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES), ids=list(EXPORT_CASES))
def test_export_refuses_what_would_destroy_data(case, tiny_run, tmp_path, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    make_target, extra, code, expected = EXPORT_CASES[case]
    target = Path(make_target(tmp_path, run))
    before = snapshot(tmp_path)
    assert main(["export", str(run), str(target), *extra]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("nemo-gdro export: ") and expected in err and "\n" not in err, err
    assert snapshot(tmp_path) == before


def test_repeated_export_needs_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(tiny_run), str(out)]) == 0
    first = snapshot(out)
    assert main(["export", str(tiny_run), str(out), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a previous nemo-gdro export: pass --overwrite" in err and "\n" not in err
    assert snapshot(out) == first
    assert main(["export", str(tiny_run), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert '"dtype": "bfloat16"' in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_eval_of_an_hf_dir_with_the_default_config_names_the_task_keys(tmp_path, capsys):
    qwen = build_tiny_hf(tmp_path / "qwen3", arch="qwen3", seed=11)
    capsys.readouterr()  # the builder's progress bar
    assert main(["eval", str(qwen), "eval.k=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data=math data.train_files=[FILE] +data.eval_files.<benchmark>=[FILE]" in err and "\n" not in err, err


def test_eval_of_a_run_that_is_still_training(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    holder = hold_lock(tiny_run)  # the run's own output_dir, as its live trainer holds it
    try:
        before = snapshot(tiny_run)
        assert main(["eval", str(tiny_run), "eval.k=1"]) == 0
        assert "pooled" in capsys.readouterr().out
        assert snapshot(tiny_run) == before and not list(tmp_path.iterdir())
    finally:
        holder.kill()
        holder.wait()
