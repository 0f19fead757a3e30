"""A real tiny training run (arithmetic task, char tokenizer, one RL step) for the export / eval tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

#: One RL step at tiny size, a checkpoint at steps 0 and 1 (seconds on CPU).
TINY_RUN = [
    "sft.steps=0", "data.num_train=32", "data.num_eval=2", "trainer.prompts_per_step=4", "rollout.n=4", "eval.k=1",
    "rollout.max_new_tokens=3", "trainer.eval_every=0", "trainer.checkpoint_every=1", "trainer.max_steps=1",
    "trainer.micro_batch_size=8", "trainer.minibatches_per_step=1", "logging.tensorboard=false",
    "logging.progress=false",
]

#: One RL step whose random-weight groups still have advantages: the overlong penalty's length-dependent
#: rewards vary within a group (for tests of the loss, the behaviour log-probs and multi-pass).
TINY_OVERLONG = [
    "sft.steps=0",
    "trainer.max_steps=1",
    "data.num_train=48",
    "data.num_eval=6",
    "trainer.prompts_per_step=4",
    "trainer.minibatches_per_step=1",
    "rollout.n=4",
    "rollout.max_new_tokens=8",
    "reward.overlong.enabled=true",
    "reward.overlong.buffer_tokens=8",
    "optim.lr=1e-2",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "logging.tensorboard=false",
    "logging.progress=false",
]

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from nemo_gdro.trainer.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
    """
)


def train_tiny_run(out: Path) -> Path:
    """Train :data:`TINY_RUN` into ``out`` (in this process); returns ``out``."""
    from nemo_gdro.trainer.config import compose
    from nemo_gdro.trainer.loop import Trainer

    with Trainer(compose(overrides=[*TINY_RUN, f"run.output_dir={out}"])) as trainer:
        trainer.run()
    return out


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s writer lock, as a run that is still training does (kill it after)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` -> (size, mtime_ns): equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }
