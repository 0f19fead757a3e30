"""Mathematical equivalence by math-verify (0.9.0), with its own timeouts switched off.

math-verify bounds parsing and comparison with ``signal.alarm``, which works
only in the main thread and shares the timer with
:func:`nemo_gdro.rewards._deadline.soft_deadline`. This backend therefore
always passes ``None`` as math-verify's timeouts; the caller bounds the wall
time (a pool worker's soft and hard deadlines, or ``soft_deadline``).

Every exception math-verify raises while parsing a *response* means "no
answer" (math-verify itself returns ``[]`` then); an exception that escapes
``verify`` propagates and is counted as a failure by the caller.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from types import ModuleType
from typing import Any

from nemo_gdro._optional import import_optional

_GOLD_CACHE_SIZE = 4096  # answers of one step's prompts; LRU


class _DropTimeoutDisabledWarning(logging.Filter):
    # math-verify warns once that its timeouts are off; here they are off on purpose.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _import_math_verify() -> ModuleType:
    mv = import_optional("math_verify", "math", "the math verifiers", hint="or pip install math-verify==0.9.0")
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutDisabledWarning) for f in logger.filters):
            logger.addFilter(_DropTimeoutDisabledWarning())
    return mv


def as_latex_math(answer: str) -> str:
    r"""Wrap a bare LaTeX answer in ``$...$`` (math-verify extracts LaTeX only inside delimiters or ``\boxed``)."""
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


class MathEquivalence:
    """Parse ground truths (cached), responses and extracted answers; decide equivalence."""

    def __init__(self) -> None:
        self._mv = _import_math_verify()
        self._gold_cache: OrderedDict[str, list[Any]] = OrderedDict()

    def parse_gold(self, answer: str) -> list[Any]:
        """Parsed ground truth (``[]`` if math-verify finds nothing in it)."""
        cached = self._gold_cache.get(answer)
        if cached is not None:
            self._gold_cache.move_to_end(answer)
            return cached
        gold = self._mv.parse(as_latex_math(answer), parsing_timeout=None)
        if not gold:
            gold = self._mv.parse(answer, parsing_timeout=None)
        self._gold_cache[answer] = gold
        if len(self._gold_cache) > _GOLD_CACHE_SIZE:
            self._gold_cache.popitem(last=False)
        return gold

    def clear_cache(self) -> None:
        self._gold_cache.clear()

    def parse_answer(self, extracted: str) -> list[Any]:
        """Parse an already extracted final answer (``\\frac{1}{2}``, ``10 cm``, ``$x=3$``)."""
        return self._mv.parse(as_latex_math(extracted), parsing_timeout=None)

    def parse_response(self, text: str) -> list[Any]:
        """math-verify's own extraction over a whole response (LaTeX and plain expressions)."""
        return self._mv.parse(text, parsing_timeout=None)

    def equivalent(self, gold: list[Any], pred: list[Any]) -> bool:
        if not gold or not pred:
            return False
        return bool(self._mv.verify(gold, pred, timeout_seconds=None, raise_on_error=False))
