"""What every verifier shares: reward values, per-row scoring, batched scoring."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Verifier:
    """Binary-outcome verifier; subclasses implement :meth:`is_correct`.

    Args:
        correct_reward / wrong_reward: reward values (``correct_reward > wrong_reward``).
    """

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

    def is_correct(self, response_text: str, answer: str) -> bool:
        raise NotImplementedError

    def score(self, response_text: str, answer: str) -> float:
        return self.correct_reward if self.is_correct(response_text, answer) else self.wrong_reward

    def score_batch(self, texts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Rewards ``[R]`` float32 for row-aligned ``texts`` and ``answers`` (each row its own answer)."""
        if len(texts) != len(answers):
            raise ValueError(f"score_batch got {len(texts)} texts but {len(answers)} answers")
        return torch.tensor([self.score(t, a) for t, a in zip(texts, answers, strict=True)], dtype=torch.float32)
