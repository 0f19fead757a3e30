"""The synthetic arithmetic task of the default run (exact-integer rewards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nemo_gdro.data.arithmetic import ArithmeticConfig
from nemo_gdro.tasks.base import EvalSuite, Task


@dataclass(frozen=True)
class ArithmeticConfigSection:
    """``data`` for ``task: arithmetic`` (``conf/data/arithmetic.yaml``). All splits are disjoint by prompt text.

    num_train: the RL prompt pool. num_eval: held-out problems.
    num_validation: a second held-out split from the same distribution, for
        choosing settings (``eval_split: validation`` reports on it instead).
    num_sft: a warm-start pool disjoint from the RL pool (0: SFT on the RL pool).
    unique_train: no repeated problem in the RL pool.
    sft_sign_flip: fraction of SFT-pool targets written with the wrong sign, a
        habit the warm start learns and RL can unlearn (0: every target correct;
        see :func:`~nemo_gdro.data.dataset.arithmetic_splits`).
    digit_probs / op_probs / max_mul_digits / allow_negative: the problem
        distribution (:class:`~nemo_gdro.data.arithmetic.ArithmeticConfig`).
    """

    task: str = "arithmetic"
    num_train: int = 2000
    num_eval: int = 256
    seed: int = 1234
    num_validation: int = 0
    num_sft: int = 0
    unique_train: bool = False
    sft_sign_flip: float = 0.0
    eval_split: Literal["eval", "validation"] = "eval"
    digit_probs: tuple[float, ...] = ArithmeticConfig.digit_probs
    op_probs: tuple[float, float, float] = ArithmeticConfig.op_probs
    max_mul_digits: int = ArithmeticConfig.max_mul_digits
    allow_negative: bool = ArithmeticConfig.allow_negative

    def __post_init__(self) -> None:
        for key in ("num_train", "num_eval"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("num_validation", "num_sft", "seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.sft_sign_flip <= 1.0:
            raise ValueError(f"data.sft_sign_flip must be in [0, 1], got {self.sft_sign_flip}")
        if self.sft_sign_flip > 0 and self.num_sft < 1:
            raise ValueError("data.sft_sign_flip only changes a separate SFT pool: it needs data.num_sft > 0")
        if self.eval_split == "validation" and self.num_validation < 1:
            raise ValueError("data.eval_split=validation needs data.num_validation > 0")
        self.generator()  # validates the distribution

    def generator(self) -> ArithmeticConfig:
        try:
            return ArithmeticConfig(self.digit_probs, self.op_probs, self.max_mul_digits, self.allow_negative)
        except ValueError as err:
            raise ValueError(f"data: {err}") from None


class ArithmeticTask:
    """``Q:37+45=A:`` -> ``82``: levels 1-4 of digits and operators, worked examples for SFT."""

    Config = ArithmeticConfigSection
    #: ``reward.verifier`` values that score this task's answers.
    verifiers = ("arithmetic",)

    @staticmethod
    def build(config: ArithmeticConfigSection, tokenizer: object, verifiers: Any) -> Task:
        """The splits; ``verifiers.for_answer_type("math")`` (the ``reward`` section's) scores them."""
        from nemo_gdro.data.dataset import arithmetic_splits

        splits = arithmetic_splits(
            config.num_train, config.num_eval, config.seed, config.generator(),
            num_validation=config.num_validation, num_sft=config.num_sft, unique_train=config.unique_train,
            sft_sign_flip=config.sft_sign_flip,
        )
        verifier = verifiers.for_answer_type("math")
        held_out = splits.validation if config.eval_split == "validation" else splits.eval
        return Task(
            name="arithmetic",
            train=splits.train,
            verifier=verifier,
            eval_suites={config.eval_split if config.eval_split == "validation" else "heldout": EvalSuite(held_out, verifier)},
            sft=splits.sft_pool,
        )
