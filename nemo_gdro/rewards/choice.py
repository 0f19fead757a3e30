"""Multiple-choice verifier (GPQA-Diamond): the chosen letter must equal the ground-truth letter.

Extraction rules are :func:`nemo_gdro.rewards.extract.choice_answer`. The
ground truth is a letter, optionally in parentheses or with a trailing ``.``
(``"B"``, ``"(b)"``); anything else is a :class:`GroundTruthError`. All work is
bounded string matching on the response tail, so every row is decided in the
caller's process (no worker, no timeout needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_gdro.rewards.base import GroundTruthError, Verifier, WorkItem
from nemo_gdro.rewards.extract import choice_answer


@dataclass(frozen=True)
class ChoiceOptions:
    """Options of ``gpqa_choice`` (``reward.options.*``).

    letters: the valid choice letters, upper case (GPQA: ``ABCD``).
    tail_chars: characters at the end of the response searched for the choice.
    """

    letters: str = "ABCD"
    tail_chars: int = 300

    def __post_init__(self) -> None:
        ok = isinstance(self.letters, str) and self.letters.isalpha() and self.letters.isupper()
        if not ok or len(set(self.letters)) != len(self.letters) or len(self.letters) < 2:
            raise ValueError(
                f"reward.options.letters must be >= 2 distinct upper-case letters, got {self.letters!r}"
            )
        if isinstance(self.tail_chars, bool) or not isinstance(self.tail_chars, int) or self.tail_chars < 1:
            raise ValueError(f"reward.options.tail_chars must be an integer >= 1, got {self.tail_chars!r}")


class ChoiceVerifier(Verifier):
    """Correct iff the extracted letter equals the ground-truth letter.

    Args:
        correct_reward / wrong_reward: reward values.
        letters / tail_chars: see :class:`ChoiceOptions`.
    """

    Options = ChoiceOptions
    decides_in_prepare = True

    def __init__(
        self, correct_reward: float = 1.0, wrong_reward: float = 0.0, letters: str = "ABCD", tail_chars: int = 300
    ) -> None:
        super().__init__(correct_reward, wrong_reward)
        self.options = ChoiceOptions(letters=letters, tail_chars=tail_chars)

    def gold_letter(self, answer: str) -> str:
        core = answer.strip().rstrip(".").strip() if isinstance(answer, str) else ""
        if len(core) == 3 and core[0] == "(" and core[2] == ")":
            core = core[1]
        core = core.upper()
        if len(core) != 1 or core not in self.options.letters:
            raise GroundTruthError(
                f"{type(self).__name__}: ground truth must be one of the letters {self.options.letters!r}, got {answer!r}"
            )
        return core

    def is_correct(self, response_text: str, answer: str) -> bool:
        gold = self.gold_letter(answer)
        if not isinstance(response_text, str):
            return False
        return choice_answer(response_text, self.options.letters, self.options.tail_chars) == gold

    def prepare(self, response_text: str, answer: str) -> bool | WorkItem:
        return self.is_correct(response_text, answer)
