"""M2: data weighting and selection, at a frozen policy (issue 19, deliverable 4).

Every method's update on a replicate step, and its linearised effect on the
held-out objective of each difficulty band::

    delta J_b = lr * c * <D g_method, grad J_b>,   c = min(1, grad_clip / ||g_method||)

``g_method`` is the method's gradient estimate as the trainer forms it (GRPO
advantages times the method's weights, token-mean over the trained rows, one
optimizer step on the whole batch), ``D = 1 / (sqrt(v_hat) + eps)`` Adam's
preconditioner from the checkpoint's optimizer state, ``grad J_b`` the gradient
of band ``b``'s mean expected reward on the eval prompts (leave-one-out, from
their own rollouts). ``<D g, grad J_b>`` is exact (each cached rollout carries
its inner products with ``D grad J_b``); ``||g||`` for the clip factor comes
from the sketch. Adam's first-moment factor ``(1 - beta1)`` is left out: summed
over the momentum's lifetime a gradient moves the weights by ``lr D g``, so
``delta J`` is the whole effect of one step's gradient (the momentum carried
from earlier steps is the same for every method and cancels in the
differences). Bands: the task's difficulty levels (arithmetic: digits) of the
eval prompts; ``worst`` is the smallest band effect of the replicate.

Methods (``P`` prompts x ``n_bar`` rollouts per step unless said):

- ``grpo``: uniform prompts, the run's own estimator.
- ``pgdro_adv_<signal>_<all|informative>``: Prompt-GDRO's advantage weights with
  the signal surrogate / failure / learnability and the normalisation over all
  responses or the informative ones (gdro.md §2). The bin scores come from
  ``PGDRO_BURN_IN`` simulated steps on the cache starting from zero (from the
  checkpoint's own scores when the run had Prompt-GDRO with that signal), then
  stay fixed.
- ``resample_<bins|data>_<signal>``: Prompt-GDRO's sampler, the old rule (a bin
  from ``q``, with replacement) and the revised one (``resample_base: data``:
  the data distribution tilted by ``omega``, no replacement within a step).
- ``filter``: drop zero-variance groups from training (no refill): the
  token-mean no longer counts their tokens.
- ``skip_pe<p>``: GRESO-style: walk the uniform order and skip a prompt whose
  previous visit gave a zero-variance group, unless a uniform draw falls below
  the exploration probability ``p``; the previous visit is simulated by 4
  other cached rollouts of the prompt at this policy (the frozen policy's
  analogue of its last epoch).
- ``dapo``: dynamic sampling: generate ``P`` prompts at a time along the uniform
  order, keep the informative groups, until ``P`` are kept or
  ``MAX_GENERATION_BATCHES`` rounds; reported per step and per generated rollout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import mech_common as mc

SIGNALS = ("surrogate", "failure", "learnability")
PGDRO_BURN_IN = 20
MAX_GENERATION_BATCHES = 4
SKIP_EXPLORE = (0.5, 0.1)
_BURN_IN_OFFSET = 20_000_000

Method = Callable[[mc.Replicate], tuple[mc.Selection, bool]]  # -> selection, drop zero-variance groups


# ------------------------------------------------------------ Prompt-GDRO
def prompt_gdro(pool: mc.Pool, signal: str, seed: int) -> tuple[Any, str]:
    """A Prompt-GDRO controller with ``signal``: the checkpoint's scores (a run that had it, same signal),
    else ``PGDRO_BURN_IN`` simulated uniform steps on the cache observing that signal."""
    from nemo_gdro.algorithms.prompt_gdro import PromptGDRO
    from nemo_gdro.stages.signal import controller_signal

    cfg = mc.replace_config(pool.setup.prompt_gdro, signal=signal)
    nb = pool.setup.difficulty.num_bins
    pg = PromptGDRO(cfg, nb, seed=seed)
    own = pool.cache.get("controllers", {}).get("prompt_gdro")
    if own is not None and pool.setup.prompt_gdro.signal == signal:
        pg.load_state_dict(own)
        return pg, "checkpoint"
    P, n = pool.prompts_per_step, pool.n_bar
    for t in range(PGDRO_BURN_IN):
        rep = mc.replicate(pool, seed, _BURN_IN_OFFSET + t)
        ids = rep.batch(P)
        sel = mc.select(pool, rep, ids, np.full(P, n))
        r, gi, _ = mc.flat(pool, sel)
        # On-policy the paper's surrogate is -A (ratio 1); correctness as 0/1 for the other two.
        surrogate = -_adv(pool, r, gi, sel.num_groups)
        correct = (r > 0.5 * sum(pool.cache["reward_range"])).to(torch.float64)
        sig = controller_signal(signal, surrogate, correct, gi, sel.num_groups, reward_range=(0.0, 1.0),
                                correct_threshold=0.5)
        pg.observe(pool.bins[torch.from_numpy(ids)][gi], sig)
    return pg, f"{PGDRO_BURN_IN} simulated steps"


def _adv(pool: mc.Pool, r: torch.Tensor, gi: torch.Tensor, groups: int) -> torch.Tensor:
    from nemo_gdro.algorithms.advantages import grpo_advantages

    return grpo_advantages(r.to(torch.float32), gi, groups, pool.setup.advantage).to(torch.float64)


def advantage_weights(pool: mc.Pool, pg: Any, sel: mc.Selection, normalize_over: str) -> np.ndarray:
    """Per-group advantage weight (gdro.md §2): ``PromptGDRO.response_weights`` with ``normalize_over``
    (``all``: mean 1 over the batch's responses; ``informative``: over those with a non-zero advantage)."""
    r, gi, _ = mc.flat(pool, sel)
    bins = pool.bins[torch.from_numpy(sel.prompt)][gi]
    informative = _adv(pool, r, gi, sel.num_groups) != 0
    cfg = pg.config
    pg.config = mc.replace_config(cfg, normalize_over=normalize_over)
    try:
        w, _ = pg.response_weights(bins, informative)
    finally:
        pg.config = cfg
    out = np.ones(sel.num_groups)
    out[gi.numpy()] = w.numpy()
    return out


def bin_index(pool: mc.Pool) -> Any:
    """The resampler's ``BinIndex`` holding the classifier's bins of the pool (drawing leaves it unchanged)."""
    from nemo_gdro.algorithms.bin_index import BinIndex

    index = BinIndex(pool.num_prompts, pool.setup.difficulty.num_bins, pool.setup.difficulty.unseen_bin_index)
    index.move(torch.arange(pool.num_prompts), pool.bins)
    return index


def resample_draw(pool: mc.Pool, pg: Any, index: Any, rep: mc.Replicate, base: str) -> np.ndarray:
    """``P`` prompt ids from ``PromptGDRO.sample_prompts`` with ``resample_base`` = ``bins`` (the first rule:
    a bin from ``q``, with replacement) or ``data`` (the revised one: the pool tilted by ``omega``, no
    replacement within a step)."""
    pg.rng = np.random.Generator(np.random.PCG64([int(rep.index), 31337]))  # common random numbers per replicate
    cfg = pg.config
    pg.config = mc.replace_config(cfg, resample_base=base)
    try:
        ids, _, _ = pg.sample_prompts(index, pool.prompts_per_step)
    finally:
        pg.config = cfg
    return ids.numpy()


# ------------------------------------------------------------------ methods
def methods(pool: mc.Pool, seed: int) -> tuple[dict[str, Method], dict[str, Any]]:
    P, n, k = pool.prompts_per_step, pool.n_bar, pool.k
    info: dict[str, Any] = {}
    uniform = lambda rep: mc.select(pool, rep, rep.batch(P), np.full(P, n))  # noqa: E731
    out: dict[str, Method] = {"grpo": lambda rep: (uniform(rep), False)}
    controllers = {}
    for signal in SIGNALS:
        pg, source = prompt_gdro(pool, signal, seed)
        controllers[signal] = pg
        info[f"prompt_gdro_{signal}"] = {"scores_from": source, "scores": pg.scores.tolist()}
        for norm in ("all", "informative"):
            def adv(rep: mc.Replicate, pg=pg, norm=norm) -> tuple[mc.Selection, bool]:
                sel = uniform(rep)
                sel.mult = advantage_weights(pool, pg, sel, norm)
                return sel, False
            out[f"pgdro_adv_{signal}_{norm}"] = adv
    if pool.setup.prompt_gdro.importance_correct:
        info["resample_note"] = "the run sets prompt_gdro.importance_correct; the resample methods here do not correct"
    index = bin_index(pool)
    for base in ("bins", "data"):
        for signal in SIGNALS:
            def res(rep: mc.Replicate, pg=controllers[signal], base=base) -> tuple[mc.Selection, bool]:
                ids = resample_draw(pool, pg, index, rep, base)
                return mc.select(pool, rep, ids, np.full(ids.size, n)), False
            out[f"resample_{base}_{signal}"] = res
    out["filter"] = lambda rep: (uniform(rep), True)
    if k < 2 * n:
        info["skip"] = f"skipped: needs 2 x n_bar = {2 * n} cached rollouts per prompt, the cache has {k}"
    else:
        def previous_zero(rep: mc.Replicate) -> np.ndarray:
            """bool [N]: the simulated previous visit (the permutation's last n_bar rollouts) was zero-variance."""
            rows = np.arange(pool.num_prompts)[:, None] * k + rep.perm[:, k - n :]
            r = pool.rewards.reshape(-1)[torch.from_numpy(rows)]
            return (r.max(1).values == r.min(1).values).numpy()

        for p_e in SKIP_EXPLORE:
            def skip(rep: mc.Replicate, p_e=p_e) -> tuple[mc.Selection, bool]:
                zero = previous_zero(rep)
                u = rep.rng.random(pool.num_prompts)
                keep = ~zero[rep.order] | (u < p_e)
                kept = rep.order[keep][:P]
                if kept.size < P:  # (nearly) the whole pool predicted zero-variance: fill without skipping
                    rest = [p for p in rep.order if p not in set(kept.tolist())]
                    kept = np.concatenate([kept, np.asarray(rest[: P - kept.size], dtype=np.int64)])
                return mc.select(pool, rep, kept, np.full(P, n)), False
            out[f"skip_pe{p_e:g}"] = skip

    def dapo(rep: mc.Replicate) -> tuple[mc.Selection, bool]:
        kept: list[int] = []
        rounds = 0
        while len(kept) < P and rounds < MAX_GENERATION_BATCHES and (rounds + 1) * P <= pool.num_prompts:
            ids = rep.order[rounds * P : (rounds + 1) * P]
            rounds += 1
            sel = mc.select(pool, rep, ids, np.full(P, n))
            r, gi, _ = mc.flat(pool, sel)
            informative = mc.informative_groups(r, gi, sel.num_groups).numpy()
            kept += ids[informative].tolist()
        kept = kept[:P]
        return mc.select(pool, rep, np.asarray(kept, dtype=np.int64), np.full(len(kept), n),
                         generated=rounds * P * n), True
    out["dapo"] = dapo
    info["dapo_max_generation_batches"] = MAX_GENERATION_BATCHES
    return out, info


# --------------------------------------------------------------------- run
def run(pool: mc.Pool, replicates: int, seed: int, log=print) -> dict[str, Any]:
    """The replicate loop; returns the JSON-able result."""
    if not pool.cache.get("has_adam"):
        raise RuntimeError("M2 needs Adam's state: this checkpoint has none (the first checkpoint of a run?)")
    t0 = time.perf_counter()
    meths, info = methods(pool, seed)
    names = list(meths)
    c = pool.cache
    dot_names = list(c["dot_names"])  # bands, then "all"
    nb = len(dot_names) - 1
    dots_adam = c["train_dots_adam"]
    dots_plain = c["train_dots"]
    lr, clip = float(c["lr"]), float(c["grad_clip"])
    M = len(names)
    dj = np.full((replicates, M, nb + 1), np.nan)  # Adam, clipped
    dj_sgd = np.full((replicates, M, nb + 1), np.nan)  # plain gradient step (no preconditioner), clipped
    gen = np.zeros((replicates, M))
    trained = np.zeros((replicates, M))
    distinct = np.zeros((replicates, M))
    inform = np.zeros((replicates, M))
    clipped = np.zeros((replicates, M))
    norm = np.zeros((replicates, M))
    reused = np.zeros((replicates, M))
    levels = c.get("train_level")
    level_values = sorted(set(levels.tolist())) if levels is not None else []
    level_rows = np.zeros((M, len(level_values)))  # trained rollouts per train-prompt difficulty level
    for r in range(replicates):
        rep = mc.replicate(pool, seed, r)
        parts, sels = [], []
        for name in names:
            sel, drop = meths[name](rep)
            w = mc.grpo_weights(pool, sel, drop_zero_variance=drop)
            parts.append((sel.rows, w))
            sels.append(sel)
        est = mc.combine(pool, parts)
        norms = est.double().norm(dim=1).numpy()
        for m, (sel, (rows, w)) in enumerate(zip(sels, parts)):
            cfac = min(1.0, clip / norms[m]) if clip > 0 and norms[m] > 0 else 1.0
            idx = torch.from_numpy(rows)
            dj[r, m] = lr * cfac * (w @ dots_adam[idx]).numpy()
            dj_sgd[r, m] = lr * cfac * (w @ dots_plain[idx]).numpy()
            rew, gi, _ = mc.flat(pool, sel)
            gen[r, m] = sel.generated
            trained[r, m] = rows.size
            distinct[r, m] = np.unique(sel.prompt).size
            inform[r, m] = float(mc.informative_groups(rew, gi, sel.num_groups)[gi].double().sum()) if rows.size else 0.0
            clipped[r, m] = float(cfac < 1.0)
            reused[r, m] = sel.reused
            if level_values:
                lv = levels[torch.from_numpy(sel.prompt)][gi].numpy()
                level_rows[m] += [(lv == v).sum() for v in level_values]
            norm[r, m] = norms[m]
        if r and r % 200 == 0:
            log(f"[m2]   {r}/{replicates} replicates ({time.perf_counter() - t0:.0f} s)")
    worst = dj[:, :, :nb].min(axis=2)
    per_rollout = dj[:, :, nb] / gen
    result: dict[str, Any] = {"methods": {}, "info": info, "replicates": replicates, "bands": dot_names[:nb],
                              "lr": lr, "grad_clip": clip}
    for m, name in enumerate(names):
        entry: dict[str, Any] = {
            "generated_rollouts": float(gen[:, m].mean()),
            "trained_rollouts": float(trained[:, m].mean()),
            "distinct_prompts": float(distinct[:, m].mean()),
            "informative_rollout_share_of_trained": float(inform[:, m].sum() / max(trained[:, m].sum(), 1)),
            "clipped_fraction": float(clipped[:, m].mean()),
            "grad_norm": float(norm[:, m].mean()),
            "reused_rollouts": float(reused[:, m].mean()),
            "trained_level_share": {f"level_{v}": float(level_rows[m, i] / max(level_rows[m].sum(), 1))
                                    for i, v in enumerate(level_values)},
            "dJ_all": mc.mean_ci(dj[:, m, nb]),
            "dJ_all_vs_grpo": mc.paired(dj[:, m, nb], dj[:, 0, nb]),
            "dJ_worst": mc.mean_ci(worst[:, m]),
            "dJ_worst_vs_grpo": mc.paired(worst[:, m], worst[:, 0]),
            "dJ_per_rollout": mc.mean_ci(per_rollout[:, m]),
            "dJ_per_rollout_vs_grpo": mc.paired(per_rollout[:, m], per_rollout[:, 0]),
            "dJ_sgd_all": mc.mean_ci(dj_sgd[:, m, nb]),
            "bands": {},
        }
        for b, band in enumerate(dot_names[:nb]):
            entry["bands"][band] = {"dJ": mc.mean_ci(dj[:, m, b]), "vs_grpo": mc.paired(dj[:, m, b], dj[:, 0, b])}
        result["methods"][name] = entry
    result["wall_s"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------ report
#: delta J is shown in units of 1e-3 (pass-rate points x 10).
SCALE = 1e3


def markdown(res: dict[str, Any], title: str) -> str:
    bands = res["bands"]
    lines = [f"### {title}", "",
             f"{res['replicates']} replicate steps; delta J = lr x <D g, grad J_band> in units of 1e-3 of the "
             f"band's mean expected reward (lr {res['lr']:g}, clip {res['grad_clip']:g}); differences vs GRPO on the "
             "same replicates, 95% intervals.", ""]
    head = "| method | generated | distinct prompts | informative share | dJ all | vs GRPO | worst band | vs GRPO | " \
           "per 1k generated rollouts vs GRPO | " + " | ".join(f"{b} vs GRPO" for b in bands) + " |"
    lines += [head, "|" + "---|" * (9 + len(bands))]
    for name, e in res["methods"].items():
        cells = [
            name, f"{e['generated_rollouts']:.0f}", f"{e['distinct_prompts']:.1f}",
            mc.fmt(e["informative_rollout_share_of_trained"]),
            mc.fmt(e["dJ_all"]["mean"] * SCALE, 3), mc.fmt_ci(e["dJ_all_vs_grpo"], 3, SCALE),
            mc.fmt(e["dJ_worst"]["mean"] * SCALE, 3), mc.fmt_ci(e["dJ_worst_vs_grpo"], 3, SCALE),
            mc.fmt_ci(e["dJ_per_rollout_vs_grpo"], 3, SCALE * 1e3),
            *[mc.fmt_ci(e["bands"][b]["vs_grpo"], 3, SCALE) for b in bands],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    grpo = res["methods"]["grpo"]
    lines += ["", "Columns: generated = rollouts generated per step (dynamic sampling: all its rounds); distinct prompts "
              "per step; informative share = trained rollouts in groups with non-zero reward variance; dJ all = the "
              "linearised change of the held-out mean expected reward; worst band = the smallest band change of the "
              "replicate; per 1k generated rollouts = dJ all per generated rollout x 1000. GRPO's own band changes: "
              + ", ".join(f"{b} {mc.fmt(grpo['bands'][b]['dJ']['mean'] * SCALE)}" for b in bands)
              + f"; its gradient norm {mc.fmt(grpo['grad_norm'])} (clipped in {grpo['clipped_fraction']:.0%} of the "
              "replicates). Prompt-GDRO's scores: " + "; ".join(
                  f"{k.split('_', 2)[-1]}: {v['scores_from']}" for k, v in res["info"].items()
                  if k.startswith("prompt_gdro_")) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Paired differences vs GRPO of delta J (all, worst band, per generated rollout), per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(results)
    fig, axes = plt.subplots(len(steps), 3, figsize=(15, 0.8 + 5.0 * len(steps)), squeeze=False)
    for row, step in enumerate(steps):
        res = results[step]
        names = [n for n in res["methods"] if n != "grpo"]
        y = np.arange(len(names))
        for col, (key, label, scale) in enumerate((
            ("dJ_all_vs_grpo", "dJ held-out (1e-3) - GRPO's", SCALE),
            ("dJ_worst_vs_grpo", "dJ worst band (1e-3) - GRPO's", SCALE),
            ("dJ_per_rollout_vs_grpo", "dJ per 1k generated rollouts (1e-3) - GRPO's", SCALE * 1e3),
        )):
            ax = axes[row][col]
            vals = [res["methods"][n][key] for n in names]
            mean = np.array([v["mean"] for v in vals]) * scale
            err = np.array([[v["mean"] - v["lo"], v["hi"] - v["mean"]] for v in vals]).T * scale
            ax.errorbar(mean, y, xerr=err, fmt="o", capsize=3)
            ax.axvline(0.0, color="k", lw=0.8)
            ax.set_yticks(y)
            ax.set_yticklabels(names if col == 0 else [], fontsize=8)
            ax.set_title(f"{step}: {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
