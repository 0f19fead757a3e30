r"""Math verifiers on math-verify: the DAPO reward and math-verify's whole-response mode.

``DapoMathVerifier(extract=...)`` decides a row in two stages:

1. ``prepare`` (trainer process, cheap): extract the final answer
   (``dapo``: "Answer:" line in the last ``tail_chars`` characters, then the
   last ``\boxed{}`` there; ``boxed``: the last ``\boxed{}`` of the whole
   response; rules in :mod:`nemo_gdro.rewards.extract`). No answer, or one
   holding a rendered special token (``<|endoftext|>``), -> wrong.
   If the ground truth has no ``=``, a simple left-hand side (``x = 5``) is
   dropped. Then the normalised-string pre-check
   (:mod:`nemo_gdro.rewards.normalize`): equal normal forms -> correct; both
   plain integers -> compared exactly; two equal decimal literals -> correct.
   DAPO-Math ground truths are integers, so most rows end here without sympy.
2. ``check`` (pool worker, may be slow): math-verify parses the extracted
   answer (wrapped in ``$...$``) and the ground truth and compares them
   (numeric, symbolic, sets, intervals, units).

``extract="math_verify_full"`` skips both the extraction and the pre-check
(an empty response or one holding a rendered ``<|...|>`` token is wrong):
math-verify extracts from the whole response itself (LaTeX and plain
expressions, ``\boxed`` with its default priority) -- what ``MathVerifier``
does.

Reference behaviour (facts, not code): DAPO/verl's ``math_dapo`` keeps the last
300 characters, takes the last ``Answer:`` match and compares normalised strings
(+1/-1); newer verl falls back to a strict ``\boxed{}`` in the last 100
characters; NeMo-RL's ``dapo_math_verify`` is the same logic with 1/0 rewards.
Here equivalence is math-verify's instead of string equality, so ``0.5`` vs
``\frac12`` is correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from nemo_gdro.rewards._deadline import VerificationTimeout, soft_deadline
from nemo_gdro.rewards.base import Verifier, WorkItem
from nemo_gdro.rewards.equivalence import MathEquivalence
from nemo_gdro.rewards.extract import boxed_answer, dapo_answer
from nemo_gdro.rewards.normalize import canonical_integer, is_decimal_literal, normalize_answer, strip_variable_lhs

ExtractMode = Literal["dapo", "boxed", "math_verify_full"]
EXTRACT_MODES: tuple[str, ...] = ("dapo", "boxed", "math_verify_full")
# A special token rendered as text (``<|endoftext|>``): the tokenizer contract renders them so that
# verifiers score such answers wrong (math-verify alone would read "12<|im_end|>" as 12).
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_.\-]{1,64}\|>")


# (prediction, ground truth) pairs covering the comparison paths of math-verify: rational, irrational,
# symbolic, interval, set, units, degrees, equations.
_WARMUP_PAIRS: tuple[tuple[str, str], ...] = (
    ("\\frac{1}{2}", "0.5"),
    ("\\sqrt{2}", "3"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("x^2+1", "(1,2]"),
    ("(1, 2]", "(1,2]"),
    ("\\{1,2\\}", "\\{1,2\\}"),
    ("10\\text{ cm}", "10"),
    ("90^\\circ", "90"),
    ("x = 3", "3"),
    ("e^{i\\pi}", "-1"),
    ("1.5", "\\frac{3}{2}"),
)


@dataclass(frozen=True)
class DapoMathOptions:
    """Options of ``dapo_math`` (``reward.options.*``).

    extract: ``dapo`` ("Answer:" line, then ``\\boxed{}``) | ``boxed`` (last
        ``\\boxed{}``) | ``math_verify_full`` (math-verify's own extraction).
    tail_chars: characters at the end of the response searched by ``dapo`` (DAPO: 300).
    """

    extract: str = "dapo"
    tail_chars: int = 300

    def __post_init__(self) -> None:
        if self.extract not in EXTRACT_MODES:
            raise ValueError(f"reward.options.extract must be one of {EXTRACT_MODES}, got {self.extract!r}")
        if isinstance(self.tail_chars, bool) or not isinstance(self.tail_chars, int) or self.tail_chars < 1:
            raise ValueError(f"reward.options.tail_chars must be an integer >= 1, got {self.tail_chars!r}")


def precheck(pred: str, gold: str) -> bool | None:
    """Decide ``pred`` vs ``gold`` by string work alone, or ``None`` when sympy is needed."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p:
        return False
    if p == g:
        return True
    ip, ig = canonical_integer(p), canonical_integer(g)
    if ip is not None and ig is not None:
        return ip == ig
    if is_decimal_literal(p) and is_decimal_literal(g) and len(p) <= 100 and len(g) <= 100:
        try:
            if Decimal(p) == Decimal(g):
                return True
        except InvalidOperation:
            pass
    return None


class DapoMathVerifier(Verifier):
    """The DAPO math reward with math-verify equivalence (module docstring).

    Args:
        correct_reward / wrong_reward: ``1/0`` or DAPO's ``1/-1``.
        extract / tail_chars: see :class:`DapoMathOptions`.
    """

    Options = DapoMathOptions

    def __init__(
        self, correct_reward: float = 1.0, wrong_reward: float = 0.0, extract: str = "dapo", tail_chars: int = 300
    ) -> None:
        super().__init__(correct_reward, wrong_reward)
        self.options = DapoMathOptions(extract=extract, tail_chars=tail_chars)
        self.extract = self.options.extract
        self._eq: MathEquivalence | None = None  # built on first check: prepare needs no sympy

    @property
    def equivalence(self) -> MathEquivalence:
        if self._eq is None:
            self._eq = MathEquivalence()
        return self._eq

    def warmup(self) -> None:
        # First uses of each sympy / math-verify path import and build things lazily (about 2 CPU-s in
        # all, mostly the first parse, irrational numerics and symbolic comparison). Pay it here, once per
        # pool server, not inside the first items' deadlines in every worker.
        eq = self.equivalence
        for pred, gold in _WARMUP_PAIRS:
            eq.equivalent(eq.parse_gold(gold), eq.parse_answer(pred))
        eq.equivalent(eq.parse_gold("7"), eq.parse_response("So the answer is $\\boxed{7}$."))
        eq.clear_cache()

    def extract_answer(self, response_text: str) -> str | None:
        """The final answer this mode reads from the response (``math_verify_full``: the whole text)."""
        if self.extract == "dapo":
            return dapo_answer(response_text, self.options.tail_chars)
        if self.extract == "boxed":
            return boxed_answer(response_text)
        return response_text

    def prepare(self, response_text: str, answer: str) -> bool | WorkItem:
        if not isinstance(response_text, str) or not isinstance(answer, str):
            return False
        if self.extract == "math_verify_full":
            if not response_text.strip() or _SPECIAL_TOKEN.search(response_text):
                return False
            return WorkItem(response_text, answer)
        pred = self.extract_answer(response_text)
        if pred is None or _SPECIAL_TOKEN.search(pred):
            return False
        if "=" not in answer:
            pred = strip_variable_lhs(pred)
        decided = precheck(pred, answer)
        return WorkItem(pred, answer) if decided is None else decided

    def check(self, item: WorkItem) -> bool:
        eq = self.equivalence
        gold = eq.parse_gold(item.answer)
        if not gold:
            # A data problem, not the model's: raised so that it is counted as a failure (scored wrong)
            # and shows in the metrics instead of silently zeroing the prompt's rewards.
            raise ValueError(f"math-verify cannot parse the ground truth {item.answer[:200]!r}")
        if self.extract == "math_verify_full":
            pred = eq.parse_response(item.prediction)
        else:
            pred = eq.parse_answer(item.prediction)
        return eq.equivalent(gold, pred)


@dataclass(frozen=True)
class MathVerifyOptions:
    """``math_verify`` has no options (``reward.options`` must be empty)."""


class MathVerifier(DapoMathVerifier):
    """math-verify's own extraction over the whole response (``extract="math_verify_full"``).

    Args:
        correct_reward / wrong_reward: e.g. ``1.0 / 0.0`` or ``1.0 / -1.0``.
        timeout_s: soft bound (seconds, > 0) on one :meth:`is_correct` call made
            from the main thread (interrupts Python-level sympy loops). Under a
            :class:`~nemo_gdro.rewards.pool.PooledVerifier` the pool's deadlines
            apply as well (the tighter one wins).
    """

    Options = MathVerifyOptions

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0, timeout_s: float = 5.0) -> None:
        super().__init__(correct_reward, wrong_reward, extract="math_verify_full")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ValueError(f"verifier.timeout_s must be a number > 0 (seconds), got {timeout_s!r}")
        self.timeout_s = float(timeout_s)

    def check(self, item: WorkItem) -> bool:
        with soft_deadline(self.timeout_s):
            return super().check(item)

    def is_correct(self, response_text: str, answer: str) -> bool:
        """Never raises: a parsing/verification error or a timeout is a wrong answer."""
        try:
            return super().is_correct(response_text, answer)
        except (Exception, VerificationTimeout):  # noqa: BLE001 - math-verify may raise anything
            return False
