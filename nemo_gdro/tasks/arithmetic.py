"""The synthetic arithmetic task of the default run (exact-integer rewards)."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_gdro.data.dataset import arithmetic_dataset
from nemo_gdro.rewards.arithmetic import ArithmeticVerifier
from nemo_gdro.tasks.base import EvalSuite, Task


@dataclass(frozen=True)
class ArithmeticConfigSection:
    """``data`` for ``task: arithmetic``: pool sizes and the generator seed (eval problems never in train)."""

    task: str = "arithmetic"
    num_train: int = 2000
    num_eval: int = 256
    seed: int = 1234

    def __post_init__(self) -> None:
        for key in ("num_train", "num_eval"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be a positive integer, got {getattr(self, key)}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")


class ArithmeticTask:
    """``Q:37+45=A:`` -> ``82``: levels 1-4 of digits and operators, worked examples for SFT."""

    Config = ArithmeticConfigSection

    @staticmethod
    def build(config: ArithmeticConfigSection, tokenizer: object) -> Task:
        train, held_out = arithmetic_dataset(config.num_train, config.num_eval, config.seed)
        verifier = ArithmeticVerifier()
        return Task(
            name="arithmetic",
            train=train,
            verifier=verifier,
            eval_suites={"heldout": EvalSuite(held_out, verifier)},
            sft=train,
        )
