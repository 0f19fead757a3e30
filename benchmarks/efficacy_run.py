"""The jobs of the efficacy benchmark: one warm start per seed, then one run per (method, seed).

Both are ordinary ``nemo-gdro train`` runs (``nemo_gdro.trainer.loop.train``)
built from override lists; nothing here changes how a run trains.

- warm start (``sft_overrides``): the testbed's SFT on the SFT pool (disjoint
  from the RL pool), one RL step (the loop needs ``max_steps >= 1``), and an HF
  export of the weights at the end of SFT: ``<dir>/hf/step_00000000``
  (``checkpoint.save_hf``). It evaluates on the validation split.
- method run (``method_overrides``): the testbed and the method's overrides,
  starting from that export (``model=hf ... sft.steps=0``), so every method of a
  seed starts from the same weights and sees the same data.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Where a warm start's weights are, relative to its run directory.
SFT_EXPORT = Path("hf") / "step_00000000"
#: Overrides of every benchmark job (quiet logs, no TensorBoard files).
_QUIET = ("logging.progress=false", "logging.tensorboard=false")


def sft_overrides(testbed: Sequence[str], warm_start: Sequence[str], seed: int, out_dir: Path) -> list[str]:
    """Overrides of the warm-start job of ``seed`` (writes ``out_dir / SFT_EXPORT``)."""
    return [
        *testbed,
        *warm_start,
        f"run.seed={seed}",
        "trainer.max_steps=1",
        "trainer.checkpoint_every=0",
        "checkpoint.save_hf=true",
        "checkpoint.hf_dtype=float32",
        "++data.eval_split=validation",
        f"run.output_dir={out_dir}",
        "run.resume=auto",
        *_QUIET,
    ]


def method_overrides(
    testbed: Sequence[str], method: Sequence[str], seed: int, split: str, sft_dir: Path, run_dir: Path
) -> list[str]:
    """Overrides of one method run: the testbed, the method, the seed's warm start, the eval split."""
    return [
        *testbed,
        "model=hf",
        f"model.path={sft_dir / SFT_EXPORT}",
        "model.dtype=float32",
        "sft.steps=0",
        *method,
        f"run.seed={seed}",
        f"++data.eval_split={split}",
        f"run.output_dir={run_dir}",
        "run.resume=auto",
        "checkpoint.save_hf=false",
        *_QUIET,
    ]


def sft_ready(sft_dir: Path) -> bool:
    """True when the warm start's export exists (its config.json is written last, atomically)."""
    return (sft_dir / SFT_EXPORT / "config.json").is_file()


def run_finished(run_dir: Path, max_steps: int) -> bool:
    """True when ``run_dir`` holds an evaluation at ``max_steps`` (the last step of a run)."""
    from nemo_gdro.trainer.metrics import EVAL_FILE, read_jsonl

    path = run_dir / EVAL_FILE
    return path.is_file() and any(int(e.get("step", -1)) == max_steps and "eval/pass@1" in e for e in read_jsonl(path))


def init_worker() -> None:
    """One thread per worker process (the benchmark runs several in parallel)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from nemo_gdro.cli import _quiet_third_party_warnings

    _quiet_third_party_warnings()


def _redirect(log_path: Path) -> None:
    """Send this process's stdout/stderr (file descriptors, so C-level output too) to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def train_job(overrides: list[str], out_dir: str, keep_checkpoints: bool) -> dict[str, Any]:
    """Run one training job in this (worker) process; its log is ``<out_dir>.log``.

    Returns the final evaluation and the wall time. Checkpoints are deleted
    afterwards unless ``keep_checkpoints`` (the JSONL files and exports stay).
    """
    from nemo_gdro.trainer.loop import train

    out = Path(out_dir)
    _redirect(out.with_name(out.name + ".log"))
    t0 = time.perf_counter()
    result = train(overrides)
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"final_eval": result.final_eval, "steps": result.steps_done, "wall_s": time.perf_counter() - t0}
