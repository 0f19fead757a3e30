"""Exact-integer verifier for the synthetic arithmetic task.

A response is correct iff its text before the first end-of-sequence marker or
newline, stripped of surrounding whitespace, is an integer literal (optional
sign, ASCII digits) equal to the ground-truth answer. Anything else -- empty
text, extra words, decimals, special-token names, replacement characters -- is
wrong. Scoring never raises on a response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nemo_gdro.data.tokenizer import EOS_TOKEN
from nemo_gdro.rewards.base import GroundTruthError, Verifier, WorkItem

# ASCII digits only: Python's \d and int() also accept other scripts' digits.
_INT_RE = re.compile(r"[+-]?[0-9]+")
# Longer literals are wrong answers for this task anyway; the cap keeps int()
# cheap and away from Python's int-string conversion limit.
_MAX_DIGITS = 64


def _parse_int(text: str) -> int | None:
    s = text.strip()
    if len(s) > _MAX_DIGITS + 1 or _INT_RE.fullmatch(s) is None:
        return None
    return int(s)


def extract_answer_text(response: str, eos_marker: str = EOS_TOKEN) -> str:
    """The part of ``response`` before the first ``eos_marker`` or newline."""
    cut = len(response)
    for stop in (eos_marker, "\n"):
        k = response.find(stop) if stop else -1
        if k >= 0:
            cut = min(cut, k)
    return response[:cut]


@dataclass(frozen=True)
class ArithmeticOptions:
    """Options of ``arithmetic`` (``reward.options.*``): ``eos_marker`` as in :class:`ArithmeticVerifier`."""

    eos_marker: str = EOS_TOKEN


class ArithmeticVerifier(Verifier):
    """Rewards ``correct_reward`` for an exactly right integer, ``wrong_reward`` otherwise.

    Args:
        correct_reward / wrong_reward: reward values (``correct_reward > wrong_reward``).
        eos_marker: literal text treated as end of sequence when a response was
            decoded with special tokens rendered (the rollout engine strips the
            final eos itself; see ``HFRolloutEngine``).
    """

    Options = ArithmeticOptions
    decides_in_prepare = True

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0, eos_marker: str = EOS_TOKEN) -> None:
        super().__init__(correct_reward, wrong_reward)
        self.eos_marker = eos_marker

    def is_correct(self, response_text: str, answer: str) -> bool:
        """Raises :class:`GroundTruthError` (a ``ValueError``) only when the ground truth is not an integer."""
        gold = _parse_int(answer) if isinstance(answer, str) else None
        if gold is None:
            raise GroundTruthError(f"arithmetic ground-truth answer must be an integer literal, got {answer!r}")
        if not isinstance(response_text, str):
            return False
        return _parse_int(extract_answer_text(response_text, self.eos_marker)) == gold

    def prepare(self, response_text: str, answer: str) -> bool | WorkItem:
        # Linear-time string work with a digit cap: always decided in the caller's process.
        return self.is_correct(response_text, answer)
