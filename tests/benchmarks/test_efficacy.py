"""The efficacy benchmark driver: its YAML, its plan, and ``--quick`` end to end (real runs)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import efficacy as eff

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_committed_config_parses_and_every_method_composes(tmp_path):
    cfg = eff.load_config(eff.DEFAULT_CONFIG)
    assert cfg.baseline == "grpo" and len(cfg.seeds) >= 3
    main = cfg.groups["main"]
    for needed in ("grpo", "prompt_gdro_adv", "prompt_gdro_resample", "rollout_gdro_sqrt", "rollout_gdro_bandit",
                   "dynamo_alloc", "dynamo_mod", "dynamo_both", "r2vpo", "r2vpo_replay", "combo", "combo_val"):
        assert needed in main
    # Composing (and type-checking) every method's run config catches a stale override key.
    from nemo_gdro.trainer.config import compose, validate

    sft_jobs, runs = eff.plan_jobs(cfg, list(cfg.methods), cfg.seeds[:1], "validation", tmp_path)
    assert len(sft_jobs) == 1 and len(runs) == len(cfg.methods)
    # The committed testbed: 80 steps x 32 prompts = 10 visits of each of the 256 pool prompts.
    assert {r.max_steps for r in runs} == {80}
    for r in runs:
        tree = compose("train", r.overrides)
        assert tree.model.source == "hf" and tree.sft.steps == 0 and tree.data.eval_split == "validation"
    (sft_ov,) = sft_jobs.values()
    validate(compose("train", sft_ov))


def test_plan_shares_one_warm_start_per_seed_and_names_runs_by_content(tmp_path):
    cfg = dataclasses.replace(eff.load_config(eff.DEFAULT_CONFIG), warm_start_seed=None)
    sft_jobs, runs = eff.plan_jobs(cfg, ["grpo", "r2vpo"], [0, 1], "eval", tmp_path)
    assert len(sft_jobs) == 2
    for seed in (0, 1):
        dirs = {r.sft_dir for r in runs if r.seed == seed}
        assert len(dirs) == 1
    # a changed testbed gets new directories (no stale reuse)
    _, other = eff.plan_jobs(cfg, ["grpo"], [0], "eval", tmp_path, extra=["trainer.max_steps=7"])
    assert other[0].run_dir != runs[0].run_dir and other[0].sft_dir != runs[0].sft_dir and other[0].max_steps == 7


def test_warm_start_seed_gives_every_seed_the_same_warm_start(tmp_path):
    cfg = dataclasses.replace(eff.load_config(eff.DEFAULT_CONFIG), warm_start_seed=0)
    sft_jobs, runs = eff.plan_jobs(cfg, ["grpo", "r2vpo"], [0, 1, 2], "eval", tmp_path)
    (sft_dir,) = sft_jobs
    assert sft_dir.name.startswith("seed0-") and "run.seed=0" in sft_jobs[sft_dir]
    assert {r.sft_dir for r in runs} == {sft_dir}
    # the RL runs still differ by seed (and only the seed)
    assert sorted({r.seed for r in runs}) == [0, 1, 2] and len({r.run_dir for r in runs}) == 6
    bad = tmp_path / "b.yaml"
    bad.write_text("baseline: grpo\nseeds: [0]\nwarm_start_seed: first\nmethods: {grpo: []}\n")
    with pytest.raises(eff.BenchmarkConfigError, match="warm_start_seed"):
        eff.load_config(bad)


def test_bad_config_names_file_and_key(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("baseline: grpo\nseeds: [0]\nmethods: {other: []}\n")
    with pytest.raises(eff.BenchmarkConfigError, match=r"b\.yaml.*baseline 'grpo'"):
        eff.load_config(bad)
    bad.write_text("baseline: grpo\nseeds: [0]\nmethods: {grpo: [1]}\n")
    with pytest.raises(eff.BenchmarkConfigError, match="methods.grpo"):
        eff.load_config(bad)
    bad.write_text("baseline: grpo\nseeds: [0]\nmethods: {grpo: []}\ngroups: {main: [nope]}\n")
    with pytest.raises(eff.BenchmarkConfigError, match="groups.main names unknown methods"):
        eff.load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("baseline: grpo\nseeds: [0]\nmethods: {grpo: [algorithm.no_such_key=1]}\n")
    assert eff.main(["--config", str(good), "--methods", "grpo", "--work-dir", str(tmp_path / "w")]) == 2


@pytest.mark.slow
def test_quick_runs_the_whole_pipeline(tmp_path):
    """``--quick``: warm starts, every stage kind, the report; runs of a seed start from the warm start's weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "efficacy.py"), "--quick", "--split", "validation",
         "--work-dir", str(tmp_path / "work"), "--results", str(results)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((results / "efficacy_quick.json").read_text())
    cfg = eff.load_config(eff.DEFAULT_CONFIG)
    assert list(rep["methods"]) == cfg.quick["methods"]
    assert rep["equal_total_rollouts"] is True
    for name, m in rep["methods"].items():
        assert m["ci"]["final_pass@1"]["n"] == 2, name
        assert m["gain_final_pass@1"]["pairs"] == 2
    check = rep["meta"]["start_check"]
    # Same weights and eval seed: identical step-0 evaluations, equal to the warm-start job's.
    assert check["max_spread_across_methods"] == 0.0
    assert check["max_diff_to_warm_start_job"] == 0.0
    for stem in ("efficacy_quick_curves.png", "efficacy_quick_gains.png", "efficacy_quick_occupancy.png", "efficacy_quick.md"):
        assert (results / stem).stat().st_size > 0
    # Finished runs are reused: a second invocation trains nothing.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "efficacy.py"), "--quick", "--split", "validation",
         "--work-dir", str(tmp_path / "work"), "--results", str(results)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and "0 runs to do (4 already finished)" in again.stdout


def test_report_only_keeps_the_timing_of_the_runs_it_rebuilds(tmp_path):
    """--report-only runs nothing: the rebuilt report keeps the previous report's wall time."""
    old = tmp_path / "efficacy.json"
    assert eff.previous_timing(old) == {}  # no previous report: nothing to carry
    old.write_text(json.dumps({"meta": {"wall_s": 2990.0, "load_avg_at_start": [0.1], "load_avg_at_end": [5.0]}}))
    kept = eff.previous_timing(old)
    assert kept["wall_s"] == 2990.0 and kept["load_avg_at_end"] == [5.0]
    assert "carried over" in kept["timing"]
    old.write_text(json.dumps({"meta": {"wall_s": None}}))  # an earlier --report-only: no timing to carry
    assert eff.previous_timing(old) == {}
    old.write_text("{not json")
    assert eff.previous_timing(old) == {}
