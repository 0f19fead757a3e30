"""Statistics, figures and tables of the efficacy benchmark, from the runs' JSONL files.

Everything here is a pure function of ``metrics.jsonl`` / ``eval.jsonl`` of the
runs (``nemo_gdro.trainer.metrics`` format), so a report can be rebuilt from a
finished work directory without training (``efficacy.py --report-only``).

Conventions: an *interval* is a two-sided 95% confidence interval over seeds
(Student t on the per-seed values, or a percentile bootstrap); a *gain* is
paired by seed (the same seed shares the SFT warm start and the data across
methods): ``diff_s = m_s - g_s`` and ``rel_s = diff_s / g_s`` for method m and
baseline g, and the interval is over the per-seed values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemo_gdro.trainer.metrics import EVAL_FILE, METRICS_FILE, read_jsonl

# Two-sided 97.5% quantiles of Student's t, df = 1..30 (beyond: the normal 1.96).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """Mean of per-seed values and its 95% interval (``lo == hi == mean`` with one value)."""

    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def mean_ci(values: Sequence[float], method: str = "t", *, seed: int = 0, resamples: int = 10_000) -> Interval:
    """Mean and two-sided 95% interval of ``values`` (NaNs dropped).

    method: ``t`` (Student t: mean +- t_{0.975, n-1} s / sqrt(n)) or
    ``bootstrap`` (percentile bootstrap of the mean, ``resamples`` draws).
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    if x.size == 1:
        return Interval(m, m, m, 1)
    if method == "t":
        half = t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
        return Interval(m, m - half, m + half, int(x.size))
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
        lo, hi = np.quantile(means, [0.025, 0.975])
        return Interval(m, float(lo), float(hi), int(x.size))
    raise ValueError(f"interval method must be 't' or 'bootstrap', got {method!r}")


def auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``steps``, divided by the step span (a mean level)."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.size != v.size or s.size == 0:
        raise ValueError(f"auc needs matching non-empty steps and values, got {s.size} and {v.size}")
    if s.size == 1:
        return float(v[0])
    span = float(s[-1] - s[0])
    area = float(np.sum((v[1:] + v[:-1]) * np.diff(s)) / 2.0)
    return area / span if span > 0 else float(v[-1])


def first_crossing(xs: Sequence[float], values: Sequence[float], target: float) -> float:
    """Smallest ``x`` at which the piecewise-linear curve ``values(xs)`` reaches ``target``; NaN if never."""
    for i, (x, v) in enumerate(zip(xs, values, strict=True)):
        if v >= target:
            if i == 0:
                return float(x)
            x0, v0 = xs[i - 1], values[i - 1]
            return float(x0 + (x - x0) * (target - v0) / (v - v0))
    return math.nan


# ----------------------------------------------------------------- one run
@dataclass
class RunData:
    """What the report needs from one run (from its JSONL files)."""

    method: str
    seed: int
    eval_steps: list[int]
    eval: dict[str, list[float]]  # eval key -> value at each eval step
    steps: list[int]
    train: dict[str, list[float]]  # metric key -> per-step value (NaN where absent)
    cum_rollouts: list[float]  # cumulative generated rollouts at each step (0 at step 0)
    cum_tokens: list[float]

    def at_eval(self, cum: Sequence[float]) -> list[float]:
        """A cumulative per-step series sampled at the eval steps."""
        by_step = dict(zip([0] + self.steps, [0.0] + list(cum)))
        return [by_step.get(s, math.nan) for s in self.eval_steps]


def load_run(run_dir: str | os.PathLike[str], method: str, seed: int) -> RunData:
    """Read one run's metrics; raises ``ValueError`` naming the directory if it has no evaluations."""
    run_dir = Path(run_dir)
    evals = read_jsonl(run_dir / EVAL_FILE)
    evals = [e for e in evals if "eval/pass@1" in e]
    if not evals:
        raise ValueError(f"{run_dir}: no evaluations in {EVAL_FILE}")
    by_step: dict[int, dict[str, Any]] = {}
    for e in evals:
        by_step[int(e["step"])] = e  # a resumed run may log a step twice: keep the last
    eval_steps = sorted(by_step)
    keys = sorted({k for e in by_step.values() for k in e if k.startswith("eval/") and "before_sft" not in k})
    eval_cols = {k: [_num(by_step[s].get(k)) for s in eval_steps] for k in keys}
    rows = {int(r["step"]): r for r in read_jsonl(run_dir / METRICS_FILE) if int(r["step"]) > 0}
    steps = sorted(rows)
    tkeys = sorted({k for r in rows.values() for k in r if k != "step"})
    train = {k: [_num(rows[s].get(k)) for s in steps] for k in tkeys}
    cum_r = np.cumsum(np.nan_to_num(np.asarray(train.get("train/rollouts", [0.0] * len(steps)))))
    cum_t = np.cumsum(np.nan_to_num(np.asarray(train.get("train/response_tokens", [0.0] * len(steps)))))
    return RunData(method, seed, eval_steps, eval_cols, steps, train, cum_r.tolist(), cum_t.tolist())


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


# ------------------------------------------------------------------ report
@dataclass
class ReportOptions:
    baseline: str = "grpo"
    k: int = 4
    interval: str = "t"
    occupancy_chunks: int = 5  # bin occupancy is averaged over this many equal step ranges
    method_notes: dict[str, str] = field(default_factory=dict)


def _nanmean(values: Sequence[float]) -> float:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


# Steps averaged for the figures of a run's start and end (train reward, zero-variance groups).
EDGE_STEPS = 10


def method_summary(runs: Sequence[RunData], opts: ReportOptions) -> dict[str, Any]:
    """Per-seed values and intervals of one method's runs."""
    ci = lambda vals: mean_ci(vals, opts.interval).as_dict()  # noqa: E731
    p1, pk = "eval/pass@1", f"eval/pass@{opts.k}"
    per_seed: dict[str, list[float]] = {
        "final_pass@1": [r.eval[p1][-1] for r in runs],
        f"final_pass@{opts.k}": [r.eval.get(pk, [math.nan])[-1] for r in runs],
        "auc_pass@1": [auc(r.eval_steps, r.eval[p1]) for r in runs],
        f"auc_pass@{opts.k}": [auc(r.eval_steps, r.eval[pk]) if pk in r.eval else math.nan for r in runs],
        "start_pass@1": [r.eval[p1][0] for r in runs],
        "zero_variance_groups": [_nanmean(r.train.get("train/zero_variance_groups", [])) for r in runs],
        "controller_ms_per_step": [_nanmean(r.train.get("time/controllers_ms", [])) for r in runs],
        "reward_mean": [_nanmean(r.train.get("train/reward_mean", [])) for r in runs],
        # The frontier the run starts on (before the method has changed much) and the reward it ends on.
        "start_reward_mean": [_nanmean(r.train.get("train/reward_mean", [])[:EDGE_STEPS]) for r in runs],
        "start_zero_variance_groups": [
            _nanmean(r.train.get("train/zero_variance_groups", [])[:EDGE_STEPS]) for r in runs
        ],
        "final_reward_mean": [_nanmean(r.train.get("train/reward_mean", [])[-EDGE_STEPS:]) for r in runs],
        "step_s": [_nanmean(r.train.get("time/step_s", [])) for r in runs],
        "rollouts": [r.cum_rollouts[-1] if r.cum_rollouts else 0.0 for r in runs],
        "response_tokens": [r.cum_tokens[-1] if r.cum_tokens else 0.0 for r in runs],
    }
    bands = sorted({k.rsplit("_", 1)[1] for r in runs for k in r.eval if k.startswith(f"{p1}/band_")}, key=int)
    band_final = {b: ci([r.eval.get(f"{p1}/band_{b}", [math.nan])[-1] for r in runs]) for b in bands}
    band_start = {b: ci([r.eval.get(f"{p1}/band_{b}", [math.nan])[0] for r in runs]) for b in bands}
    return {
        "seeds": [r.seed for r in runs],
        "per_seed": per_seed,
        "ci": {k: ci(v) for k, v in per_seed.items()},
        "bands_final_pass@1": band_final,
        "bands_start_pass@1": band_start,
        "curve": _mean_curve(runs, p1, opts),
        f"curve_pass@{opts.k}": _mean_curve(runs, pk, opts),
        "bin_occupancy": bin_occupancy(runs, opts.occupancy_chunks),
        "budget_share": bin_occupancy(runs, opts.occupancy_chunks, "bins/budget_share/"),
        "diagnostics": diagnostics(runs),
    }


def _mean_curve(runs: Sequence[RunData], key: str, opts: ReportOptions) -> dict[str, list[float]]:
    steps = runs[0].eval_steps
    if any(r.eval_steps != steps for r in runs) or any(key not in r.eval for r in runs):
        return {}
    cols = [mean_ci([r.eval[key][i] for r in runs], opts.interval) for i in range(len(steps))]
    return {"steps": list(steps), "mean": [c.mean for c in cols], "lo": [c.lo for c in cols], "hi": [c.hi for c in cols]}


def bin_occupancy(runs: Sequence[RunData], chunks: int, prefix: str = "bins/prompt_share/") -> dict[str, Any]:
    """Mean share per difficulty bin (``prefix``: prompt or budget share) over ``chunks`` equal step ranges and per step.

    Returns ``{"bins": [...], "ranges": [[first, last], ...], "share": [[share of bin b] per range], "per_step": [T][B]}``.
    """
    keys = sorted({k for r in runs for k in r.train if k.startswith(prefix)}, key=lambda k: int(k.rsplit("/", 1)[1]))
    if not keys:
        return {}
    steps = runs[0].steps
    mat = np.nanmean(np.stack([np.asarray([r.train[k] for k in keys], dtype=np.float64) for r in runs]), axis=0)  # [B, T]
    edges = np.linspace(0, len(steps), chunks + 1).round().astype(int)
    ranges, share = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            ranges.append([steps[a], steps[b - 1]])
            share.append(np.nanmean(mat[:, a:b], axis=1).round(4).tolist())
    return {"bins": [int(k.rsplit("/", 1)[1]) for k in keys], "ranges": ranges, "share": share,
            "per_step": mat.T.round(4).tolist()}


#: Per-step controller diagnostics summarised per method (mean over steps and seeds), when a run logs them.
DIAGNOSTIC_PREFIXES = (
    "prompt_gdro/", "rollout_gdro/", "dynamo/", "r2vpo/", "replay/", "alloc/", "policy/", "actor/", "train/",
    "bins/n_per_prompt/",
)


#: Per-bin Prompt-GDRO weights: ``prompt_gdro/weight/{b}``.
BIN_WEIGHT_PREFIX = "prompt_gdro/weight/"


def _present_bin_weights(values: Sequence[float]) -> list[float]:
    """A bin's per-step weights with the steps where the bin was absent from the batch as NaN.

    Runs since issue 19 log an absent bin's weight as NaN (null in metrics.jsonl). Older runs
    (the committed efficacy results among them) logged 0 for it: read that 0 as absent too.
    It is never a real weight: the normalised weight q_b / mean q of a present bin is > 0
    (gamma > 0 keeps q_b > 0) and the paper form's min(omega_b, w_max) is exp(...) > 0.
    """
    return [math.nan if v == 0 else v for v in values]


def diagnostics(runs: Sequence[RunData]) -> dict[str, float]:
    """Mean over steps (then over seeds) of every scalar controller / training diagnostic the runs logged.

    A per-bin weight is averaged over the steps where its bin was in the batch (NaN-skipping).
    """
    keys = sorted({k for r in runs for k in r.train if k.startswith(DIAGNOSTIC_PREFIXES) and "/n_hist/" not in k})

    def steps(r: RunData, k: str) -> Sequence[float]:
        values = r.train.get(k, [])
        if k.startswith(BIN_WEIGHT_PREFIX) and k[len(BIN_WEIGHT_PREFIX):].isdigit():
            return _present_bin_weights(values)
        return values

    return {k: _nanmean([_nanmean(steps(r, k)) for r in runs]) for k in keys}


def paired_gain(method: Sequence[RunData], base: Sequence[RunData], value, opts: ReportOptions) -> dict[str, Any]:
    """Per-seed difference and relative difference of ``value(run)`` against the baseline, paired by seed."""
    by_seed = {r.seed: r for r in base}
    pairs = [(value(r), value(by_seed[r.seed])) for r in method if r.seed in by_seed]
    diff = [m - g for m, g in pairs]
    rel = [(m - g) / g if g else math.nan for m, g in pairs]
    return {
        "diff": mean_ci(diff, opts.interval).as_dict(),
        "rel": mean_ci(rel, opts.interval).as_dict(),
        "per_seed_diff": diff,
        "wins": int(sum(d > 0 for d in diff)),
        "pairs": len(pairs),
    }


def reach_target(runs: Sequence[RunData], target: float) -> dict[str, Any]:
    """Rollouts / tokens / steps at which each run's eval pass@1 first reaches ``target``."""
    out = {"rollouts": [], "tokens": [], "steps": []}
    for r in runs:
        v = r.eval["eval/pass@1"]
        out["rollouts"].append(first_crossing(r.at_eval(r.cum_rollouts), v, target))
        out["tokens"].append(first_crossing(r.at_eval(r.cum_tokens), v, target))
        out["steps"].append(first_crossing(r.eval_steps, v, target))
    reached = [x for x in out["rollouts"] if math.isfinite(x)]
    out["reached"] = len(reached)
    out["runs"] = len(runs)
    for key in ("rollouts", "tokens", "steps"):
        vals = [x for x in out[key] if math.isfinite(x)]
        out[f"median_{key}"] = float(np.median(vals)) if vals else math.nan
    return out


def build_report(runs: Mapping[str, Sequence[RunData]], opts: ReportOptions, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure of the benchmark as one JSON-ready dict."""
    if opts.baseline not in runs:
        raise ValueError(f"the baseline method {opts.baseline!r} has no runs (methods: {sorted(runs)})")
    base = runs[opts.baseline]
    target = float(np.mean([r.eval["eval/pass@1"][-1] for r in base]))
    p1, pk = "eval/pass@1", f"eval/pass@{opts.k}"
    methods: dict[str, Any] = {}
    for name, rs in runs.items():
        s = method_summary(rs, opts)
        s["note"] = opts.method_notes.get(name, "")
        s["gain_final_pass@1"] = paired_gain(rs, base, lambda r: r.eval[p1][-1], opts)
        s[f"gain_final_pass@{opts.k}"] = paired_gain(rs, base, lambda r: r.eval[pk][-1], opts)
        s["gain_auc_pass@1"] = paired_gain(rs, base, lambda r: auc(r.eval_steps, r.eval[p1]), opts)
        s["reach_baseline_final"] = reach_target(rs, target)
        methods[name] = s
    rollouts = {name: sorted({r.cum_rollouts[-1] if r.cum_rollouts else 0.0 for r in rs}) for name, rs in runs.items()}
    return {
        "meta": dict(meta),
        "equal_total_rollouts": len({x for v in rollouts.values() for x in v}) == 1,
        "total_rollouts_per_run": rollouts,
        "baseline": opts.baseline,
        "k": opts.k,
        "interval": f"95% {'Student t' if opts.interval == 't' else 'percentile bootstrap'} over seeds",
        "baseline_final_pass@1": target,
        "methods": methods,
    }


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as strict JSON (NaN -> null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(report), f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# --------------------------------------------------------------- markdown
def _pm(ci: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    m, lo, hi = (ci.get(k) for k in ("mean", "lo", "hi"))
    if m is None or not math.isfinite(m):
        return "n/a"
    if lo is None or hi is None or not math.isfinite(lo) or lo == hi:
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The README table: one row per method (final and AUC pass@1 / pass@k, gains, costs)."""
    k = report["k"]
    head = (
        f"| method | seeds | final pass@1 | final pass@{k} | AUC pass@1 | gain pass@1 vs {report['baseline']} (rel. %) "
        f"| gain AUC (rel. %) | wins | rollouts to baseline final | zero-var groups | controller ms/step |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, s in report["methods"].items():
        c = s["ci"]
        g, ga = s["gain_final_pass@1"], s["gain_auc_pass@1"]
        reach = s["reach_baseline_final"]
        med = reach["median_rollouts"]
        reach_txt = f"{med / 1e3:.1f}k ({reach['reached']}/{reach['runs']})" if med is not None and math.isfinite(med) else f"not reached (0/{reach['runs']})"
        rows.append(
            f"| {name} | {len(s['seeds'])} | {_pm(c['final_pass@1'])} | {_pm(c[f'final_pass@{k}'])} | {_pm(c['auc_pass@1'])} "
            f"| {_pm(g['rel'], 100, 1)} | {_pm(ga['rel'], 100, 1)} | {g['wins']}/{g['pairs']} | {reach_txt} "
            f"| {_pm(c['zero_variance_groups'], 1, 2)} | {_pm(c['controller_ms_per_step'], 1, 2)} |"
        )
    return head + "\n".join(rows) + "\n"


def markdown_bands(report: Mapping[str, Any]) -> str:
    """Final pass@1 per difficulty band (mean over seeds), with the SFT start."""
    methods = report["methods"]
    bands = sorted({b for s in methods.values() for b in s["bands_final_pass@1"]}, key=int)
    head = "| method | " + " | ".join(f"band {b}" for b in bands) + " |\n|---|" + "---|" * len(bands) + "\n"
    base = methods[report["baseline"]]
    rows = ["| SFT start | " + " | ".join(f"{base['bands_start_pass@1'][b]['mean']:.3f}" for b in bands) + " |"]
    for name, s in methods.items():
        rows.append(f"| {name} | " + " | ".join(f"{s['bands_final_pass@1'][b]['mean']:.3f}" for b in bands) + " |")
    return head + "\n".join(rows) + "\n"


def markdown_occupancy(report: Mapping[str, Any], method: str) -> str:
    """Bin occupancy (prompt share per bin) over step ranges of one method."""
    occ = report["methods"][method]["bin_occupancy"]
    if not occ:
        return ""
    head = "| steps | " + " | ".join(f"bin {b}" for b in occ["bins"]) + " |\n|---|" + "---|" * len(occ["bins"]) + "\n"
    rows = [f"| {a}-{b} | " + " | ".join(f"{x:.2f}" for x in share) + " |" for (a, b), share in zip(occ["ranges"], occ["share"])]
    return head + "\n".join(rows) + "\n"


def markdown_costs(report: Mapping[str, Any]) -> str:
    """Rollouts / tokens to reach the baseline's final pass@1, totals, zero-variance fraction, reward, timings."""
    k = report["k"]
    head = (
        f"| method | gain pass@{k} (rel. %) | rollouts to baseline final (median) | tokens to baseline final (median) "
        f"| total rollouts | total response tokens | train reward (mean) | train reward, zero-var groups (first {EDGE_STEPS} steps) "
        "| step s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, s in report["methods"].items():
        reach, c = s["reach_baseline_final"], s["ci"]
        r_txt = _reach_txt(reach, "median_rollouts")
        t_txt = _reach_txt(reach, "median_tokens")
        rows.append(
            f"| {name} | {_pm(s[f'gain_final_pass@{k}']['rel'], 100, 1)} | {r_txt} | {t_txt} "
            f"| {c['rollouts']['mean']:.0f} | {c['response_tokens']['mean']:.0f} | {_pm(c['reward_mean'])} "
            f"| {c['start_reward_mean']['mean']:.3f}, {c['start_zero_variance_groups']['mean']:.2f} | {_pm(c['step_s'], 1, 2)} |"
        )
    return head + "\n".join(rows) + "\n"


def _reach_txt(reach: Mapping[str, Any], key: str) -> str:
    med = reach.get(key)
    if med is None or not math.isfinite(med):
        return f"not reached (0/{reach['runs']})"
    return f"{med / 1e3:.1f}k ({reach['reached']}/{reach['runs']})"


def _bin_keys(diag: Mapping[str, float], prefix: str) -> list[float]:
    return [v for k, v in diag.items() if k.startswith(prefix) and k[len(prefix):].isdigit() and math.isfinite(v)]


def diagnostic_row(diag: Mapping[str, float]) -> dict[str, str]:
    """The few controller figures that say whether a method could act at all (means over steps and seeds).

    - train pass rate: fraction of correct rollouts (the signal every controller sees);
    - Prompt-GDRO: the largest |bin score|; the range over bins of each bin's mean weight over the
      steps it was present (old logs: weight 0 = absent, see :func:`_present_bin_weights`); and,
      where the run logs them, the mean per-step min / max weight of the bins present and the
      effective bin mass (total variation between data share and share x weight);
    - allocation: rollouts per prompt in bin 0 (the hardest; 4 = uniform) and, for DynaMO, the budget
      share of prompts with accuracy < 0.1;
    - DynaMO modulation: mean |A~|/|A|; R2VPO: the multiplier lambda and the ratio variance V.
    """
    def fmt(v: float | None, digits: int = 3) -> str:
        return "" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"

    scores = _bin_keys(diag, "prompt_gdro/score/")
    # diag holds present-step means (see diagnostics()); a 0 here can only come from an old log's absent bin.
    weights = [w for w in _bin_keys(diag, BIN_WEIGHT_PREFIX) if w > 0]
    w_min, w_max = diag.get("prompt_gdro/weight_min"), diag.get("prompt_gdro/weight_max")  # per-step, present bins
    return {
        "train pass rate": fmt(diag.get("train/pass_rate")),
        "max abs bin score": fmt(max(map(abs, scores))) if scores else "",
        "bin weights": f"{min(weights):.3f}-{max(weights):.3f}" if weights else "",
        "step weight min-max": f"{w_min:.3f}-{w_max:.3f}" if fmt(w_min) and fmt(w_max) else "",
        "effective bin mass": fmt(diag.get("prompt_gdro/effective_bin_mass")),
        "n per prompt, bin 0": fmt(diag.get("bins/n_per_prompt/0")),
        "DynaMO budget share acc<0.1": fmt(diag.get("dynamo/budget_share/acc_lt_0.1")),
        "mean abs(A~)/abs(A)": fmt(diag.get("dynamo/adv_ratio_mean")),
        "R2VPO lambda": fmt(diag.get("r2vpo/lambda")),
        "R2VPO V": fmt(diag.get("r2vpo/V")),
    }


def markdown_diagnostics(report: Mapping[str, Any]) -> str:
    rows = {name: diagnostic_row(m.get("diagnostics", {})) for name, m in report["methods"].items()}
    cols = [c for c in next(iter(rows.values()), {}) if any(r[c] for r in rows.values())]
    if not cols:
        return ""
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(r[c] for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def markdown_report(report: Mapping[str, Any], title: str) -> str:
    """The whole report as Markdown: main table, costs, bands, occupancy of every method, start check."""
    parts = [f"# {title}\n", f"Intervals: {report['interval']}; gains are paired by seed. "
             f"Baseline final pass@1: {report['baseline_final_pass@1']:.3f}. "
             f"Equal total rollouts in every run: {report['equal_total_rollouts']}.\n",
             markdown_table(report), "\n## Costs\n", markdown_costs(report),
             "\n## Final pass@1 per difficulty band (mean over seeds)\n", markdown_bands(report)]
    diag = markdown_diagnostics(report)
    if diag:
        parts += ["\n## Controller diagnostics (mean over steps and seeds)\n", diag]
    for name in report["methods"]:
        occ = markdown_occupancy(report, name)
        if occ:
            parts += [f"\n## Bin occupancy: {name} (prompt share per bin, mean over seeds)\n", occ]
    check = report["meta"].get("start_check")
    if check:
        parts.append(f"\n## Start check\n\nLargest spread of step-0 pass@1 across the methods of a seed: "
                     f"{check['max_spread_across_methods']:.4g}" + (
                         f"; largest difference to the warm-start job's own evaluation: {check['max_diff_to_warm_start_job']:.4g}"
                         if "max_diff_to_warm_start_job" in check else "") + ".\n")
    return "\n".join(parts)


# ------------------------------------------------------------------- plots
def plot_curves(report: Mapping[str, Any], path: str | os.PathLike[str], panels: Mapping[str, Sequence[str]]) -> Path:
    """Held-out pass@1 over steps, mean and 95% band over seeds; one panel per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), sharey=True, squeeze=False)
    for ax, (title, names) in zip(axes[0], panels.items()):
        for name in [report["baseline"]] + [n for n in names if n != report["baseline"]]:
            c = methods.get(name, {}).get("curve")
            if not c:
                continue
            style = {"color": "black", "lw": 2.0} if name == report["baseline"] else {"lw": 1.4}
            (line,) = ax.plot(c["steps"], c["mean"], label=name, **style)
            ax.fill_between(c["steps"], c["lo"], c["hi"], color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(title)
        ax.set_xlabel("RL step (equal rollouts per step for every method)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("held-out pass@1 (mean, 95% CI over seeds)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gains(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Relative gain over the baseline (final pass@1 and AUC pass@1) with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report["methods"] if n != report["baseline"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.2))
    x = np.arange(len(names))
    for off, key, label in ((-0.2, "gain_final_pass@1", "final pass@1"), (0.2, "gain_auc_pass@1", "AUC pass@1")):
        ci = [report["methods"][n][key]["rel"] for n in names]
        mean = np.asarray([_or_nan(c["mean"]) for c in ci]) * 100
        lo = np.asarray([_or_nan(c["lo"]) for c in ci]) * 100
        hi = np.asarray([_or_nan(c["hi"]) for c in ci]) * 100
        ax.bar(x + off, mean, width=0.4, label=label)
        ax.errorbar(x + off, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"relative gain vs {report['baseline']} (%), 95% CI, paired by seed")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _or_nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def plot_occupancy(report: Mapping[str, Any], path: str | os.PathLike[str], methods: Sequence[str] | None = None) -> Path:
    """Step x bin heatmaps of the prompt share (mean over seeds), one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in (methods or report["methods"]) if report["methods"][n].get("bin_occupancy")]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    # constrained layout keeps long method names (titles) clear of the row above's axis labels
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes.flat, names):
        occ = report["methods"][name]["bin_occupancy"]
        mat = np.asarray(occ["per_step"], dtype=np.float64).T  # [B, T]
        image = ax.imshow(mat, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("RL step", fontsize=8)
        ax.set_ylabel("bin (0 = hardest)", fontsize=8)
        ax.set_yticks(range(len(occ["bins"])), [str(b) for b in occ["bins"]], fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="prompt share")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
