"""A soft wall-clock deadline for Python code running in the main thread.

``soft_deadline(s)`` arms ``ITIMER_REAL``; when it fires, the ``SIGALRM``
handler raises :class:`VerificationTimeout` at the next bytecode boundary of
the main thread. It interrupts sympy / math-verify loops (the usual way a
pathological answer stalls) but not a long C call that holds the GIL (a huge
integer power, a regex backtracking): only killing the process stops those,
which is what :mod:`nemo_gdro.rewards.pool` does with its hard deadline.

``VerificationTimeout`` derives from ``BaseException`` on purpose: math-verify
and sympy catch ``Exception`` broadly, and the timeout must pass through them.
Deadlines nest (the inner one is ``min(outer, inner)``). Off the main thread
signals cannot be used, and ``soft_deadline`` is a no-op there.

math-verify's own timeouts use ``signal.alarm`` -- the same timer -- so callers
inside a ``soft_deadline`` must pass ``None`` as math-verify's timeouts.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class VerificationTimeout(BaseException):
    """An item ran past its soft deadline (counted as a timeout, scored wrong)."""


_active_deadline: float | None = None  # absolute time.monotonic() of the innermost deadline


def _raise_timeout(signum: int, frame: object) -> None:
    raise VerificationTimeout("verification soft deadline exceeded")


def signals_usable() -> bool:
    """Whether ``soft_deadline`` can interrupt the calling thread."""
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


@contextmanager
def soft_deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`VerificationTimeout` in the body after ``seconds`` (wall clock).

    ``None`` or a call off the main thread: no deadline.
    """
    global _active_deadline
    if seconds is None or not signals_usable():
        yield
        return
    if seconds <= 0:
        raise ValueError(f"soft_deadline seconds must be > 0, got {seconds}")
    outer = _active_deadline
    now = time.monotonic()
    deadline = now + seconds if outer is None else min(outer, now + seconds)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    _active_deadline = deadline
    signal.setitimer(signal.ITIMER_REAL, max(deadline - now, 1e-4))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        _active_deadline = outer
        signal.signal(signal.SIGALRM, previous)
        if outer is not None:
            # Re-arm the enclosing deadline; an already-expired one fires at once.
            signal.setitimer(signal.ITIMER_REAL, max(outer - time.monotonic(), 1e-4))
