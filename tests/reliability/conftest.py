"""Shared runs of the fault suite: one forkserver of real training processes, one warm start, one reference.

Everything here is a real training run (Megatron actor, HF engine, verifier, controllers) at tiny size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from nemo_gdro.testing.faults import JOB_ARGS, Launcher, prepare_reference

#: RL steps of the reference job the kill / signal trials are compared with.
STEPS = 2

#: In-process runs (pytest's own process): tiny, no SFT (the RL gradients are then ~0, which these tests do not need).
TINY = [
    "sft.steps=0", "data.num_train=32", "data.num_eval=2", "trainer.prompts_per_step=4", "rollout.n=4", "eval.k=1",
    "rollout.max_new_tokens=3", "trainer.eval_every=0", "trainer.checkpoint_every=1", "trainer.keep_last_checkpoints=5",
    "trainer.micro_batch_size=8", "trainer.minibatches_per_step=1", "logging.tensorboard=false",
    "logging.progress=false",
]


@dataclass
class Campaign:
    launcher: Launcher
    warm: Path
    reference: Path
    run_s: float

    def args(self, run: Path, steps: int = STEPS) -> list[str]:
        return [*JOB_ARGS, f"trainer.max_steps={steps}", f"run.output_dir={run}", "run.resume=auto"]


@pytest.fixture(scope="session")
def launcher() -> Launcher:
    return Launcher()


@pytest.fixture(scope="session")
def campaign(launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    root = tmp_path_factory.mktemp("campaign")
    warm, reference, run_s = prepare_reference(launcher, root, STEPS)
    return Campaign(launcher, warm, reference, run_s)
