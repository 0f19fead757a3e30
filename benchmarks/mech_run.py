"""The subject of the mechanism benchmark: a GRPO run of the efficacy testbed with a checkpoint every step.

``prepare_default_run`` plans and runs (or reuses, or resumes) exactly the run
that ``python benchmarks/efficacy.py --methods grpo --seeds 0 --keep-checkpoints
--set trainer.checkpoint_every=1 --set trainer.keep_last_checkpoints=200``
makes, through the efficacy harness (same directory names, so a run made either
way is found by the other). ``--quick`` shrinks it like ``efficacy.py --quick``
does, and more (one-digit problems and a longer warm start, so that the toy
policy solves some prompts and some groups carry a gradient).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import efficacy as eff

#: Overrides of the mechanism subject on top of the efficacy testbed: a checkpoint after every step, all kept.
CHECKPOINT_OVERRIDES = ("trainer.checkpoint_every=1", "trainer.keep_last_checkpoints=200")

#: --quick: the efficacy quick overrides, then a toy testbed whose policy solves some prompts after a
#: short warm start (one-digit problems, no sign flip), a pool of 24 prompts, 3 RL steps.
QUICK_OVERRIDES = (
    "data.num_train=24",
    "data.num_eval=16",
    "++data.num_validation=16",
    "++data.num_sft=2000",
    "++data.digit_probs=[1.0]",
    "++data.sft_sign_flip=0.0",
    "trainer.max_steps=3",
    "trainer.prompts_per_step=8",
    "trainer.eval_every=0",
    "trainer.micro_batch_size=64",
    "eval.at_start=false",
)
QUICK_WARM_START = ("sft.steps=250", "sft.lr=0.003")


def plan(work: Path, quick: bool, seed: int = 0) -> tuple[dict[Path, list[str]], list[Any]]:
    """The warm-start job and the GRPO run (``efficacy.plan_jobs``) of the mechanism subject."""
    cfg = eff.load_config(eff.DEFAULT_CONFIG)
    extra = [*(QUICK_OVERRIDES if quick else ()), *CHECKPOINT_OVERRIDES]
    warm = list(QUICK_WARM_START) if quick else []
    return eff.plan_jobs(cfg, [cfg.baseline], [seed], "eval", work.resolve(), extra, warm)


def prepare_default_run(work: Path, quick: bool, seed: int = 0) -> Path:
    """Train (or reuse / resume) the subject run; returns its run directory."""
    sft_jobs, runs = plan(work, quick, seed)
    failures = eff.execute(sft_jobs, runs, workers=1, keep_checkpoints=True)
    if failures:
        raise RuntimeError("the mechanism subject run failed: " + "; ".join(failures))
    return runs[0].run_dir
