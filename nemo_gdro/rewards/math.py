"""Math answer verifier on top of HuggingFace ``math-verify``.

``math-verify`` is an optional dependency (the ``math`` extra) and is imported
lazily, so the rest of the package works without it.

Timeouts: math-verify bounds parsing and sympy comparison with ``signal.alarm``,
which only works in the main thread (elsewhere installing the handler raises).
The verifier therefore passes its timeout only when called from the main
thread and disables math-verify's timeouts otherwise; callers that score from
worker threads should bound wall time themselves. Every exception inside
math-verify counts as a wrong answer: one malformed response must never kill a
training step.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

from nemo_gdro._optional import import_optional
from nemo_gdro.rewards.base import Verifier


def _import_math_verify() -> ModuleType:
    return import_optional("math_verify", "math", "MathVerifier", hint="or pip install math-verify==0.9.0")


def _gold_text(answer: str) -> str:
    # Dataset answers are usually bare LaTeX (``\frac{1}{2}``, ``\sqrt{2}``);
    # math-verify only extracts LaTeX inside math delimiters or \boxed{}.
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


class MathVerifier(Verifier):
    """Rewards ``correct_reward`` when the response's final answer matches the ground truth.

    Args:
        correct_reward / wrong_reward: e.g. ``1.0 / 0.0`` or ``1.0 / -1.0`` (DAPO style).
        timeout_s: per-call bound (seconds, integer >= 1) for parsing and for
            comparison, applied in the main thread only (see module docstring).
    """

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0, timeout_s: int = 5) -> None:
        super().__init__(correct_reward, wrong_reward)
        if int(timeout_s) != timeout_s or timeout_s < 1:
            raise ValueError(f"verifier.timeout_s must be an integer >= 1 (signal.alarm), got {timeout_s}")
        self.timeout_s = int(timeout_s)
        self._mv = _import_math_verify()
        self._gold_cache: dict[tuple[str, bool], list[Any]] = {}

    def _timeout(self) -> int | None:
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def _parse_gold(self, answer: str, timeout: int | None) -> list[Any]:
        key = (answer, timeout is None)
        cached = self._gold_cache.get(key)
        if cached is not None:
            return cached
        gold = self._mv.parse(_gold_text(answer), parsing_timeout=timeout)
        if not gold:
            gold = self._mv.parse(answer, parsing_timeout=timeout)
        if len(self._gold_cache) < 100_000:  # bounded: answers of one dataset
            self._gold_cache[key] = gold
        return gold

    def is_correct(self, response_text: str, answer: str) -> bool:
        """Never raises: any parsing/verification failure or timeout is a wrong answer."""
        try:
            timeout = self._timeout()
            gold = self._parse_gold(answer, timeout)
            if not gold:
                return False
            pred = self._mv.parse(response_text, parsing_timeout=timeout)
            if not pred:
                return False
            return bool(self._mv.verify(gold, pred, timeout_seconds=timeout))
        except BaseException as e:  # noqa: BLE001 - math-verify may raise anything, incl. its timeout
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            return False
