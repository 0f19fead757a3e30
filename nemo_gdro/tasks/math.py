"""Math RL on local files (``data=math``): DAPO-Math-style training prompts, the standard benchmarks.

Training prompts come from JSONL / Parquet in the DAPO-Math-17k, open-r1
processed or plain layout (deduplicated, stable ids from the prompt text);
eval suites from the benchmarks' common public layouts. Math answers are
verified by the ``reward`` section's verifier (DAPO answer extraction +
math-verify, in worker processes with a hard per-item timeout);
GPQA-Diamond's letter answers by the choice verifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from nemo_gdro.tasks.base import EvalSuite, Task


@dataclass(frozen=True)
class MathConfigSection:
    """``data`` for ``task: math`` (``conf/data/math.yaml``); see that file for every key."""

    task: str = "math"
    train_files: tuple[str, ...] = ()
    layout: Literal["auto", "dapo", "dapo_processed", "plain"] = "auto"
    eval_files: dict[str, Any] = field(default_factory=dict)
    prompt_format: Literal["raw", "chat_template"] = "chat_template"
    instruction: Literal["none", "dapo"] = "dapo"
    enable_thinking: bool | None = None
    english_only: bool = False
    max_prompt_tokens: int | None = None
    overlong_prompts: Literal["drop", "error"] = "drop"
    max_prompt_chars: int = 65536
    choice_seed: int = 0
    exclude_eval_from_train: bool = True

    def __post_init__(self) -> None:
        from nemo_gdro.data.benchmark_specs import BENCHMARKS

        if not self.train_files:
            raise ValueError("data.train_files must list at least one JSONL / Parquet file")
        for name, files in self.eval_files.items():
            if name not in BENCHMARKS:
                raise ValueError(f"data.eval_files.{name}: unknown benchmark; valid names: {', '.join(BENCHMARKS)}")
            if isinstance(files, str):
                files = [files]
            if not isinstance(files, (list, tuple)) or not files or not all(isinstance(f, str) for f in files):
                raise ValueError(f"data.eval_files.{name} must be a file path or a list of paths, got {files!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be a positive integer or null, got {self.max_prompt_tokens}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"data.max_prompt_chars must be a positive integer, got {self.max_prompt_chars}")


class MathTask:
    """DAPO-Math training and the math benchmarks, with the configured math reward."""

    Config = MathConfigSection
    #: ``reward.verifier`` values that score this task's math answers (GPQA letters: ``reward.choice_verifier``).
    verifiers = ("dapo_math", "math_verify")

    @staticmethod
    def build(config: MathConfigSection, tokenizer: Any, verifiers: Any) -> Task:
        """Eval suites first (their uids leave the training pool); ``verifiers``: a
        :class:`~nemo_gdro.rewards.verifier_set.VerifierSet`."""
        from nemo_gdro.data.benchmarks import load_benchmark
        from nemo_gdro.data.prompt_files import load_prompt_files
        from nemo_gdro.data.prompt_format import PromptFormat

        fmt = PromptFormat(style=config.prompt_format, instruction=config.instruction, enable_thinking=config.enable_thinking)
        common = dict(
            prompt_format=fmt, tokenizer=tokenizer, max_prompt_tokens=config.max_prompt_tokens,
            overlong_prompts=config.overlong_prompts, max_prompt_chars=config.max_prompt_chars,
        )
        suites: dict[str, EvalSuite] = {}
        eval_uids: set[int] = set()
        for name, files in config.eval_files.items():
            dataset = load_benchmark(name, [files] if isinstance(files, str) else list(files), seed=config.choice_seed, **common)
            kind = dataset[0].meta.get("answer_type", "math") if len(dataset) else "math"
            suites[name] = EvalSuite(dataset, verifiers.for_answer_type(kind))
            eval_uids.update(int(r.meta["uid"]) for r in dataset)
        train, _ = load_prompt_files(
            list(config.train_files), layout=config.layout, english_only=config.english_only,
            exclude_uids=eval_uids if config.exclude_eval_from_train else (), **common,
        )
        return Task(name="math", train=train, verifier=verifiers.for_answer_type("math"), eval_suites=suites, sft=None)
