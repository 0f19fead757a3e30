"""M1: rollout allocation at equal rollouts, at a frozen policy (issue 19, deliverable 4).

Every allocator splits the same budget ``P * n_bar`` rollouts per step. On each
replicate step (common random numbers, see :mod:`benchmarks.mech_common`) each
allocator picks ``n_i`` for the drawn prompts; prompt ``i``'s rollouts are the
first ``n_i`` of its shared permutation of the ``K`` cached ones; the gradient
estimate is formed as the trainer forms it and compared with two references:

- train: the gradient of the pool's mean expected reward from all ``K`` rollouts
  per prompt, with the leave-one-out baseline (in sketch space). Leave-one-out
  because it is an unbiased estimate of that gradient: GRPO's std normalisation
  changes the objective (it weights prompts by ``1 / std``) and the plain
  group-mean baseline shrinks it by ``(K - 1) / K``; with ``K = 64`` the two
  baselines differ by a scale only, so the references' directions agree;
- held-out: the same objective on the eval prompts (their own rollouts).

Allocators (all from the project's classes, fed with the checkpoint's pass-rate
store and the classifier's bins as ``stages/rollout.py`` feeds them):
uniform ``n_bar``; uniform splits with fewer prompts and more rollouts each at
the same total (``P n_bar / 16`` x 16, ``P n_bar / 64`` x 64); Rollout-GDRO
``sqrt`` and ``bandit`` (the bandit's arm scores from a few simulated steps on
the cache, or the checkpoint's own when the run had it); DynaMO at powers 0.5,
1, 2; an oracle Neyman allocation ``n_i ~ sqrt(sigma_i^2)``, ``sigma_i^2`` the
per-rollout variance of prompt ``i``'s mean-centred score term from all its
cached rollouts (within the Rollout-GDRO bounds; and "unbounded": nothing for a
prompt with ``sigma_i = 0``, between 2 and ``K`` for the others).

Two estimator forms: ``grpo`` (the trainer's: GRPO advantages, token-mean) and
``mean_centred`` (Dr.GRPO-style mean-centred rewards, per-prompt mean with
equal prompt weights: the form for which the square-root law is exactly the
variance-minimising allocation). Reported per allocator and form: mean cosine to
each reference, the signal-to-noise ratio ``||E g||^2 / E||g - E g||^2``
relative to uniform's, the share of rollouts in informative groups (non-zero
reward variance), and paired differences against uniform with 95% intervals
(normal over replicates; the SNR ratio by a block jackknife).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import mech_common as mc

FORMS = ("grpo", "mean_centred")
BANDIT_BURN_IN = 20
#: Replicates of the bandit burn-in come from their own stream.
_BURN_IN_OFFSET = 10_000_000


# ------------------------------------------------------------- allocators
Allocator = Callable[[mc.Replicate], tuple[np.ndarray, np.ndarray]]


def per_prompt_sigma2(pool: mc.Pool) -> torch.Tensor:
    """``sigma_i^2 [N]``: mean over prompt ``i``'s ``K`` rollouts of ``||x_ij - mean_j x_ij||^2``,
    ``x_ij = (r_ij - mean_i r) g_ij`` (sketch space): the per-rollout variance of the mean-centred term."""
    n, k = pool.num_prompts, pool.k
    out = torch.zeros(n, dtype=torch.float64)
    centred = pool.rewards - pool.rewards.mean(1, keepdim=True)
    for i in range(n):
        if not bool((centred[i] != 0).any()):
            continue
        x = centred[i].to(torch.float32)[:, None] * pool.sketch[i * k : (i + 1) * k]
        out[i] = float(((x - x.mean(0)) ** 2).sum(1).mean())
    return out


def _signal(kind: str, rewards: torch.Tensor, gi: torch.Tensor, groups: int, pool: mc.Pool) -> torch.Tensor:
    """The controllers' per-response signal at the frozen policy: the paper's surrogate is ``-A`` on-policy."""
    from nemo_gdro.stages.signal import controller_signal

    surrogate = -grpo_adv(pool, rewards, gi, groups)
    correct = (rewards > 0.5 * sum(pool.cache["reward_range"])).to(torch.float64)
    return controller_signal(kind, surrogate, correct, gi, groups,
                             reward_range=(0.0, 1.0), correct_threshold=0.5)


def grpo_adv(pool: mc.Pool, rewards: torch.Tensor, gi: torch.Tensor, groups: int) -> torch.Tensor:
    from nemo_gdro.algorithms.advantages import grpo_advantages

    return grpo_advantages(rewards.to(torch.float32), gi, groups, pool.setup.advantage).to(torch.float64)


def bandit(pool: mc.Pool, signal: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """Rollout-GDRO's bandit with its arm scores: the checkpoint's (a run that had it) or after
    ``BANDIT_BURN_IN`` simulated uniform steps on the cache observing ``signal``."""
    from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO

    cfg = mc.replace_config(pool.setup_with(rollout_scheduler="rollout_gdro").rollout_gdro, mode="bandit")
    ctl = RolloutGDRO(cfg, pool.setup.difficulty.num_bins, pool.store())
    own = pool.cache.get("controllers", {}).get("rollout_gdro")
    if own is not None and pool.setup.rollout_gdro is not None and pool.setup.rollout_gdro.mode == "bandit":
        ctl.load_state_dict(own)
        return ctl, {"scores_from": "checkpoint"}
    P = pool.prompts_per_step
    for t in range(BANDIT_BURN_IN):
        rep = mc.replicate(pool, seed, _BURN_IN_OFFSET + t)
        ids = rep.batch(P)
        bins = pool.bins[torch.from_numpy(ids)]
        plan = ctl.allocate(torch.from_numpy(ids), bins)
        sel = mc.select(pool, rep, ids, plan.counts.numpy())
        r, gi, _ = mc.flat(pool, sel)
        sig = _signal(signal, r, gi, sel.num_groups, pool)
        ctl.observe(bins[gi], sig, plan, bins, group_index=gi)
    return ctl, {"scores_from": f"{BANDIT_BURN_IN} simulated steps ({signal} signal)", "mu": ctl.mu,
                 "max_abs_score": float(ctl.scores.abs().max())}


def neyman_objective(sigma2: torch.Tensor, prompts: np.ndarray, counts: np.ndarray, batch: np.ndarray) -> float:
    """``sum_i sigma_i^2 / n_i`` over the step's ``batch`` prompts (the mean-centred estimator's variance, up to
    ``1/P^2``); NaN when a prompt with ``sigma_i > 0`` gets fewer than 2 rollouts (no estimate of its gradient:
    an allocator over other prompts)."""
    n = dict(zip(prompts.tolist(), counts.tolist()))
    total = 0.0
    for i in batch.tolist():
        s2 = float(sigma2[i])
        if s2 == 0:
            continue
        if n.get(i, 0) < 2:
            return math.nan
        total += s2 / n[i]
    return total


def allocators(pool: mc.Pool, seed: int) -> tuple[dict[str, Allocator], dict[str, Any]]:
    """Name -> allocator (replicate -> prompts, counts), all at ``P * n_bar`` rollouts."""
    from nemo_gdro.algorithms.allocate import allocate_budget
    from nemo_gdro.algorithms.dynamo_allocation import DynamoAllocator
    from nemo_gdro.algorithms.rollout_gdro import RolloutGDRO

    P, n_bar, k = pool.prompts_per_step, pool.n_bar, pool.k
    total = P * n_bar
    info: dict[str, Any] = {}
    out: dict[str, Allocator] = {"uniform": lambda rep: (rep.batch(P), np.full(P, n_bar))}
    for n in (16, 64):
        if n > n_bar and n <= k and total % n == 0:
            out[f"uniform_{total // n}x{n}"] = (lambda m, q: lambda rep: (rep.batch(m), np.full(m, q)))(total // n, n)
        else:
            info[f"uniform_x{n}"] = f"skipped: needs {n} <= K={k} cached rollouts and {n} dividing {total}"

    gdro_cfg = pool.setup_with(rollout_scheduler="rollout_gdro").rollout_gdro
    store = pool.store()

    def from_controller(allocate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Allocator:
        def run(rep: mc.Replicate) -> tuple[np.ndarray, np.ndarray]:
            ids = rep.batch(P)
            t = torch.from_numpy(ids)
            return ids, allocate(t, pool.bins[t]).numpy()
        return run

    sqrt_ctl = RolloutGDRO(mc.replace_config(gdro_cfg, mode="sqrt"), pool.setup.difficulty.num_bins, store)
    out["rollout_gdro_sqrt"] = from_controller(lambda ids, bins: sqrt_ctl.allocate(ids, bins).counts)
    for name, signal in (("rollout_gdro_bandit", pool.setup.prompt_gdro.signal),
                         ("rollout_gdro_bandit_learnability", "learnability")):
        ctl, meta = bandit(pool, signal, seed)
        info[name] = meta
        out[name] = from_controller(lambda ids, bins, ctl=ctl: ctl.allocate(ids, bins).counts)
    dyn_cfg = pool.setup_with(rollout_scheduler="dynamo").dynamo_allocation
    for power in (0.5, 1.0, 2.0):
        alloc = DynamoAllocator(mc.replace_config(dyn_cfg, power=power), store)
        out[f"dynamo_p{power:g}"] = from_controller(lambda ids, bins, a=alloc: a.allocate(ids).counts)
    sigma = per_prompt_sigma2(pool).sqrt()
    info["oracle_sigma_zero_share"] = float((sigma == 0).double().mean())
    info["sigma2"] = sigma.pow(2)

    def oracle(lo: int, hi: int, skip_zero: bool) -> Allocator:
        def run(rep: mc.Replicate) -> tuple[np.ndarray, np.ndarray]:
            ids = rep.batch(P)
            s = sigma[torch.from_numpy(ids)]
            low = torch.where(s > 0, torch.full_like(s, lo), torch.zeros_like(s)) if skip_zero else lo
            return ids, allocate_budget(s, total, low, hi, rule="scaled").counts.numpy()
        return run

    out["oracle_neyman"] = oracle(gdro_cfg.n_min, gdro_cfg.n_max, False)
    # No rollout for a prompt without signal; at least 2 (a group of one has no baseline) and at most K otherwise.
    out["oracle_neyman_unbounded"] = oracle(2, min(k, total), True)
    info["bounds"] = {"rollout_gdro": [gdro_cfg.n_min, gdro_cfg.n_max], "dynamo": [dyn_cfg.n_min, dyn_cfg.n_max]}
    return out, info


# ------------------------------------------------------------------- run
def run(pool: mc.Pool, replicates: int, seed: int, blocks: int = 20, log=print) -> dict[str, Any]:
    """The replicate loop; returns the JSON-able result."""
    t0 = time.perf_counter()
    ref_train = mc.reference(pool)
    ref_held = pool.cache["heldout_sketch"][-1]
    allocs, info = allocators(pool, seed)
    sigma2 = info.pop("sigma2")
    names = list(allocs)
    A, F = len(names), len(FORMS)
    cos_t = np.full((replicates, A, F), np.nan)
    cos_h = np.full((replicates, A, F), np.nan)
    inform = np.full((replicates, A), np.nan)
    objective = np.full((replicates, A), np.nan)  # sum_i sigma_i^2 / n_i, over uniform's
    wasted = np.full((replicates, A), np.nan)  # share of the rollouts on prompts with sigma_i = 0
    n_stats = {name: {"n_std": [], "n_max": [], "prompts": []} for name in names}
    snr = mc.SnrAccumulator(A * F, pool.sketch.shape[1], min(blocks, replicates))
    for r in range(replicates):
        rep = mc.replicate(pool, seed, r)
        parts = []
        for a, name in enumerate(names):
            prompts, counts = allocs[name](rep)
            sel = mc.select(pool, rep, prompts, counts)
            rew, gi, _ = mc.flat(pool, sel)
            mask = mc.informative_groups(rew, gi, sel.num_groups)[gi]
            inform[r, a] = float(mask.double().mean()) if mask.numel() else math.nan
            parts.append((sel.rows, mc.grpo_weights(pool, sel)))
            parts.append((sel.rows, mc.mean_centred_weights(pool, sel, num_prompts=len(prompts))))
            objective[r, a] = neyman_objective(sigma2, np.asarray(prompts), np.asarray(counts),
                                               rep.batch(pool.prompts_per_step))
            zero = (sigma2[torch.from_numpy(np.asarray(prompts, dtype=np.int64))] == 0).numpy()
            wasted[r, a] = float(np.asarray(counts)[zero].sum() / max(np.asarray(counts).sum(), 1))
            n_stats[name]["prompts"].append(int((counts > 0).sum()))
            n_stats[name]["n_std"].append(float(np.std(counts)))
            n_stats[name]["n_max"].append(int(counts.max()))
        est = mc.combine(pool, parts)
        cos_t[r] = mc.cosine(est, ref_train).reshape(A, F).numpy()
        cos_h[r] = mc.cosine(est, ref_held).reshape(A, F).numpy()
        snr.add(r, est)
        if r and r % 200 == 0:
            log(f"[m1]   {r}/{replicates} replicates ({time.perf_counter() - t0:.0f} s)")
    # Estimates are (allocator, form) row-major; uniform is allocator 0, so form f's baseline is estimate f.
    ratios = [snr.ratio_ci(base=f) for f in range(F)]
    snr_full = snr.snr().numpy()
    mean_dir = snr.mean_direction()
    result: dict[str, Any] = {"allocators": {}, "info": info, "replicates": replicates, "forms": list(FORMS)}
    for a, name in enumerate(names):
        entry: dict[str, Any] = {
            "informative_rollout_share": mc.mean_ci(inform[:, a]),
            "informative_rollout_share_vs_uniform": mc.paired(inform[:, a], inform[:, 0]),
            "neyman_objective_vs_uniform": mc.mean_ci(objective[:, a] / objective[:, 0]),
            "rollouts_on_zero_sigma_prompts": mc.mean_ci(wasted[:, a]),
            "prompts_per_step": float(np.mean(n_stats[name]["prompts"])),
            "n_std_mean": float(np.mean(n_stats[name]["n_std"])),
            "n_max_mean": float(np.mean(n_stats[name]["n_max"])),
        }
        for f, form in enumerate(FORMS):
            i = a * F + f
            entry[form] = {
                "cos_train": mc.mean_ci(cos_t[:, a, f]),
                "cos_train_vs_uniform": mc.paired(cos_t[:, a, f], cos_t[:, 0, f]),
                "cos_heldout": mc.mean_ci(cos_h[:, a, f]),
                "cos_heldout_vs_uniform": mc.paired(cos_h[:, a, f], cos_h[:, 0, f]),
                "snr": float(snr_full[i]),
                "snr_vs_uniform": ratios[f][i],
                "cos_mean_direction_train": float(mc.cosine(mean_dir[i : i + 1].float(), ref_train)[0]),
            }
        result["allocators"][name] = entry
    # The all-rollouts estimate of the mean-centred form is the train reference itself (a check of the pipeline).
    all_rows = np.arange(pool.num_prompts * pool.k)
    everything = mc.Selection(all_rows, np.repeat(np.arange(pool.num_prompts), pool.k),
                              np.arange(pool.num_prompts), np.ones(pool.num_prompts), all_rows.size)
    est_all = mc.combine(pool, [(all_rows, mc.mean_centred_weights(pool, everything))])
    result["check_all_rollouts_cos_train"] = float(mc.cosine(est_all, ref_train)[0])
    result["heldout_vs_train_reference_cos"] = float(mc.cosine(ref_held[None], ref_train)[0])
    result["wall_s"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------ report
def markdown(res: dict[str, Any], title: str) -> str:
    lines = [f"### {title}", ""]
    lines.append(
        f"{res['replicates']} replicate steps; cosine of the held-out to the train reference: "
        f"{mc.fmt(res['heldout_vs_train_reference_cos'])}; check: the all-rollouts mean-centred estimate has cosine "
        f"{mc.fmt(res['check_all_rollouts_cos_train'], 4)} to the train reference."
    )
    for form in res["forms"]:
        label = "GRPO advantages, token-mean (the trainer's)" if form == "grpo" else \
            "mean-centred, per-prompt mean (Dr.GRPO-style; the square-root law's estimator)"
        lines += ["", f"Estimator: {label}. Differences vs uniform on the same replicates, 95% intervals.", ""]
        lines.append("| allocator | prompts | rollouts on zero-signal prompts | informative rollouts | vs uniform | "
                     "sum sigma^2/n / uniform | cos train | vs uniform | cos held-out | vs uniform | SNR / uniform | "
                     "cos(E g, train) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, e in res["allocators"].items():
            f = e[form]
            s = f["snr_vs_uniform"]
            lines.append(
                f"| {name} | {e['prompts_per_step']:.1f} | {mc.fmt(e['rollouts_on_zero_sigma_prompts']['mean'])} | "
                f"{mc.fmt(e['informative_rollout_share']['mean'])} | "
                f"{mc.fmt_ci(e['informative_rollout_share_vs_uniform'])} | "
                f"{mc.fmt(e['neyman_objective_vs_uniform']['mean'])} | {mc.fmt(f['cos_train']['mean'])} | "
                f"{mc.fmt_ci(f['cos_train_vs_uniform'])} | {mc.fmt(f['cos_heldout']['mean'])} | "
                f"{mc.fmt_ci(f['cos_heldout_vs_uniform'])} | "
                f"{mc.fmt(s['mean'], 2)} [{mc.fmt(s['lo'], 2)}, {mc.fmt(s['hi'], 2)}] | "
                f"{mc.fmt(f['cos_mean_direction_train'])} |"
            )
    lines += ["", "Columns: zero-signal prompts are those whose cached rollouts all agree (sigma_i = 0); informative "
              "rollouts: share in groups with non-zero reward variance; sum sigma^2/n: the mean-centred estimator's "
              "variance sum_i sigma_i^2 / n_i (sigma from all cached rollouts) over uniform's, on the same prompts "
              "('-' for allocators over other prompts); SNR = ||E g||^2 / E||g - E g||^2 over uniform's (block "
              "jackknife interval); cos(E g, train): the direction of the estimator's mean (its bias) to the train "
              "reference."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Paired differences vs uniform: cosine to the train reference and SNR ratio, per form, per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(results)
    fig, axes = plt.subplots(len(steps), 2, figsize=(12, 0.5 + 3.6 * len(steps)), squeeze=False)
    for row, step in enumerate(steps):
        res = results[step]
        names = [n for n in res["allocators"] if n != "uniform"]
        y = np.arange(len(names))
        for col, (key, label) in enumerate((("cos_train_vs_uniform", "cosine to train reference - uniform's"),
                                            ("snr_vs_uniform", "SNR / uniform's"))):
            ax = axes[row][col]
            for f, form in enumerate(res["forms"]):
                vals = [res["allocators"][n][form][key] for n in names]
                mean = np.array([v["mean"] for v in vals])
                err = np.array([[v["mean"] - v["lo"], v["hi"] - v["mean"]] for v in vals]).T
                ax.errorbar(mean, y + (f - 0.5) * 0.3, xerr=err, fmt="o", capsize=3, label=form)
            ax.axvline(1.0 if key == "snr_vs_uniform" else 0.0, color="k", lw=0.8)
            if key == "snr_vs_uniform":
                from matplotlib.ticker import NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks(y)
            ax.set_yticklabels(names if col == 0 else [])
            ax.set_title(f"{step}: {label}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
