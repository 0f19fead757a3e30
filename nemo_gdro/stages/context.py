"""What stage factories are built from, and the controllers stages share.

Prompt-GDRO's bin scores serve two stages (resampling and advantage weights);
:meth:`StageContext.prompt_gdro` builds the controller once so both use one
object, which is then observed once per step (gdro.md §6.3: the authors'
release updated a shared EMA twice per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nemo_gdro.algorithms.difficulty import DifficultyClassifier
from nemo_gdro.algorithms.prompt_gdro import PromptGDRO
from nemo_gdro.parallel.rows import DataParallel

if TYPE_CHECKING:
    from nemo_gdro.stages.setup import AlgorithmSetup


@dataclass
class StageContext:
    """Inputs every stage factory may use.

    setup: the typed algorithm configuration.
    store: the per-prompt statistics store (possibly sharded over DP ranks).
    classifier: the difficulty classifier reading ``store``.
    num_prompts: size of the training prompt pool.
    seed: the run seed.
    reward_range: ``(wrong, correct)`` reward values of the verifier.
    dp: data-parallel layout (reductions of mini-batch statistics).
    """

    setup: AlgorithmSetup
    store: Any
    classifier: DifficultyClassifier
    num_prompts: int
    seed: int
    reward_range: tuple[float, float] = (0.0, 1.0)
    dp: DataParallel = field(default_factory=DataParallel)
    _prompt_gdro: PromptGDRO | None = field(default=None, repr=False)

    def prompt_gdro(self) -> PromptGDRO:
        """The one Prompt-GDRO controller of the run (built on first use)."""
        if self._prompt_gdro is None:
            self._prompt_gdro = PromptGDRO(self.setup.prompt_gdro, self.classifier.num_bins, seed=self.seed)
        return self._prompt_gdro

    @property
    def shared_prompt_gdro(self) -> PromptGDRO | None:
        """The Prompt-GDRO controller if a stage asked for it."""
        return self._prompt_gdro
