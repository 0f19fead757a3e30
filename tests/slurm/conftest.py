"""A private Slurm cluster for the tests in this directory (``make test-slurm``).

Installs Debian's ``slurm-wlm`` when it is missing. Where that is impossible
(no root or no apt) the tests are skipped with the reason, except under CI
(``CI`` or ``NEMO_GDRO_REQUIRE_SLURM=1``, which ``.ci/run`` sets), where a
missing cluster is a failure: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.slurm.cluster import LocalSlurm, ensure_slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    reason = ensure_slurm_installed()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("NEMO_GDRO_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    # A short path: slurmd puts unix sockets in its spool dir (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="nemo-gdro-slurm-", dir="/tmp"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        # NEMO_GDRO_SLURM_KEEP=1 keeps slurm.conf, daemon logs and state for a post-mortem.
        if os.environ.get("NEMO_GDRO_SLURM_KEEP") == "1":
            print(f"slurm cluster directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
