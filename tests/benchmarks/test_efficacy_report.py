"""Statistics and report of the efficacy benchmark, on hand-computed inputs and real JSONL files."""

import json
import math

import numpy as np
import pytest

from benchmarks import efficacy_report as er
from nemo_gdro.trainer.metrics import MetricsLogger


def test_t_interval_matches_hand_computation():
    ci = er.mean_ci([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.303: half width 4.303 / sqrt(3)
    assert ci.mean == pytest.approx(2.0)
    assert ci.hi - ci.mean == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert ci.mean - ci.lo == pytest.approx(ci.hi - ci.mean)
    assert ci.n == 3


def test_interval_edge_cases_and_bootstrap():
    one = er.mean_ci([0.5])
    assert (one.mean, one.lo, one.hi, one.n) == (0.5, 0.5, 0.5, 1)
    assert math.isnan(er.mean_ci([]).mean)
    assert er.mean_ci([1.0, math.nan, 3.0]).n == 2
    boot = er.mean_ci(list(np.linspace(0, 1, 20)), "bootstrap", resamples=4000)
    assert boot.lo < 0.5 < boot.hi and boot.hi - boot.lo < 0.4
    with pytest.raises(ValueError, match="bootstrap"):
        er.mean_ci([1.0, 2.0], "wald")
    assert er.t_quantile_975(100) == 1.96
    with pytest.raises(ValueError, match="df"):
        er.t_quantile_975(0)


def test_auc_is_the_mean_level_over_the_span():
    assert er.auc([0, 10], [0.0, 1.0]) == pytest.approx(0.5)
    assert er.auc([0, 10, 30], [0.2, 0.2, 0.2]) == pytest.approx(0.2)
    assert er.auc([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert er.auc([5], [0.3]) == 0.3
    with pytest.raises(ValueError, match="matching"):
        er.auc([0, 1], [0.1])


def test_first_crossing_interpolates_and_reports_never():
    assert er.first_crossing([0, 100, 200], [0.1, 0.2, 0.4], 0.3) == pytest.approx(150.0)
    assert er.first_crossing([0, 100], [0.5, 0.6], 0.3) == 0.0
    assert math.isnan(er.first_crossing([0, 100], [0.1, 0.2], 0.3))


def _write_run(path, finals, *, rollouts=128, tokens=500):
    """A real run directory in the trainer's JSONL format: eval at steps 0, 5, 10."""
    with MetricsLogger(path, tensorboard=False) as log:
        for step in range(1, 11):
            log.log(step, {"train/rollouts": rollouts, "train/response_tokens": tokens,
                           "train/zero_variance_groups": 0.5, "time/controllers_ms": 1.0, "bins/budget_share/0": 0.5, "bins/budget_share/1": 0.5,
                           "rollout_gdro/mu": 0.1 * step, "train/reward_mean": 0.1, "time/step_s": 0.3,
                           "bins/prompt_share/0": 0.25, "bins/prompt_share/1": 0.75})
        for step, p in zip((0, 5, 10), finals):
            log.log_eval(step, {"eval/pass@1": p, "eval/pass@4": min(1.0, 2 * p),
                                "eval/pass@1/band_1": p + 0.1, "eval/pass@1/band_2": p - 0.1})


def test_report_pairs_by_seed(tmp_path):
    runs = {"grpo": [], "better": []}
    base = {0: (0.2, 0.25, 0.30), 1: (0.2, 0.22, 0.26)}
    other = {0: (0.2, 0.30, 0.33), 1: (0.2, 0.28, 0.30)}
    for seed in (0, 1):
        for name, curves in (("grpo", base), ("better", other)):
            d = tmp_path / name / f"seed{seed}"
            _write_run(d, curves[seed])
            runs[name].append(er.load_run(d, name, seed))
    rep = er.build_report(runs, er.ReportOptions(baseline="grpo"), {"note": "test"})
    b = rep["methods"]["better"]
    assert b["per_seed"]["final_pass@1"] == pytest.approx([0.33, 0.30])
    assert b["gain_final_pass@1"]["per_seed_diff"] == pytest.approx([0.03, 0.04])
    assert b["gain_final_pass@1"]["rel"]["mean"] == pytest.approx((0.03 / 0.30 + 0.04 / 0.26) / 2)
    assert b["gain_final_pass@1"]["wins"] == 2
    assert rep["methods"]["grpo"]["gain_final_pass@1"]["diff"]["mean"] == 0.0
    # target = mean GRPO final pass@1 = 0.28; "better" seed 0 crosses between steps 0 and 5 at 0.28
    reach = b["reach_baseline_final"]
    assert reach["reached"] == 2
    assert reach["steps"][0] == pytest.approx(5 * (0.28 - 0.2) / (0.30 - 0.2))
    assert reach["rollouts"][0] == pytest.approx(128 * reach["steps"][0])
    assert b["per_seed"]["rollouts"] == [1280.0, 1280.0]
    assert b["bands_final_pass@1"]["1"]["mean"] == pytest.approx(0.415)
    assert b["bin_occupancy"]["share"][0] == pytest.approx([0.25, 0.75])
    assert b["curve"]["steps"] == [0, 5, 10]
    out = er.write_json(rep, tmp_path / "r.json")
    assert json.loads(out.read_text())["methods"]["better"]["ci"]["final_pass@1"]["n"] == 2
    table = er.markdown_table(rep)
    assert "| better | 2 |" in table and "2/2" in table
    assert "band 1" in er.markdown_bands(rep)
    er.plot_curves(rep, tmp_path / "c.png", {"all": ["grpo", "better"]})
    er.plot_gains(rep, tmp_path / "g.png")
    er.plot_occupancy(rep, tmp_path / "o.png")
    for name in ("c.png", "g.png", "o.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert rep["equal_total_rollouts"] is True
    assert b["ci"]["controller_ms_per_step"]["mean"] == pytest.approx(1.0)
    assert b["diagnostics"]["rollout_gdro/mu"] == pytest.approx(0.55)  # mean of 0.1 * (1..10)
    assert b["budget_share"]["share"][0] == pytest.approx([0.5, 0.5])
    md = er.markdown_report(rep, "t")
    assert "## Costs" in md and "Bin occupancy: better" in md


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no evaluations"):
        er.load_run(tmp_path, "x", 0)
    _write_run(tmp_path / "a", (0.1, 0.2, 0.3))
    runs = {"other": [er.load_run(tmp_path / "a", "other", 0)]}
    with pytest.raises(ValueError, match="baseline method 'grpo'"):
        er.build_report(runs, er.ReportOptions(baseline="grpo"), {})


def test_unequal_rollouts_are_flagged(tmp_path):
    runs = {}
    for name, rollouts in (("grpo", 128), ("other", 120)):
        _write_run(tmp_path / name, (0.1, 0.2, 0.3), rollouts=rollouts)
        runs[name] = [er.load_run(tmp_path / name, name, 0)]
    rep = er.build_report(runs, er.ReportOptions(baseline="grpo"), {})
    assert rep["equal_total_rollouts"] is False
    assert rep["total_rollouts_per_run"] == {"grpo": [1280.0], "other": [1200.0]}


def test_diagnostic_row_reads_the_controllers_figures():
    from benchmarks.efficacy_report import diagnostic_row

    row = diagnostic_row({
        "train/pass_rate": 0.25, "prompt_gdro/score/0": -0.02, "prompt_gdro/score/3": 0.05,
        "prompt_gdro/weight/0": 1.0, "prompt_gdro/weight/3": 0.4, "prompt_gdro/weight/5": 0.0,
        "bins/n_per_prompt/0": 2.5, "r2vpo/lambda": 12.0, "r2vpo/V": float("nan"),
    })
    assert row["train pass rate"] == "0.25"
    assert row["max abs bin score"] == "0.05"
    assert row["bin weights"] == "0.400-1.000"  # a mean of 0 comes only from an old log's absent bin
    assert row["step weight min-max"] == "" and row["effective bin mass"] == ""  # not logged by this run
    new = diagnostic_row({"prompt_gdro/weight/0": 1.001, "prompt_gdro/weight/1": float("nan"),
                          "prompt_gdro/weight_min": 0.9912, "prompt_gdro/weight_max": 1.0011,
                          "prompt_gdro/effective_bin_mass": 0.0021})
    assert new["bin weights"] == "1.001-1.001"
    assert new["step weight min-max"] == "0.991-1.001" and new["effective bin mass"] == "0.0021"
    assert row["n per prompt, bin 0"] == "2.5"
    assert row["R2VPO lambda"] == "12" and row["R2VPO V"] == ""
    assert row["DynaMO budget share acc<0.1"] == ""


def test_start_frontier_is_the_first_ten_steps(tmp_path):
    with MetricsLogger(tmp_path / "r", tensorboard=False) as log:
        for step in range(1, 21):
            log.log(step, {"train/rollouts": 8, "train/reward_mean": step / 100,
                           "train/zero_variance_groups": 1.0 if step <= 10 else 0.0})
        for step in (0, 20):
            log.log_eval(step, {"eval/pass@1": 0.1, "eval/pass@4": 0.2})
    s = er.method_summary([er.load_run(tmp_path / "r", "grpo", 0)], er.ReportOptions(baseline="grpo"))
    assert s["per_seed"]["start_reward_mean"] == pytest.approx([0.055])  # mean of 0.01 .. 0.10
    assert s["per_seed"]["start_zero_variance_groups"] == [1.0]
    assert s["per_seed"]["zero_variance_groups"] == [0.5]


def test_bin_weights_are_averaged_over_the_steps_their_bin_was_present(tmp_path):
    """An absent bin has no weight: NaN (null) in new logs, 0 in old ones; neither enters the mean."""
    nan = float("nan")
    for name, absent in (("old", 0.0), ("new", nan)):
        with MetricsLogger(tmp_path / name, tensorboard=False) as log:
            for step, (w0, w1) in enumerate([(1.0, 0.99), (1.0, absent), (1.01, absent), (0.99, 0.98)], start=1):
                log.log(step, {"train/rollouts": 8, "prompt_gdro/weight/0": w0, "prompt_gdro/weight/1": w1,
                               "prompt_gdro/weight_entropy": 0.0 if step == 1 else 0.5})
            for step in (0, 4):
                log.log_eval(step, {"eval/pass@1": 0.1, "eval/pass@4": 0.2})
        rows = er.read_jsonl(tmp_path / name / "metrics.jsonl")
        assert rows[1]["prompt_gdro/weight/1"] == (0.0 if name == "old" else None)  # NaN survives as null
        diag = er.diagnostics([er.load_run(tmp_path / name, "m", 0)])
        assert diag["prompt_gdro/weight/1"] == pytest.approx(0.985)  # not (0.99 + 0.98) / 4
        assert diag["prompt_gdro/weight/0"] == pytest.approx(1.0)
        assert diag["prompt_gdro/weight_entropy"] == pytest.approx(0.375)  # other keys keep their zeros
        assert er.diagnostic_row(diag)["bin weights"] == "0.985-1.000"
