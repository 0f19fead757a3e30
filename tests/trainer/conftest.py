"""A real tiny run shared by the export / eval tests (trained once per session; copy it before damaging it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.trainer.tiny_run import train_tiny_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run") / "run")


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`tiny_run` (a test that fails may destroy it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
