"""One writer per output directory: an exclusive lock held by rank 0 for the whole run.

``<output_dir>/.nemo_gdro.lock`` is locked with ``flock(LOCK_EX | LOCK_NB)``
and holds the owner's pid, host and start time (JSON). The kernel drops the
lock when its process dies (even by ``kill -9``), so a lock file left by a dead
run is stale by construction: the next run takes it over and says so. A second
live writer is refused with a message naming the holder.

Filesystems without ``flock`` (some network mounts) fall back to the file's
content: a lock whose pid is alive on this host is honoured, one whose pid is
gone is removed as stale; a lock held from another host cannot be checked and
is honoured (delete the file by hand if that run is gone).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from nemo_gdro.trainer.errors import RunLockedError

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".nemo_gdro.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {when})"


class RunLock:
    """The exclusive lock of one output directory (created if missing); release with :meth:`release`.

    Raises:
        RunLockedError: another live process holds it.
    """

    def __init__(self, output_dir: Path | str) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd, me)
            except BaseException:
                os.close(fd)
                raise
            # A releasing owner unlinks the file: a lock on that old inode is worthless, take the new file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - a pathological unlink race
            raise RunLockedError(f"{self.path}: could not take the lock (the file keeps being replaced)")
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        os.fsync(fd)

    def _flock(self, fd: int, me: dict[str, Any]) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(_read(self.path)) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._pid_file_fallback(me)
            return
        previous = _read(self.path)
        if previous and previous.get("pid") != me["pid"]:
            warnings.warn(
                f"{self.path}: removed the stale lock of {_describe(previous)}, which is no longer running",
                stacklevel=3,
            )

    def _pid_file_fallback(self, me: dict[str, Any]) -> None:
        holder = _read(self.path)
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != me["pid"]:
            if holder.get("host") != me["host"] or _pid_alive(pid):
                raise self._refusal(holder)
            warnings.warn(f"{self.path}: removed the stale lock of {_describe(holder)}", stacklevel=3)

    def _refusal(self, holder: dict[str, Any]) -> RunLockedError:
        return RunLockedError(
            f"{self.output_dir} is in use by {_describe(holder)}: one run writes a directory at a time. Wait for "
            "it to finish, stop it, or choose another run.output_dir / run.name"
        )

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and remove the lock file (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Remove first, while still holding the lock, so no one locks a file that is about to vanish.
            if _read(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
