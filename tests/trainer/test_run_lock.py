"""The output directory's lock: one writer, a clear refusal for a second, stale locks of dead processes taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest

from nemo_gdro.trainer.errors import RunLockedError
from nemo_gdro.trainer.run_lock import LOCK_NAME, RunLock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from nemo_gdro.trainer.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by pid {proc.pid} on .*choose another run\.output_dir"):
            RunLock(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup: the lock file stays behind
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = RunLock(tmp_path)
    assert any(f"stale lock of pid {proc.pid}" in str(w.message) for w in caught)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_lets_the_next_run_in_and_is_idempotent(tmp_path):
    with RunLock(tmp_path / "new" / "dir") as lock:
        assert lock.held and (tmp_path / "new" / "dir" / LOCK_NAME).is_file()
    lock.release()
    second = RunLock(tmp_path / "new" / "dir")
    second.release()


def test_one_process_cannot_lock_twice(tmp_path):
    first = RunLock(tmp_path)
    try:
        with pytest.raises(RunLockedError):
            RunLock(tmp_path)  # flock locks are per open file: a second open in the same process is refused too
    finally:
        first.release()
