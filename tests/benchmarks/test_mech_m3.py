"""M3 of the mechanism benchmark (stale data at frozen policies) and its training sweep's plan.

The end-to-end test trains a real toy GRPO run (warm start + 3 steps, a
checkpoint after each) and runs ``run_m3(quick=True)`` on it: real model,
engine, verifier and the actor's own gradients.
"""

import json
import math
from pathlib import Path

import pytest

from benchmarks import efficacy as eff
from benchmarks import mech_m3 as m3
from benchmarks import mech_m3_sweep as sweep


# --------------------------------------------------------------------------- pure parts
def test_choose_steps_needs_every_stale_checkpoint():
    have = list(range(0, 41))
    assert m3.choose_steps(have, (40, 20), (0, 1, 2, 4, 8, 16)) == [40, 20]
    # t = 10 lacks step -6: left out; none left: a clear error naming the setting
    assert m3.choose_steps(have, (40, 10), (0, 16)) == [40]
    with pytest.raises(ValueError, match="checkpoint_every=1"):
        m3.choose_steps([0, 40], (40,), (0, 1))
    # quick (no wanted step): the last step whose t - k all exist
    assert m3.choose_steps([0, 1, 2, 3, 5], (), (0, 1, 2)) == [3]


def test_dual_lambda_is_the_fixed_point_of_the_additive_update():
    from nemo_gdro.algorithms.configs import R2VPOConfig

    cfg = R2VPOConfig()  # delta 0.04, eta 10, lam_max 100, lam_0 0
    assert m3.dual_lambda(cfg, 0.001) == 0.0
    assert m3.dual_lambda(cfg, 0.05) == cfg.lam_max
    assert m3.dual_lambda(R2VPOConfig(lam_max=3.0), 0.2) == 3.0


def test_sweep_methods_cover_losses_times_regimes(tmp_path):
    methods = sweep.sweep_methods((1, 2), (1, 2))
    assert list(methods)[0] == sweep.BASELINE == "clipped_fresh"
    assert len(methods) == 3 * 4
    run = sweep.SWEEP_OVERRIDES
    assert methods["clipped_reuse2"] == ["algorithm.loss=clipped", "trainer.epochs_per_batch=2", *run]
    assert methods["r2vpo_lam0_replay_s2"] == [
        "algorithm.loss=r2vpo", "algorithm.r2vpo.eta_lam=0.0", "algorithm.r2vpo.lam_init=0.0",
        "algorithm.replay.ratio=1.0", "algorithm.replay.staleness=2", *run,
    ]
    assert "clipped_reuse1" not in methods  # reuse 1 is the fresh regime
    assert len(sweep.sweep_methods((1, 2, 4), (1, 2, 4))) == 3 * 6
    cfg = sweep.sweep_config(eff.load_config(eff.DEFAULT_CONFIG), methods)
    assert cfg.baseline == "clipped_fresh" and set(cfg.methods) == set(methods)
    assert "r2vpo_lam0_fresh" in cfg.panels["r2vpo_lam0"] and "r2vpo_lam0_fresh" not in cfg.panels["r2vpo"]
    # the run length is the methods', so the warm start is the efficacy benchmark's own (named by the testbed)
    sft_jobs, runs = eff.plan_jobs(cfg, ["clipped_fresh"], [0], "validation", tmp_path)
    efficacy_sft, _ = eff.plan_jobs(eff.load_config(eff.DEFAULT_CONFIG), ["grpo"], [0], "validation", tmp_path)
    assert list(sft_jobs) == list(efficacy_sft) and runs[0].max_steps == 40


@pytest.mark.slow
def test_sweep_configs_load_or_are_refused_with_the_key(tmp_path):
    base = eff.load_config(eff.DEFAULT_CONFIG)
    methods = sweep.sweep_methods()
    cfg = sweep.sweep_config(base, methods)
    extra = list(base.quick["overrides"])
    ok, refused = sweep.loadable(cfg, list(methods), tmp_path, extra, [])
    # every loss with fresh data, two passes, and replay at staleness 1 and 2
    assert ok == list(methods) and refused == {}
    bad = sweep.sweep_config(base, {**methods, "bogus": ["trainer.no_such_key=1"]})
    _, refused = sweep.loadable(bad, ["bogus"], tmp_path, extra, [])
    assert "no_such_key" in refused["bogus"]


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    return m3.prepare_quick_run(tmp_path_factory.mktemp("m3run"))


@pytest.mark.slow
def test_quick_m3_on_a_toy_run(toy_run, tmp_path):
    assert m3.checkpoint_steps(toy_run)[-3:] == [1, 2, 3]
    out = m3.run_m3(toy_run, tmp_path, quick=True, seed=0)
    assert set(out) == {"markdown", "json", "plots"}
    assert "## M3" in out["markdown"] and "paired differences" in out["markdown"]
    assert all(Path(p).is_file() for p in out["plots"]) and Path(out["plots"][0]).name == "mechanisms_m3.png"
    json.dumps(out["json"])  # JSON-ready
    records = out["json"]["records"]
    settings = m3.M3Settings.quick()
    assert {r["k"] for r in records} == set(settings.ks)
    assert {r["loss"] for r in records} == set(settings.loss_names())

    fresh = [r for r in records if r["k"] == 0]
    assert fresh and all(math.isfinite(r["norm"]) and r["norm"] > 0 for r in fresh), "the toy batch has no gradient"
    norms = [r["norm"] for r in fresh]
    for r in fresh:
        # On-policy data: V = 0, nothing clipped, R2VPO's dual stays at 0 ...
        assert r["stats"]["V"] < 1e-12 and r["stats"]["clip_frac"] == 0.0
        if r["loss"] in m3.LOSSES_MAIN:
            assert r["lam"] == 0.0
        # ... and every loss gives the same gradient: the batch's own on-policy gradient (ratio 1).
        assert r["cos_same_batch_on_policy"] == pytest.approx(1.0, abs=1e-6)
        assert r["norm"] == pytest.approx(norms[0], rel=1e-5)
        assert r["cos"] == pytest.approx(fresh[0]["cos"], abs=1e-6)
    summary = out["json"]["summary"]
    (t,) = summary
    # Stale data: the generating policy differs from the current one, so the ratios spread.
    assert summary[t]["1"]["stats"]["V"]["mean"] > 0 and summary[t]["2"]["stats"]["V"]["mean"] > 0
    stale_is = [r for r in records if r["k"] > 0 and r["loss"] == "is"]
    assert all(r["cos_same_batch_on_policy"] < 1 - 1e-6 for r in stale_is)
    # paired differences are against clipped, per loss
    assert set(summary[t]["1"]["losses"]["is"]["paired_minus_clipped"]) == {"cos", "rel_err"}

    # --report-only rebuilds the tables and the plot from the JSON alone
    from benchmarks.efficacy_report import write_json

    write_json(out["json"], tmp_path / "report" / "mechanisms_m3.json")
    assert m3.main(["--report-only", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "mechanisms_m3.md").read_text().strip() == out["markdown"].strip()
    assert (tmp_path / "report" / "mechanisms_m3.png").is_file()


@pytest.mark.slow
def test_a_checkpoint_written_before_key_changes_loads_with_todays_keys(toy_run, tmp_path):
    """A run written before algorithm.prompt_skip existed and with replay under algorithm.r2vpo (the subject run
    of the committed results) is read, as frozen_policies reads it, with the section's defaults and the moved
    keys' saved values."""
    import shutil

    from omegaconf import OmegaConf

    from nemo_gdro.trainer.checkpoint import CONFIG_NAME

    step = tmp_path / "step_00000003"
    shutil.copytree(toy_run / "checkpoints" / "step_00000003", step)
    tree = OmegaConf.load(step / CONFIG_NAME)
    OmegaConf.set_struct(tree, False)
    tree.algorithm.pop("prompt_skip")
    replay = tree.algorithm.pop("replay")
    tree.algorithm.r2vpo.replay_ratio = 0.5
    tree.algorithm.r2vpo.staleness = 3
    OmegaConf.save(tree, step / CONFIG_NAME)
    from nemo_gdro.trainer.eval_run import _config_for

    lines: list[str] = []
    cfg, _ = _config_for(step, [], "train", log=lines.append)
    assert len(lines) == 1 and "algorithm.r2vpo.replay_ratio -> algorithm.replay.ratio" in lines[0]
    assert cfg.algorithm.replay.ratio == 0.5 and cfg.algorithm.replay.staleness == 3
    assert set(replay) >= {"ratio", "staleness"}
    assert cfg.algorithm.prompt_skip is not None and cfg.algorithm.prompt_scheduler == tree.algorithm.prompt_scheduler
    for key in ("algorithm.prompt_skip", "algorithm.r2vpo.replay_ratio", "algorithm.replay.ratio"):
        assert key in cfg.run.allow_config_change
