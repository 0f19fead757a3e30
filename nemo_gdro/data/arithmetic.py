"""Synthetic verifiable arithmetic task with a heavy-tailed difficulty mix.

A prompt looks like ``"Q:37+45=A:"`` and its answer is ``"82"``. Problems are
integer addition, subtraction (results may be negative) and multiplication of a
small operand by one digit. The number of digits follows a heavy-tailed mix
(default 1..4 digits with probabilities 0.35/0.3/0.2/0.15), so a tiny model
sees problems that are easy, at its frontier, and not learnable yet at the same
time: the regime where difficulty-aware prompt sampling and rollout allocation
matter.

Difficulty level (an integer, 1 = easiest):
    * addition / subtraction with ``d``-digit operands: ``d``;
    * multiplication of a ``d``-digit by a 1-digit number: ``d + 1``.

Everything is a deterministic function of ``seed`` (numpy PCG64, whose stream
is stable across platforms and numpy versions).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from nemo_gdro.data.tokenizer import CharTokenizer

Op = Literal["+", "-", "*"]
OPS: tuple[Op, ...] = ("+", "-", "*")

PROMPT_TEMPLATE = "Q:{a}{op}{b}=A:"
_MAX_CONSECUTIVE_MISSES = 20_000


@dataclass(frozen=True)
class ArithmeticConfig:
    """Distribution of generated problems.

    digit_probs: probability of ``d = 1, 2, ...`` digits for the larger operand.
    op_probs: probabilities of ``+``, ``-``, ``*`` (renormalised over the allowed
        operations when multiplication is not allowed for the drawn ``d``).
    max_mul_digits: multiplication is only drawn when ``d <= max_mul_digits``;
        its second operand is a single digit (keeps products learnable-ish).
    allow_negative: subtraction may give a negative result (``"Q:3-45=A:"`` -> ``"-42"``).
    """

    digit_probs: tuple[float, ...] = (0.35, 0.30, 0.20, 0.15)
    op_probs: tuple[float, float, float] = (0.45, 0.35, 0.20)
    max_mul_digits: int = 2
    allow_negative: bool = True

    def __post_init__(self) -> None:
        if not self.digit_probs or any(p < 0 for p in self.digit_probs) or sum(self.digit_probs) <= 0:
            raise ValueError(f"arithmetic.digit_probs must be non-negative with a positive sum, got {self.digit_probs}")
        if len(self.op_probs) != 3 or any(p < 0 for p in self.op_probs) or sum(self.op_probs[:2]) <= 0:
            raise ValueError(
                f"arithmetic.op_probs must be 3 non-negative values (+, -, *) with P(+)+P(-) > 0, got {self.op_probs}"
            )
        if self.max_mul_digits < 0:
            raise ValueError(f"arithmetic.max_mul_digits must be >= 0, got {self.max_mul_digits}")

    @property
    def max_digits(self) -> int:
        return len(self.digit_probs)


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem.

    text: the prompt, e.g. ``"Q:37+45=A:"``.
    answer: the exact integer answer as a string, e.g. ``"82"`` or ``"-42"``.
    difficulty: integer level (see module docstring), ``>= 1``.
    sft_target: the completion a supervised warm-up should teach, *without* the
        end-of-sequence token (it is a token, not a character): the tokenizer
        appends ``<eos>``; see ``sft_ids``. Currently the bare answer.
    op, a, b: the operation and operands, for analysis.
    """

    text: str
    answer: str
    difficulty: int
    sft_target: str
    op: Op
    a: int
    b: int

    def sft_ids(self, tokenizer: CharTokenizer, add_bos: bool = True) -> tuple[list[int], int]:
        """Token ids of ``[<bos>] prompt sft_target <eos>`` and the prompt length in tokens.

        The supervised loss belongs on positions ``>= prompt_length`` (target and eos),
        matching the rollout layout (``RolloutBatch`` with ``prompt_lengths``).
        """
        prompt = tokenizer.encode(self.text, add_bos=add_bos)
        target = tokenizer.encode(self.sft_target, add_eos=True)
        return prompt + target, len(prompt)


def _problem(op: Op, a: int, b: int, difficulty: int) -> ArithmeticProblem:
    value = a + b if op == "+" else a - b if op == "-" else a * b
    answer = str(value)
    return ArithmeticProblem(
        text=PROMPT_TEMPLATE.format(a=a, op=op, b=b),
        answer=answer,
        difficulty=difficulty,
        sft_target=answer,
        op=op,
        a=a,
        b=b,
    )


def _operand(rng: np.random.Generator, digits: int) -> int:
    """Uniform integer with exactly ``digits`` digits (0..9 for one digit)."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(lo, 10**digits))


def _pick(rng: np.random.Generator, cum: Sequence[float]) -> int:
    """Index drawn from a cumulative distribution (last entry 1.0); cheaper than ``rng.choice``."""
    return min(bisect.bisect_right(cum, rng.random()), len(cum) - 1)


def _cumulative(p: Sequence[float]) -> list[float]:
    total = float(sum(p))
    return [float(x) for x in np.cumsum(np.asarray(p, dtype=np.float64) / total)]


def _draw(rng: np.random.Generator, cfg: ArithmeticConfig, digit_cum: list[float]) -> ArithmeticProblem:
    d = _pick(rng, digit_cum) + 1
    op_p = list(cfg.op_probs)
    if d > cfg.max_mul_digits:
        op_p[2] = 0.0
    op: Op = OPS[_pick(rng, _cumulative(op_p))]
    if op == "*":
        a, b = _operand(rng, d), _operand(rng, 1)
        difficulty = d + 1
    else:
        # The larger operand has exactly d digits; the other has up to d digits.
        a, b = _operand(rng, d), int(rng.integers(0, 10**d))
        if op == "-" and not cfg.allow_negative and a < b:
            a, b = b, a
        difficulty = d
    if rng.random() < 0.5 and not (op == "-" and not cfg.allow_negative):
        a, b = b, a  # the long operand is not always first
    return _problem(op, a, b, difficulty)


def make_problems(
    num: int,
    seed: int,
    *,
    config: ArithmeticConfig | None = None,
    exclude: Iterable[str] = (),
    unique: bool = False,
    stream: int = 0,
) -> list[ArithmeticProblem]:
    """Draw ``num`` problems deterministically from ``(seed, stream)``.

    Args:
        exclude: prompt texts that must not be produced (e.g. the held-out set).
        unique: no two returned problems share a prompt text. Unique sets skew
            towards harder levels once the small 1-digit space is exhausted.
        stream: independent sub-stream of ``seed`` (train and eval use different ones).

    Raises ``ValueError`` when the constraints cannot be met (space exhausted).
    """
    if num < 0:
        raise ValueError(f"make_problems num must be >= 0, got {num}")
    cfg = config or ArithmeticConfig()
    digit_cum = _cumulative(cfg.digit_probs)
    rng = np.random.default_rng([seed, stream])
    banned = set(exclude)
    seen: set[str] = set()
    out: list[ArithmeticProblem] = []
    misses = 0  # consecutive rejections; a long run means the allowed space is exhausted
    while len(out) < num:
        p = _draw(rng, cfg, digit_cum)
        if p.text in banned or (unique and p.text in seen):
            misses += 1
            if misses > _MAX_CONSECUTIVE_MISSES:
                raise ValueError(
                    f"make_problems could not draw {num} problems (unique={unique}, {len(banned)} excluded): "
                    f"only {len(out)} found before {_MAX_CONSECUTIVE_MISSES} rejections in a row; "
                    f"the problem space of {cfg} is (nearly) exhausted"
                )
            continue
        misses = 0
        seen.add(p.text)
        out.append(p)
    return out


def split(
    train: Sequence[ArithmeticProblem], eval: Sequence[ArithmeticProblem]
) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """Make a held-out split: de-duplicate ``eval`` by prompt text and drop from
    ``train`` every problem whose text is in ``eval``. Order is preserved.

    The returned train list may be shorter than the input; ``arithmetic_dataset``
    avoids that by drawing train with ``exclude=`` the eval texts instead.
    """
    held: list[ArithmeticProblem] = []
    held_texts: set[str] = set()
    for p in eval:
        if p.text not in held_texts:
            held_texts.add(p.text)
            held.append(p)
    return [p for p in train if p.text not in held_texts], held


def difficulty_histogram(problems: Sequence[ArithmeticProblem]) -> dict[int, int]:
    """Count of problems per difficulty level, sorted by level."""
    counts: dict[int, int] = {}
    for p in problems:
        counts[p.difficulty] = counts.get(p.difficulty, 0) + 1
    return dict(sorted(counts.items()))
