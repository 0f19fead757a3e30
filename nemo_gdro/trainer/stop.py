"""SIGTERM / SIGINT: stop at the next step boundary with a checkpoint, or at once on a second signal.

Slurm sends SIGTERM to every task of a job step at preemption, ``scancel``
and the time limit (then SIGKILL after ``KillWait``); Ctrl-C sends SIGINT.
While the RL loop runs, the first signal only sets a flag: the current step
finishes, every rank agrees on the flag (one all-reduce per step, so all
ranks stop after the same step), a checkpoint is written and the run ends
with :class:`~nemo_gdro.trainer.errors.RunInterrupted` (exit code 128 +
signal). A second signal, or a signal outside the RL loop (the warm start,
which has no checkpoint to write before it ends), abandons the work at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

from nemo_gdro.parallel import comm
from nemo_gdro.trainer.errors import RunInterrupted

__all__ = ["StopSignals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"


class StopSignals:
    """Installs the handlers (main thread only) and tells the loop when to stop.

    ``deferrable``: whether a first signal may wait for the step boundary
    (set by the loop around the RL steps). ``describe_now``: a callable giving
    what the run is doing, for the message printed when the signal arrives.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferrable = False
        self.describe_now: Any = lambda: "the current step"
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None or not self.deferrable:
            again = "a second " if self.signum is not None else ""
            raise RunInterrupted(
                f"stopped by {again}{_name(signum)} during {self.describe_now()}: abandoned without a new checkpoint",
                signum,
            )
        self.signum = signum
        print(
            f"[nemo-gdro] {_name(signum)} received: finishing {self.describe_now()}, then writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self) -> int | None:
        """The signal any rank received (collective over every rank; the same answer everywhere)."""
        local = float(self.signum or 0)
        if comm.group_size() == 1:
            return self.signum
        import torch.distributed as dist

        got = int(comm.all_reduce(torch.tensor([local], dtype=torch.float64), op=dist.ReduceOp.MAX)[0])
        return got or None

    @staticmethod
    def name(signum: int) -> str:
        return _name(signum)
