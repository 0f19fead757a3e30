"""benchmarks/vs_trl.py --quick: a toy nemo_gdro / TRL pair, only where TRL's venv exists (`make setup-trl`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRL_PYTHON = REPO / ".venv-trl" / "bin" / "python"


def test_quick_pair_runs_both_systems_and_prints_the_table(tmp_path):
    if not TRL_PYTHON.is_file():
        pytest.skip(f"TRL's venv is missing ({TRL_PYTHON}): `make setup-trl` creates it")
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vs_trl.py"), "--quick",
         "--work-dir", str(tmp_path / "work"), "--results-dir", str(results)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| system | step s | generation s | training s | generated tok/s | peak RSS GiB |" in out
    assert "| nemo_gdro |" in out and "| TRL |" in out and "| ratio nemo/TRL, per pair |" in out
    report = json.loads((tmp_path / "work" / "summary.json").read_text())
    runs = {r["system"]: r for r in report["runs"]}
    assert set(runs) == {"nemo_gdro", "TRL"}
    for run in runs.values():
        assert len(run["steps"]) == 2 and len(run["kept"]) == 1  # --quick: 2 steps, the first dropped
        step = run["kept"][0]
        assert step["step_s"] > step["generate_s"] > 0 and step["tokens"] > 0
        assert run["peak_rss_gib"] > 0.1
    # the same work: 1 prompt x 8 rollouts x at most 16 new tokens each
    assert all(0 < r["kept"][0]["tokens"] <= 8 * 16 for r in runs.values())
    assert not results.exists()  # --quick never writes benchmarks/results


def test_missing_trl_venv_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vs_trl.py"), "--quick", "--trl-python", str(tmp_path / "none"),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "make setup-trl" in proc.stderr and str(tmp_path / "none") in proc.stderr
    assert not (tmp_path / "work").exists()
