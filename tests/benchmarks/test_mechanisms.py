"""The mechanism benchmark: its sketch, objectives and estimators on small inputs, and ``--quick`` end to end (real run)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import mech_common as mc
from benchmarks.mech_policy import CountSketch, loo_weights

ROOT = Path(__file__).resolve().parents[2]


def test_count_sketch_is_linear_and_preserves_inner_products_in_expectation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    y = 0.6 * x + 0.8 * y  # correlated: <x, y> clearly non-zero
    s = CountSketch(3000, 256, seed=1)
    assert torch.allclose(s(x + 2 * y), s(x) + 2 * s(y), atol=1e-4)
    # Over independent hashes the sketched inner product averages to the true one.
    dots = [float(CountSketch(3000, 256, seed=k)(x) @ CountSketch(3000, 256, seed=k)(y)) for k in range(200)]
    true = float(x @ y)
    assert abs(np.mean(dots) - true) < 4 * np.std(dots) / math.sqrt(len(dots))
    # One hash of d buckets: relative error of order sqrt(2 / d) of |x| |y|.
    assert abs(dots[0] - true) < 5 * math.sqrt(2 / 256) * float(x.norm() * y.norm())
    with pytest.raises(ValueError, match="expected a \\[3000\\] vector"):
        s(torch.zeros(5))


def test_leave_one_out_weights_sum_to_zero_per_prompt_and_vanish_for_flat_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    w = loo_weights(r)
    assert torch.allclose(w.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-15)
    assert torch.equal(w[1], torch.zeros(4, dtype=torch.float64))
    # K / (K - 1) times the mean-centred weight, over K N.
    centred = (r - r.mean(1, keepdim=True)).double()
    assert torch.allclose(w, centred * (4 / 3) / (4 * 3))
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        loo_weights(torch.ones(3, 1))


def _pool(rewards: torch.Tensor, tokens: torch.Tensor, dim: int = 64) -> mc.Pool:
    """A synthetic pool with the default config's algorithm section (no model: sketches are random)."""
    from omegaconf import OmegaConf

    from nemo_gdro.trainer.config import compose

    n, k = rewards.shape
    algorithm = OmegaConf.to_container(compose("train", []).algorithm, resolve=True)
    cache = {
        "train_rewards": rewards, "train_correct": rewards > 0.5, "train_tokens": tokens,
        "train_truncated": torch.zeros(rewards.shape, dtype=torch.bool),
        "train_sketch": torch.randn(n * k, dim, generator=torch.Generator().manual_seed(3)),
        "algorithm": algorithm, "n_bar": 4, "prompts_per_step": 2, "pool_bins": torch.zeros(n, dtype=torch.int64),
        "pool_size": n, "seed": 0, "reward_range": [0.0, 1.0],
    }
    return mc.load_pool(cache)


def test_selection_takes_the_shared_permutation_and_the_estimators_weight_as_the_trainer():
    rewards = torch.tensor([[1.0, 0, 1, 0, 1, 1, 0, 0], [1.0] * 8, [0.0, 0, 0, 1, 0, 0, 0, 1]])
    tokens = torch.arange(1, 25, dtype=torch.float64).reshape(3, 8)
    pool = _pool(rewards, tokens)
    rep = mc.replicate(pool, seed=0, index=5)
    sel = mc.select(pool, rep, [0, 1, 0], [2, 3, 4])
    # Prompt 0 twice: its first two rollouts of the permutation, then the next four.
    assert sel.rows.tolist()[:2] == (0 * 8 + rep.perm[0, :2]).tolist()
    assert sel.rows.tolist()[5:] == (0 * 8 + rep.perm[0, 2:6]).tolist()
    assert sel.group.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2] and sel.generated == 9
    # GRPO token-mean: the flat group (prompt 1) has zero weight but its tokens count; filtering drops them.
    r, gi, tok = mc.flat(pool, sel)
    w = mc.grpo_weights(pool, sel)
    assert torch.equal(w[2:5], torch.zeros(3, dtype=torch.float64))
    w_drop = mc.grpo_weights(pool, sel, drop_zero_variance=True)
    assert torch.allclose(w_drop * (tok.sum() - tok[2:5].sum()), w * tok.sum())
    # Mean-centred, all rollouts: proportional to the leave-one-out reference weights (cosine 1).
    everything = mc.Selection(np.arange(24), np.repeat(np.arange(3), 8), np.arange(3), np.ones(3), 24)
    mcw = mc.mean_centred_weights(pool, everything)
    ref = loo_weights(rewards).reshape(-1)
    assert torch.allclose(mcw / mcw.norm(), ref / ref.norm())
    est = mc.combine(pool, [(everything.rows, mcw)])
    assert float(mc.cosine(est, mc.reference(pool))[0]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="the cache holds 8"):
        mc.select(pool, rep, [0], [9])
    # Occurrences past the K cached rollouts wrap around and are counted as reused.
    again = mc.select(pool, rep, [2, 2, 2], [3, 3, 3])
    assert again.reused == 1 and again.rows[-1] == 2 * 8 + rep.perm[2, 0]


def test_snr_ratio_sees_twice_the_noise_as_a_quarter_of_the_snr():
    g = torch.Generator().manual_seed(0)
    mu = torch.zeros(200)
    mu[0] = 1.0
    acc = mc.SnrAccumulator(2, 200, blocks=20)
    for r in range(2000):
        noise = torch.randn(200, generator=g) * 0.05
        acc.add(r, torch.stack([mu + noise, mu + 2 * noise]))
    ratio = acc.ratio_ci(base=0)
    assert ratio[0]["mean"] == pytest.approx(1.0)
    assert ratio[1]["lo"] < 0.25 < ratio[1]["hi"] and ratio[1]["hi"] < 0.35


@pytest.mark.slow
def test_quick_runs_m1_and_m2_end_to_end(tmp_path):
    """``--quick``: a toy GRPO run with a checkpoint per step, the cache, M1 and M2, the report and plots."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mechanisms.py"), "--quick", "--parts", "m1,m2",
         "--work-dir", str(tmp_path / "work"), "--results", str(results), "--replicates", "60"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((results / "mechanisms.json").read_text())
    assert set(rep["parts"]) == {"m1", "m2"}
    for name in ("mechanisms.md", "mechanisms_m1.png", "mechanisms_m2.png"):
        assert (results / name).stat().st_size > 0
    (m1,) = rep["parts"]["m1"]["json"]["steps"].values()
    (m2,) = rep["parts"]["m2"]["json"]["steps"].values()
    assert m1["replicates"] == 60 and m1["cache"]["logp_check"] < 1e-4
    # The all-rollouts mean-centred estimate IS the train reference (the pipeline's own check).
    assert m1["check_all_rollouts_cos_train"] > 0.9999
    allocs = m1["allocators"]
    for name in ("uniform", "rollout_gdro_sqrt", "rollout_gdro_bandit", "dynamo_p0.5", "dynamo_p1", "dynamo_p2",
                 "oracle_neyman", "oracle_neyman_unbounded"):
        assert {"cos_train", "cos_heldout", "snr_vs_uniform"} <= set(allocs[name]["grpo"]), name
        assert -1.0 <= allocs[name]["mean_centred"]["cos_train"]["mean"] <= 1.0
    # The Neyman allocation minimises sum_i sigma_i^2 / n_i over the same prompts at the same budget.
    assert allocs["oracle_neyman_unbounded"]["neyman_objective_vs_uniform"]["mean"] <= 1.0 + 1e-9
    assert allocs["uniform"]["neyman_objective_vs_uniform"]["mean"] == pytest.approx(1.0)
    methods = m2["methods"]
    # The paper's surrogate signal is -A on-policy: its bin means vanish, the weights are flat, the update is GRPO's.
    same = methods["pgdro_adv_surrogate_all"]["dJ_all_vs_grpo"]["mean"]
    assert abs(same) <= 1e-9 * abs(methods["grpo"]["dJ_all"]["mean"])
    # Dynamic sampling trains informative groups only and pays for them in generated rollouts.
    assert methods["dapo"]["informative_rollout_share_of_trained"] == 1.0
    assert methods["dapo"]["generated_rollouts"] >= methods["dapo"]["trained_rollouts"]
    assert methods["filter"]["trained_rollouts"] == methods["grpo"]["trained_rollouts"]
    assert methods["resample_bins_surrogate"]["distinct_prompts"] <= methods["resample_data_surrogate"]["distinct_prompts"]
    # A second invocation reuses the run and the cache: nothing is trained or recomputed.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mechanisms.py"), "--quick", "--parts", "m2",
         "--work-dir", str(tmp_path / "work"), "--results", str(results), "--replicates", "20"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 runs to do" in again.stdout and "reused" in again.stdout
    merged = json.loads((results / "mechanisms.json").read_text())
    assert set(merged["parts"]) == {"m1", "m2"}  # M1's results are kept when only M2 runs again
