"""One run of the efficacy benchmark: the real ``Trainer`` on the testbed splits.

What this adds to ``nemo_gdro.trainer.loop.Trainer`` (benchmark-side, until the
loop reads these keys itself; see ``TESTBED_KEYS``):

- the testbed data: an RL pool revisited many times, a held-out eval split, a
  validation split for choosing settings, and an SFT pool disjoint from all
  three (``nemo_gdro.data.dataset.arithmetic_splits``), read from ``data.*``
  keys added with ``++`` overrides; ``eval.split`` picks what is evaluated;
- a warm start shared by every method of a seed: ``prepare_sft`` trains SFT
  once and writes the exported HF weights; a run given ``sft_weights`` loads
  them instead of training SFT again;
- controller time: wall time spent inside the controllers (classifier, store,
  Prompt-GDRO, bin index, Rollout-GDRO, DynaMO allocator, R2VPO multiplier,
  replay buffer, loss signal), logged per step as ``time/controller_ms``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_gdro.data.arithmetic import ArithmeticConfig
from nemo_gdro.data.dataset import ArithmeticSplits, PromptDataset, arithmetic_splits
from nemo_gdro.trainer.loop import Trainer

# data.* / eval.* keys the testbed reads (absent keys: the loop's defaults).
TESTBED_KEYS = (
    "data.num_validation",
    "data.num_sft",
    "data.unique_train",
    "data.digit_probs",
    "data.op_probs",
    "data.max_mul_digits",
    "data.sft_digit_probs",
    "eval.split",
)

# (attribute of the trainer, methods of it that are controller work).
_TIMED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("classifier", ("classify",)),
    ("store", ("observe",)),
    ("prompt_gdro", ("sample_prompts", "response_weights", "importance_weights", "observe")),
    ("bin_index", ("move",)),
    ("rollout_gdro", ("allocate", "observe")),
    ("dynamo", ("allocate", "refresh_epoch")),
    ("dual", ("update",)),
    ("replay", ("evict", "sample", "add")),
)


def _mix(cfg: DictConfig, prefix: str = "") -> ArithmeticConfig | None:
    """The arithmetic distribution from ``data.{prefix}digit_probs`` etc.; None = the task default."""
    d = cfg.data
    digits = d.get(f"{prefix}digit_probs")
    ops = d.get("op_probs")
    mul = d.get("max_mul_digits")
    if digits is None and ops is None and mul is None:
        return None
    base = ArithmeticConfig()
    try:
        return ArithmeticConfig(
            digit_probs=tuple(float(x) for x in digits) if digits is not None else base.digit_probs,
            op_probs=tuple(float(x) for x in ops) if ops is not None else base.op_probs,
            max_mul_digits=int(mul) if mul is not None else base.max_mul_digits,
        )
    except ValueError as err:
        raise ValueError(f"data.{prefix}digit_probs / data.op_probs / data.max_mul_digits: {err}") from None


def testbed_splits(cfg: DictConfig) -> ArithmeticSplits:
    """The splits the run's ``data.*`` keys describe."""
    d = cfg.data
    mix = _mix(cfg)
    return arithmetic_splits(
        int(d.num_train),
        int(d.num_eval),
        int(d.seed),
        mix,
        num_validation=int(d.get("num_validation", 0) or 0),
        num_sft=int(d.get("num_sft", 0) or 0),
        unique_train=bool(d.get("unique_train", False)),
        sft_config=_mix(cfg, "sft_") if d.get("sft_digit_probs") is not None else mix,
    )


class BenchTrainer(Trainer):
    """``Trainer`` on the testbed splits, with an optional shared SFT start and controller timing.

    Args:
        cfg: the composed run config (``data.*`` testbed keys as in ``TESTBED_KEYS``).
        sft_weights: exported HF weights of the warm start (``prepare_sft``); the
            SFT stage loads them instead of training.
    """

    def __init__(self, cfg: DictConfig, *, sft_weights: str | os.PathLike[str] | None = None) -> None:
        self.sft_weights = Path(sft_weights) if sft_weights is not None else None
        self._controller_s = 0.0
        super().__init__(cfg)

    # ----------------------------------------------------------------- building
    def _build(self) -> None:
        super()._build()
        splits = testbed_splits(self.cfg)
        if len(splits.train) != len(self.train_ds):
            raise RuntimeError("testbed train pool must have data.num_train prompts (the store is sized by it)")
        split = str(self.cfg.eval.get("split", "eval"))
        if split not in ("eval", "validation"):
            raise ValueError(f"eval.split must be 'eval' or 'validation', got {split!r}")
        if split == "validation" and splits.validation is None:
            raise ValueError("eval.split=validation needs data.num_validation > 0")
        self.splits = splits
        self.train_ds = splits.train
        self.eval_ds = splits.validation if split == "validation" else splits.eval
        self.sft_ds: PromptDataset = splits.sft_pool
        for attr, methods in _TIMED:
            obj = getattr(self, attr, None)
            if obj is not None:
                for name in methods:
                    self._time(obj, name)
        self._loss_signal = self._timed_fn(self._loss_signal)

    def _timed_fn(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._controller_s += time.perf_counter() - t0

        return wrapper

    def _time(self, obj: object, name: str) -> None:
        if hasattr(obj, name):
            setattr(obj, name, self._timed_fn(getattr(obj, name)))

    # ---------------------------------------------------------------- stages
    def sft(self) -> dict[str, float]:
        if self.sft_weights is not None:
            self.actor.import_hf_state_dict(torch.load(self.sft_weights, map_location="cpu", weights_only=True))
            return {"sft/loaded": 1.0}
        rl_pool, self.train_ds = self.train_ds, self.sft_ds
        try:
            return super().sft()
        finally:
            self.train_ds = rl_pool

    def evaluate(self, step: int) -> dict[str, float]:
        # The before-SFT evaluation says nothing about the methods; skip its cost.
        return {} if step < 0 else super().evaluate(step)

    def rl_step(self, step: int) -> dict[str, float]:
        self._controller_s = 0.0
        metrics = super().rl_step(step)
        metrics["time/controller_ms"] = 1e3 * self._controller_s
        return metrics


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_sft(cfg: DictConfig, path: str | os.PathLike[str]) -> dict[str, float]:
    """Train the SFT warm start of ``cfg`` once and write its exported HF weights to ``path`` (atomic).

    Returns the SFT metrics. Does nothing (returns ``{}``) when ``path`` exists.
    """
    path = Path(path)
    if path.is_file():
        return {}
    with BenchTrainer(cfg) as trainer:
        t0 = time.perf_counter()
        metrics = trainer.sft()
        metrics["sft/time_s"] = time.perf_counter() - t0
        _atomic_save(trainer.actor.export_hf_state_dict(), path)
    return metrics


def run_one(cfg: DictConfig, sft_weights: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Train one (method, seed) run to ``trainer.max_steps``; returns the final eval."""
    with BenchTrainer(cfg, sft_weights=sft_weights) as trainer:
        result = trainer.run()
    return {"output_dir": str(result.output_dir), "final_eval": result.final_eval, "steps": result.steps_done}


def compose_run(overrides: list[str]) -> DictConfig:
    """The run config: ``conf/train.yaml`` with ``overrides`` (``++`` for testbed keys)."""
    from nemo_gdro.trainer.config import compose

    cfg = compose("train", overrides)
    OmegaConf.set_readonly(cfg, False)
    return cfg
