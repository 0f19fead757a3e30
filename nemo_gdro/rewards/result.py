"""The outcome of verifying one batch of responses.

torch is imported when a result is built, not at import time: pool worker
processes import the status codes and never need torch (seconds of start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Per-row status codes in ``VerifyResult.status``.
STATUS_OK = 0
STATUS_TIMEOUT = 1  # ran past its deadline (soft or hard): scored wrong
STATUS_FAILURE = 2  # the verifier raised, or its worker process died: scored wrong


@dataclass(frozen=True)
class VerifyResult:
    """Row-aligned verification outcome.

    correct: bool ``[R]``; a timed-out or failed row is ``False``.
    status: int8 ``[R]`` (``STATUS_OK`` / ``STATUS_TIMEOUT`` / ``STATUS_FAILURE``).
    timeouts / failures: number of rows with that status.
    wall_s: seconds of wall time spent in ``verify_batch``.
    worker_restarts: worker processes replaced in this batch (after a timeout, a failure or a death).
    """

    correct: torch.Tensor
    status: torch.Tensor
    timeouts: int
    failures: int
    wall_s: float
    worker_restarts: int = 0

    @classmethod
    def from_rows(cls, correct: list[bool], status: list[int], wall_s: float, worker_restarts: int = 0) -> VerifyResult:
        import torch

        st = torch.tensor(status, dtype=torch.int8)
        return cls(
            correct=torch.tensor(correct, dtype=torch.bool),
            status=st,
            timeouts=int((st == STATUS_TIMEOUT).sum()),
            failures=int((st == STATUS_FAILURE).sum()),
            wall_s=float(wall_s),
            worker_restarts=int(worker_restarts),
        )

    def rewards(self, correct_reward: float, wrong_reward: float) -> torch.Tensor:
        """float32 ``[R]``: ``correct_reward`` where correct, else ``wrong_reward``."""
        import torch

        hi = torch.tensor(float(correct_reward), dtype=torch.float32)
        lo = torch.tensor(float(wrong_reward), dtype=torch.float32)
        return torch.where(self.correct, hi, lo)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Scalars for the step metrics (``reward/timeouts``, ``reward/failures``, ...)."""
        n = max(int(self.correct.numel()), 1)
        return {
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}failures": float(self.failures),
            f"{prefix}timeout_frac": self.timeouts / n,
            f"{prefix}verify_s": self.wall_s,
            f"{prefix}worker_restarts": float(self.worker_restarts),
        }
