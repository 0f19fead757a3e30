"""A harness for fault trials: real training processes killed, corrupted, resumed and compared.

Used by ``tests/reliability`` and ``benchmarks/faults.py``. Every training run
is a real ``nemo-gdro train`` (:func:`nemo_gdro.cli.main`) in its own process.
The processes are forked from a ``forkserver`` that has imported torch,
Megatron and transformers once, so a trial pays seconds, not the ~15 s import,
per run; a run is still an independent process that ``kill -9`` ends at an
arbitrary instruction.

Faults:

- :meth:`Launcher.kill_during_save`: SIGKILL while a checkpoint is being
  written (the ``.tmp_step_*`` directory of the save in progress exists);
- :meth:`Launcher.kill_after`: SIGKILL after a random delay (anywhere: a
  step, an evaluation, a save, the metrics write);
- :func:`corrupt_newest`: damage the newest checkpoint (flip a byte,
  truncate a file, delete the manifest).

A run "lost data" when its metrics or eval records miss or repeat a step,
or its final checkpoint is missing; it is "identical" when its final weights
and every logged value (timings aside) equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "JOB_ARGS",
    "Launcher",
    "RunOutcome",
    "compare_runs",
    "corrupt_newest",
    "final_weights",
    "logged_steps",
    "prepare_reference",
    "seed_run",
]

#: The job of the fault trials: a tiny real run with every checkpointed controller kind (Prompt-GDRO,
#: Rollout-GDRO, R²VPO dual and replay), a checkpoint every step and an evaluation every 2 steps. 40 SFT
#: steps make some answers right, so the RL steps have rewards and gradients (the weights change).
JOB_ARGS = [
    "sft.steps=40", "sft.batch_size=32", "data.num_train=64", "data.num_eval=4", "trainer.prompts_per_step=8",
    "rollout.n=4", "eval.k=1", "rollout.max_new_tokens=4", "trainer.eval_every=2", "trainer.checkpoint_every=1",
    "trainer.keep_last_checkpoints=3", "trainer.micro_batch_size=16", "logging.tensorboard=false",
    "logging.progress=false", "algorithm.loss=r2vpo", "algorithm.replay.ratio=0.5",
    "algorithm.advantage_weighting=prompt_gdro", "algorithm.rollout_scheduler=rollout_gdro",
]

# What the forkserver imports once (the expensive part of starting a run).
_PRELOAD = ["nemo_gdro.cli", "nemo_gdro.trainer.loop", "nemo_gdro.trainer.plots", "megatron.core", "transformers"]


def _child(args: list[str], log: str) -> None:
    """Body of one training process: the CLI's ``train`` with stdout/stderr to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from nemo_gdro.cli import main

    code = main(["train", *args])
    os._exit(code)


@dataclass
class RunOutcome:
    exitcode: int | None
    killed: bool
    log: str


class Launcher:
    """Starts training processes from one pre-warmed forkserver (create once, reuse)."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(_PRELOAD)

    def start(self, args: list[str], log: Path) -> mp.process.BaseProcess:
        proc = self.ctx.Process(target=_child, args=(list(args), str(log)), daemon=True)
        proc.start()
        return proc

    def run(self, args: list[str], log: Path, timeout: float = 900.0) -> RunOutcome:
        """Run to completion (or ``timeout``, then SIGKILL)."""
        proc = self.start(args, log)
        proc.join(timeout)
        killed = proc.is_alive()
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        return RunOutcome(proc.exitcode, killed, _read(log))

    def kill_after(self, args: list[str], log: Path, delay: float, timeout: float = 900.0) -> RunOutcome:
        """SIGKILL the run ``delay`` seconds after its start (if it is still running)."""
        proc = self.start(args, log)
        proc.join(delay)
        killed = proc.is_alive()
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout)
        return RunOutcome(proc.exitcode, killed, _read(log))

    def kill_during_save(
        self, args: list[str], log: Path, checkpoints: Path, skip_saves: int = 0, timeout: float = 900.0
    ) -> RunOutcome:
        """SIGKILL the run while a checkpoint is being written (after ``skip_saves`` earlier saves).

        Polls ``checkpoints`` for the temp dir of a save in progress; ``killed``
        is True only when the kill landed inside a save (its temp dir is left).
        """
        proc = self.start(args, log)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while proc.is_alive() and time.monotonic() < deadline:
            tmp = _tmp_dirs(checkpoints)
            fresh = tmp - seen
            if fresh:
                if len(seen) >= skip_saves:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.join()
                    return RunOutcome(proc.exitcode, bool(_tmp_dirs(checkpoints)), _read(log))
                seen |= fresh
            time.sleep(0.001)
        proc.join(max(deadline - time.monotonic(), 1.0))
        return RunOutcome(proc.exitcode, False, _read(log))

    def signal_after_step(
        self, args: list[str], log: Path, run_dir: Path, step: int, signum: int = signal.SIGTERM, timeout: float = 900.0
    ) -> RunOutcome:
        """Send ``signum`` once ``metrics.jsonl`` holds RL step ``step``; wait for the run to end."""
        proc = self.start(args, log)
        deadline = time.monotonic() + timeout
        while proc.is_alive() and time.monotonic() < deadline:
            if step in logged_steps(run_dir, rl_only=True):
                os.kill(proc.pid, signum)
                break
            time.sleep(0.01)
        proc.join(max(deadline - time.monotonic(), 1.0))
        return RunOutcome(proc.exitcode, False, _read(log))


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _tmp_dirs(checkpoints: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(checkpoints) if e.name.startswith(".tmp_step_")}
    except FileNotFoundError:
        return set()


# ----------------------------------------------------------------------------- faults on disk
def corrupt_newest(checkpoints: Path, rng: random.Random) -> str:
    """Damage the newest ``step_*`` checkpoint in one random way; returns what was done."""
    steps = sorted(p for p in Path(checkpoints).glob("step_*") if p.is_dir())
    if not steps:
        return "nothing to corrupt"
    target = steps[-1]
    files = sorted(p for p in target.iterdir() if p.is_file())
    kind = rng.choice(["flip", "truncate", "manifest"])
    if kind == "manifest":
        (target / "manifest.json").unlink(missing_ok=True)
        return f"deleted {target.name}/manifest.json"
    victim = rng.choice([f for f in files if f.name != "manifest.json"] or files)
    data = bytearray(victim.read_bytes())
    if kind == "truncate" or not data:
        victim.write_bytes(bytes(data[: len(data) // 2]))
        return f"truncated {target.name}/{victim.name}"
    i = rng.randrange(len(data))
    data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    return f"flipped byte {i} of {target.name}/{victim.name}"


# ----------------------------------------------------------------------------- outcomes
def logged_steps(run_dir: Path, *, rl_only: bool = False, kind: str = "metrics") -> list[int]:
    """Steps of ``metrics.jsonl`` (or ``eval.jsonl``) in file order (``rl_only``: RL step records)."""
    path = Path(run_dir) / f"{kind}.jsonl"
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a live run
        if rl_only and "train/reward_mean" not in row:
            continue
        out.append(int(row["step"]))
    return out


def _rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / f"{kind}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def final_weights(run_dir: Path) -> dict[str, Any] | None:
    """The actor's model tensors of the newest verified checkpoint (None if there is none)."""
    from nemo_gdro.trainer.checkpoint import CheckpointManager

    import warnings

    mgr = CheckpointManager(Path(run_dir) / "checkpoints")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = mgr.latest()
    if path is None:
        return None
    return mgr.load(path)["actor"]["model"]


def compare_runs(reference: Path, run: Path, max_steps: int) -> dict[str, Any]:
    """``{"lost": [...problems], "identical": bool, "differences": [...]}`` of ``run`` against ``reference``."""
    import torch

    lost: list[str] = []
    for kind in ("metrics", "eval"):
        ref_steps, steps = Counter(logged_steps(reference, kind=kind)), Counter(logged_steps(run, kind=kind))
        if steps != ref_steps:
            missing = sorted((ref_steps - steps).elements())
            extra = sorted((steps - ref_steps).elements())
            lost.append(f"{kind}.jsonl: missing steps {missing}, duplicated/extra {extra}")
    rl = logged_steps(run, rl_only=True)
    if rl != list(range(1, max_steps + 1)):
        lost.append(f"RL steps logged {rl}")
    differences: list[str] = []
    ref_w, w = final_weights(reference), final_weights(run)
    if w is None:
        lost.append("no final checkpoint")
    elif ref_w is not None:
        differences += [k for k in ref_w if not torch.equal(ref_w[k], w[k])]
    for kind in ("metrics", "eval"):
        a = {(r["step"], i): r for i, r in enumerate(_rows(reference, kind))}
        b = {(r["step"], i): r for i, r in enumerate(_rows(run, kind))}
        for key, row in a.items():
            other = b.get(key)
            if other is None:
                continue
            for name, value in row.items():
                if not name.startswith("time/") and other.get(name) != value:
                    differences.append(f"{kind} step {key[0]} {name}")
    return {"lost": lost, "identical": not lost and not differences, "differences": differences[:10]}


# ----------------------------------------------------------------------------- the shared starting point
def seed_run(warm: Path, run: Path) -> None:
    """``run`` starts from the warm start's step-0 checkpoint (its step-0 records come back from it on resume)."""
    import shutil

    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(warm / "checkpoints" / "step_00000000", run / "checkpoints" / "step_00000000")


def prepare_reference(launcher: Launcher, root: Path, steps: int) -> tuple[Path, Path, float]:
    """Train the warm start once and an uninterrupted reference of ``steps`` RL steps from it.

    Returns ``(warm, reference, seconds the reference run took)``; raises RuntimeError if either fails.
    """
    warm, reference = root / "warm", root / "reference"
    warm_run = launcher.run([*JOB_ARGS, "trainer.max_steps=1", f"run.output_dir={warm}"], root / "warm.log")
    if warm_run.exitcode != 0:
        raise RuntimeError(f"warm start failed (rc {warm_run.exitcode}):\n{warm_run.log[-3000:]}")
    seed_run(warm, reference)
    t0 = time.monotonic()
    ref = launcher.run([*JOB_ARGS, f"trainer.max_steps={steps}", f"run.output_dir={reference}"], root / "reference.log")
    if ref.exitcode != 0:
        raise RuntimeError(f"reference run failed (rc {ref.exitcode}):\n{ref.log[-3000:]}")
    return warm, reference, time.monotonic() - t0
