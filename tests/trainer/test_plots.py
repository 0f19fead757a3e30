"""End-of-run plots and summary from synthetic metrics files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from nemo_gdro.trainer.metrics import MetricsLogger
from nemo_gdro.trainer.plots import make_plots, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_BINS = 5


def _synthetic_run(run_dir: Path, steps: int = 40) -> None:
    """A run with every key family the plots know, including NaNs and missing entries."""
    rng = np.random.default_rng(0)
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for s in range(1, steps + 1):
            share = rng.dirichlet(np.ones(NUM_BINS))
            weight = rng.dirichlet(np.ones(NUM_BINS)) * NUM_BINS
            m: dict[str, float] = {
                "train/reward_mean": 0.2 + 0.5 * s / steps + 0.05 * rng.standard_normal(),
                "time/step_s": 1.5,
            }
            for b in range(NUM_BINS):
                m[f"prompt_gdro/response_share/{b}"] = share[b]
                m[f"bins/prompt_share/{b}"] = share[b]
                # a bin absent from a step's batch has no weight: NaN (null in the file), a blank heatmap cell
                m[f"prompt_gdro/weight/{b}"] = float("nan") if b == 4 and s % 4 == 0 else weight[b]
                m[f"rollout_gdro/n_b/{b}"] = 2 + b
                # hardest bin sometimes has no prompts: NaN reward
                m[f"bins/reward_mean/{b}"] = float("nan") if b == 0 and s % 3 == 0 else b / NUM_BINS + 0.01 * s
            for n in (2, 4, 8):
                m[f"alloc/n_hist/{n}"] = int(rng.integers(0, 20))
            if s == 7:
                m["train/reward_mean"] = float("nan")
                del m["prompt_gdro/weight/3"]
            logger.log(s, m)
            if s % 10 == 0:
                logger.log_eval(s, {"pass@1": 0.1 + s / 200, "mean@4": 0.15 + s / 250,
                                    **{f"pass@1/band_{x}": i / 3 + s / 400 for i, x in enumerate(("hard", "medium", "easy"))}})


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 2000, f"{path} is suspiciously small"


def test_plots_for_full_synthetic_run(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    paths = make_plots(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "reward.png", "eval.png", "eval_bands.png", "heatmap_prompt_share.png", "heatmap_response_share.png",
        "heatmap_prompt_gdro_weight.png", "heatmap_rollouts_per_prompt.png", "bin_reward.png", "alloc_hist.png",
    ])
    for p in paths:
        assert p.parent == tmp_path / "plots"
        _assert_png(p)
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temp files left

    summary = write_summary(tmp_path).read_text()
    assert "steps logged: 40 (step 1 .. 40)" in summary
    assert "final" in summary and "best" in summary
    assert "eval/pass@1: 0.15 (step 10) -> 0.3 (step 40)" in summary
    assert "wall time" in summary and "60.0 s" in summary  # 40 x 1.5 s
    assert str(tmp_path / "plots") in summary and "reward.png" in summary


def test_plots_skip_missing_keys_and_files(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"train/reward_mean": 0.3})  # a single point still plots
        logger.log(2, {"other": 1.0, "rollout_gdro/n_b/0": float("nan")})  # all-NaN heatmap: skipped
    paths = make_plots(tmp_path)
    assert [p.name for p in paths] == ["reward.png"]
    _assert_png(paths[0])
    summary = write_summary(tmp_path).read_text()
    assert "eval: none logged" in summary and "wall time: not logged" in summary


def test_empty_and_missing_run_dirs(tmp_path: Path) -> None:
    assert make_plots(tmp_path) == []  # no metrics files at all
    text = write_summary(tmp_path).read_text()
    assert "steps logged: 0" in text and "not logged" in text
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        make_plots(tmp_path / "does_not_exist")


def test_eval_keys_in_metrics_file_and_truncated_tail(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for s in range(1, 4):
            logger.log(s, {"eval/pass@1": s / 10, "eval/pass@1/band_0": math.nan if s == 2 else s / 20})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "eval/pa')  # crashed mid-line
    names = sorted(p.name for p in make_plots(tmp_path))
    assert names == ["eval.png", "eval_bands.png"]


def test_records_sharing_a_step_are_merged(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_eval(0, {"pass@1/before_sft": 0.1})
        logger.log_eval(0, {"pass@1": 0.2})
        logger.log_eval(5, {"pass@1": 0.4})
    summary = write_summary(tmp_path).read_text()
    assert "eval/pass@1: 0.2 (step 0) -> 0.4 (step 5)" in summary
    # Logged once, before SFT: one value on its own line, not a meaningless "0.1 -> 0.1".
    assert "eval before SFT: pass@1 0.1" in summary and "before_sft: 0.1 (step 0) ->" not in summary
