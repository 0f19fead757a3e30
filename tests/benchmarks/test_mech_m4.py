"""M4 of the mechanism benchmark (DynaMO's token modulation at a frozen policy).

The end-to-end test trains a real toy GRPO run (M3's: warm start + 3 steps, a
checkpoint after each) and runs ``run_m4(quick=True)`` on it: real model,
engine, verifier, the real modulation stage and the actor's own gradients.
"""

import json
import math
from pathlib import Path

import pytest

from benchmarks import mech_m3 as m3
from benchmarks import mech_m4 as m4
from benchmarks import mechanisms


def test_m4_is_a_part_of_the_cli():
    assert "m4" in mechanisms.PARTS
    assert mechanisms._parse(["--parts", "m4"]).parts == "m4"


def test_quick_settings_override_only_what_is_given():
    s = m4.M4Settings.quick(alpha=0.0, lam_min=1.0)
    assert (s.alpha, s.lam_min, s.replicates, s.current_steps) == (0.0, 1.0, 2, ())
    assert m4.M4Settings().alpha is None and m4.M4Settings().current_steps == (40, 20)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    return m3.prepare_quick_run(tmp_path_factory.mktemp("m4run"))


def _values(out):
    (record,) = [r for r in out["json"]["records"] if r["replicate"] == 0]
    return record


@pytest.mark.slow
def test_quick_m4_on_a_toy_run(toy_run, tmp_path):
    out = m4.run_m4(toy_run, tmp_path, quick=True, seed=0)
    assert set(out) == {"markdown", "json", "plots"}
    assert "## M4" in out["markdown"] and "dynamo - none" in out["markdown"]
    assert Path(out["plots"][0]).name == "mechanisms_m4.png" and Path(out["plots"][0]).is_file()
    json.dumps(out["json"])
    records = out["json"]["records"]
    assert len(records) == m4.M4Settings.quick().replicates
    for r in records:
        v, mod = r["values"], r["modulation"]
        assert v["norm_none"] > 0, "the toy batch has no gradient"
        assert all(math.isfinite(v[f"{m}_{name}"]) for m in ("cos", "norm", "dH_pred", "dH_heldout")
                   for name in m4.METHODS)
        # The real modulation acted: the token with the largest |dH| sits at x = 1, so beta_stab there is
        # lam_min + (1 - lam_min) sigmoid(-gamma (1 - tau)) < 0.95 with the defaults; A~ != A.
        assert mod["frac_beta_stab_below_0.95"] > 0 and mod["adv_ratio_mean"] != 1.0
        assert v["cos_none_dynamo"] < 1 - 1e-9
        assert v["dH_pred_dynamo"] != v["dH_pred_none"]
        # Weights are restored after each step: both steps start from the same held-out entropy.
        assert v["dH_heldout_none"] != v["dH_heldout_dynamo"]
    summary = out["json"]["summary"]
    (t,) = summary
    assert set(summary[t]["metrics"]["cos"]) == {"none", "dynamo", "dynamo_minus_none"}

    # alpha = 0 and lam_min = 1 make both factors exactly 1: dynamo's gradient, predicted and actual entropy
    # changes are none's exactly (same batch, same weights, restored between the steps).
    ident = m4.run_m4(toy_run, tmp_path / "identity", quick=True, seed=0,
                      settings=m4.M4Settings.quick(alpha=0.0, lam_min=1.0))
    for r in ident["json"]["records"]:
        v, mod = r["values"], r["modulation"]
        assert mod["adv_ratio_mean"] == 1.0 and mod["frac_beta_stab_below_0.95"] == 0.0
        for m in ("cos", "norm", "dH_pred", "sum_abs_dH", "dH_heldout"):
            assert v[f"{m}_dynamo"] == v[f"{m}_none"], m
    # common random numbers: the same replicate batches and reference in both runs
    assert [r["values"]["cos_none"] for r in ident["json"]["records"]] == [r["values"]["cos_none"] for r in records]

    # --report-only rebuilds the tables and the plot from the JSON alone
    from benchmarks.efficacy_report import write_json

    write_json(out["json"], tmp_path / "report" / "mechanisms_m4.json")
    assert m4.main(["--report-only", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "mechanisms_m4.md").read_text().strip() == out["markdown"].strip()
    assert (tmp_path / "report" / "mechanisms_m4.png").is_file()
