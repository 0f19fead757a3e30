"""The task record the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the task registry resolves a task's Config without importing torch
    from nemo_gdro.data.dataset import PromptDataset
    from nemo_gdro.rewards.base import Verifier


@dataclass(frozen=True)
class EvalSuite:
    """One held-out benchmark: its prompts and the verifier that scores them."""

    dataset: PromptDataset
    verifier: Verifier


@dataclass(frozen=True)
class Task:
    """A built task.

    train: the RL prompt pool (dense prompt ids key every per-prompt statistic).
    verifier: scores training rollouts.
    eval_suites: name -> suite; metrics are pooled over all suites and, with
        more than one, also reported per suite.
    sft: records with ``meta["sft_target"]`` for the warm start, or ``None``.
    """

    name: str
    train: PromptDataset
    verifier: Verifier
    eval_suites: dict[str, EvalSuite] = field(default_factory=dict)
    sft: PromptDataset | None = None

    def describe(self) -> str:
        suites = ", ".join(f"{k} ({len(s.dataset)})" for k, s in self.eval_suites.items())
        return f"task {self.name}: {len(self.train)} training prompts; eval {suites or 'none'}"
