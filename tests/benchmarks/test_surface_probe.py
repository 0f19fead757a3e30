"""``benchmarks/surface_probe.py`` runs and every case of two groups holds (the whole probe is a benchmark)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_probe_groups_hold(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "surface_probe.py"), "--groups", "export,weights",
         "--out", str(tmp_path / "probe"), "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    totals = done.stdout.strip().splitlines()[-2]
    assert totals.startswith("cases 19 / held 19 / lost 0"), totals
