"""What every verifier shares: reward values, the prepare/check split, batched verification.

A verifier decides ``correct`` per row; rewards are derived from it with the
verifier's ``(correct_reward, wrong_reward)`` (e.g. ``1/0`` or DAPO's ``+1/-1``).

Verification is split in two so that a process pool can keep the expensive
part away from the trainer (see :mod:`nemo_gdro.rewards.pool`):

- :meth:`Verifier.prepare` runs in the calling (trainer) process. It must be
  cheap and bounded -- linear in the response length, no sympy -- and either
  decides the row (returns a ``bool``) or returns a :class:`WorkItem`;
- :meth:`Verifier.check` decides a ``WorkItem`` and may be arbitrarily slow
  on pathological input; it runs in a worker process under a hard timeout.

``is_correct = check(prepare(...))`` is the single-row form. Simple verifiers
may override ``is_correct`` only (then ``prepare`` sends every row to
``check``, which calls ``is_correct``).

This module does not import torch at import time: pool workers import the
verifier classes and never need it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_gdro.rewards._deadline import VerificationTimeout

if TYPE_CHECKING:
    import torch

    from nemo_gdro.rewards.result import VerifyResult


class GroundTruthError(ValueError):
    """The ground-truth answer itself is invalid for this verifier (a data error, raised)."""


@dataclass(frozen=True)
class WorkItem:
    """What :meth:`Verifier.check` decides: the (possibly extracted) prediction and the ground truth."""

    prediction: str
    answer: str


class Verifier:
    """Binary-outcome verifier.

    ``decides_in_prepare = True`` declares that :meth:`prepare` always returns
    a ``bool`` (bounded string work only); a pool then starts no processes.

    Args:
        correct_reward / wrong_reward: reward values (``correct_reward > wrong_reward``).
    """

    decides_in_prepare: bool = False

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0) -> None:
        if not correct_reward > wrong_reward:
            raise ValueError(
                f"verifier.correct_reward must be > verifier.wrong_reward, got {correct_reward} <= {wrong_reward}"
            )
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)

    @property
    def reward_range(self) -> tuple[float, float]:
        """``(wrong_reward, correct_reward)``."""
        return (self.wrong_reward, self.correct_reward)

    # ------------------------------------------------------------ one row
    def prepare(self, response_text: str, answer: str) -> bool | WorkItem:
        """Cheap, bounded triage in the caller's process: a verdict or the work left for :meth:`check`."""
        return WorkItem(response_text, answer)

    def check(self, item: WorkItem) -> bool:
        """Decide a :class:`WorkItem` (may be slow; runs in a pool worker under a timeout)."""
        if type(self).is_correct is Verifier.is_correct:
            raise NotImplementedError(f"{type(self).__name__} implements neither is_correct nor check")
        return self.is_correct(item.prediction, item.answer)

    def is_correct(self, response_text: str, answer: str) -> bool:
        """Whether ``response_text`` answers ``answer`` correctly (may raise; see ``verify_batch``)."""
        if type(self).check is Verifier.check:
            raise NotImplementedError(f"{type(self).__name__} implements neither is_correct nor check")
        decided = self.prepare(response_text, answer)
        return decided if isinstance(decided, bool) else self.check(decided)

    def warmup(self) -> None:
        """Pay one-off costs (lazy imports) up front; pool workers call it before taking items."""

    def score(self, response_text: str, answer: str) -> float:
        return self.correct_reward if self.is_correct(response_text, answer) else self.wrong_reward

    # ------------------------------------------------------------ batches
    def verify_batch(self, texts: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        """Verify row-aligned ``texts`` / ``answers`` in this thread, one row after another.

        A row whose verifier raises counts as a failure and a row that raises
        :class:`VerificationTimeout` as a timeout (both scored wrong); a
        :class:`GroundTruthError` is re-raised naming the row. No time bound
        of its own: :class:`~nemo_gdro.rewards.pool.PooledVerifier` adds one.
        """
        from nemo_gdro.rewards.result import STATUS_FAILURE, STATUS_OK, STATUS_TIMEOUT, VerifyResult

        check_batch_lengths(texts, answers)
        t0 = time.perf_counter()
        correct: list[bool] = []
        status: list[int] = []
        for i, (text, answer) in enumerate(zip(texts, answers, strict=True)):
            ok, st = False, STATUS_OK
            try:
                ok = bool(self.is_correct(text, answer))
            except GroundTruthError as e:
                raise GroundTruthError(f"row {i}: {e}") from e
            except VerificationTimeout:
                st = STATUS_TIMEOUT
            except Exception:  # noqa: BLE001 - one bad response must not kill a training step
                st = STATUS_FAILURE
            correct.append(ok)
            status.append(st)
        return VerifyResult.from_rows(correct, status, time.perf_counter() - t0)

    def rewards(self, result: VerifyResult) -> torch.Tensor:
        """float32 ``[R]`` rewards of ``result`` with this verifier's reward values."""
        return result.rewards(self.correct_reward, self.wrong_reward)

    def score_batch(self, texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Rewards ``[R]`` float32 for row-aligned ``texts`` and ``answers`` (each row its own answer)."""
        return self.rewards(self.verify_batch(texts, answers))

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release resources (worker processes); a plain verifier holds none."""

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch_lengths(texts: Sequence[str], answers: Sequence[str]) -> None:
    if len(texts) != len(answers):
        raise ValueError(f"verify_batch got {len(texts)} texts but {len(answers)} answers")
