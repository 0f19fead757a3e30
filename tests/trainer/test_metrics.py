"""Metrics logger (JSONL, TensorBoard, resume truncation), JSONL reader and progress bar."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_gdro.trainer.metrics import MetricsLogger, ProgressBar, read_jsonl


def test_log_writes_flushed_jsonl_and_tensorboard(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train/reward_mean": 0.5, "n": np.int64(3), "t": torch.tensor(2.5), "flag": True})
    # flushed immediately: readable before close
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "train/reward_mean": 0.5, "n": 3, "t": 2.5, "flag": 1}
    ]
    logger.log(2, {"train/reward_mean": float("nan"), "x": float("inf")})
    logger.log_eval(2, {"pass@1": 0.25, "eval/mean@4": 0.3})
    logger.close()
    logger.close()  # idempotent
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "train/reward_mean": None, "x": None}  # strict JSON
    assert read_jsonl(tmp_path / "eval.jsonl") == [{"step": 2, "eval/pass@1": 0.25, "eval/mean@4": 0.3}]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_bad_metrics_are_named(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'loss'"):
            logger.log(1, {"loss": "high"})
        with pytest.raises(TypeError, match="'vec'"):
            logger.log(1, {"vec": torch.ones(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 3})
        with pytest.raises(TypeError, match="step must be an int"):
            logger.log(1.5, {"a": 1})  # type: ignore[arg-type]
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_resume_drops_later_steps_and_truncated_tail(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for s in range(1, 6):
            logger.log(s, {"r": s / 10})
            if s % 2 == 0:
                logger.log_eval(s, {"pass@1": s / 100})
    # crash while writing step 6
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "r": 0.')
    # resume from the checkpoint of step 3: steps 4, 5 (and the half line) are replayed
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as logger:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        assert [r["step"] for r in read_jsonl(tmp_path / "eval.jsonl")] == [2]
        logger.log(4, {"r": 0.44})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["r"] == 0.44


def _log_run(tmp_path: Path, steps: int, checkpoint_every: int) -> list[dict]:
    """Log ``steps`` steps, taking the logger's tail at each 'checkpoint'; returns the tails."""
    tails = []
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"sft/loss": 1.0})
        logger.log_eval(0, {"pass@1/before_sft": 0.0})
        logger.log_eval(0, {"pass@1": 0.1})
        tails.append(logger.tail())
        logger.mark_checkpoint(0)
        for s in range(1, steps + 1):
            logger.log(s, {"r": s / 10})
            if s % 2 == 0:
                logger.log_eval(s, {"pass@1": s / 100})
            if s % checkpoint_every == 0:
                tails.append(logger.tail())
                logger.mark_checkpoint(s)
    return tails


def test_resume_restores_records_the_file_lost_from_the_checkpoint(tmp_path: Path) -> None:
    tails = _log_run(tmp_path, 6, checkpoint_every=3)
    expected_metrics = read_jsonl(tmp_path / "metrics.jsonl")
    expected_eval = read_jsonl(tmp_path / "eval.jsonl")
    assert tails[1]["since"] == 0 and [r["step"] for r in tails[1]["metrics"]] == [1, 2, 3]
    # The file lost its tail (a torn line, an unsynced write) down to step 1, and has a damaged last line.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 2, "r"')
    (tmp_path / "eval.jsonl").write_text("")
    # Resume from the checkpoint of step 3, which holds the records of steps 1..3.
    with pytest.warns(UserWarning, match=r"restored 2 record\(s\) up to step 3"):
        logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=3, resume_log=tails[1])
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == expected_metrics[:4]  # steps 0..3, each once
    # eval.jsonl lost everything, including the step-0 records of the previous checkpoint's tail
    assert [r["step"] for r in read_jsonl(tmp_path / "eval.jsonl")] == [2]
    # ... which the step-0 checkpoint's tail restores when resuming from it.
    (tmp_path / "eval.jsonl").write_text("")
    with pytest.warns(UserWarning, match="restored"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=0, resume_log=tails[0]).close()
    assert read_jsonl(tmp_path / "eval.jsonl") == expected_eval[:2]


def test_resume_never_duplicates_a_step(tmp_path: Path) -> None:
    tails = _log_run(tmp_path, 6, checkpoint_every=3)
    before = read_jsonl(tmp_path / "metrics.jsonl")
    for _ in range(2):  # resuming twice from the same checkpoint changes nothing up to its step
        with MetricsLogger(tmp_path, tensorboard=False, resume_step=3, resume_log=tails[1]) as logger:
            logger.log(4, {"r": 0.4})
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4] and read_jsonl(tmp_path / "metrics.jsonl")[:4] == before[:4]


def test_resume_with_tensorboard_and_fresh_run_backup(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"r": 1.0})
        logger.log(2, {"r": 2.0})
    with MetricsLogger(tmp_path, resume_step=1) as logger:  # TB purge_step path
        logger.log(2, {"r": 2.5})
    assert [r["r"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.5]
    # A fresh run in the same dir keeps the old file as a backup instead of mixing or deleting it.
    with pytest.warns(UserWarning, match="fresh run"):
        logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"r": 9.0})
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "r": 9.0}]
    backups = list(tmp_path.glob("metrics.jsonl.bak-*"))
    assert len(backups) == 1 and [r["r"] for r in read_jsonl(backups[0])] == [1.0, 2.5]


def test_read_jsonl_tolerates_only_a_damaged_last_line(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    assert read_jsonl(p) == []
    p.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "a": [1, 2')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: malformed"):
        read_jsonl(p)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_requested_but_missing(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb={"project": "x"})


def test_progress_bar_non_tty_one_line_per_update() -> None:
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream)
    bar.update(1, reward=0.5, pass_rate=0.25, step_time=2.0)
    line = bar.update(2, reward=0.6, pass_rate=0.3, step_time=4.0)
    bar.close()
    out = stream.getvalue().splitlines()
    assert len(out) == 2 and "\r" not in stream.getvalue()
    assert "2/10" in line and "reward 0.600" in line and "pass 30.0%" in line and "4.00s/step" in line
    assert "ETA 0:24" in line  # 8 steps left x mean 3 s


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_tty_redraws_in_place() -> None:
    stream = _FakeTTY()
    bar = ProgressBar(3, stream=stream)
    bar.update(1, reward=float("nan"), step_time=3700.0)
    line = bar.update(3)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "3/3" in line and "ETA 0:00" in line and "reward" not in line
    assert "ETA 2:03:20" in text  # 2 left x 3700 s after the first update
    with pytest.raises(ValueError, match="total_steps"):
        ProgressBar(0)
