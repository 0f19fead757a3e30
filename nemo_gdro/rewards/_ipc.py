"""Length-prefixed pickle frames over raw pipe file descriptors (pool <-> worker).

Both ends are this package (the parent starts the worker), so pickle is safe
here. Results are small and written with one ``os.write`` (atomic below
``PIPE_BUF``); tasks may be large and are written in a loop.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

_HEADER = struct.Struct("<Q")
# A worker reply status beyond the VerifyResult codes: check() raised GroundTruthError (re-raised by the pool).
REPLY_GROUND_TRUTH_ERROR = 3


class PipeClosed(Exception):
    """The other end closed the pipe (process exited or was killed)."""


def write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise PipeClosed(f"pipe fd {fd} closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """The next object; raises :class:`PipeClosed` at end of file."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, size))
