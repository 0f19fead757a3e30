"""End-of-run PNG plots and a text summary, read back from ``metrics.jsonl`` / ``eval.jsonl``.

Every plot is optional: it is drawn only when its metric keys exist and hold at
least one finite value, so runs with other samplers/allocators (or older runs)
simply produce fewer files. ``None`` (the JSONL spelling of NaN) is NaN here.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``), so
it neither needs a display nor changes the backend of the calling process.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nemo_gdro.trainer.metrics import EVAL_FILE, METRICS_FILE, read_jsonl

PLOTS_DIR = "plots"
SUMMARY_FILE = "summary.txt"

REWARD_KEY = "train/reward_mean"
STEP_TIME_KEY = "time/step_s"
BEFORE_SFT_SUFFIX = "/before_sft"
# heatmap file stem -> (metric key prefix, title, colour-bar label)
HEATMAPS: dict[str, tuple[str, str, str]] = {
    "heatmap_prompt_share": ("bins/prompt_share/", "Prompt share per bin", "share of prompts"),
    "heatmap_response_share": ("prompt_gdro/response_share/", "Response share per bin", "share of responses"),
    "heatmap_prompt_gdro_weight": ("prompt_gdro/weight/", "Prompt-GDRO weight per bin", "weight"),
    "heatmap_rollouts_per_prompt": ("rollout_gdro/n_b/", "Rollouts per prompt per bin", "n_b"),
}
BIN_REWARD_PREFIX = "bins/reward_mean/"
ALLOC_HIST_PREFIX = "alloc/n_hist/"
_BAND_RE = re.compile(r"^(?P<metric>.+)/band_(?P<band>[^/]+)$")


# --------------------------------------------------------------------------- #
# Data access
# --------------------------------------------------------------------------- #


def _to_float(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return float("nan") if v is None else float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")  # strings etc.: not a plottable metric


class _Table:
    """Rows of a JSONL file as ``key -> (steps, values)`` with NaN for absent entries."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        rows = [r for r in rows if isinstance(r.get("step"), (int, float)) and not isinstance(r.get("step"), bool)]
        # Several records may share a step (e.g. two log_eval calls at step 0: before and after
        # SFT); merge them, a later value of the same key winning.
        by_step: dict[int, dict[str, Any]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), {}).update(r)
        self.steps = np.array(sorted(by_step), dtype=np.int64)
        self._rows = [by_step[s] for s in self.steps.tolist()]
        self.keys: set[str] = {k for r in self._rows for k in r if k != "step"}

    def __len__(self) -> int:
        return len(self._rows)

    def series(self, key: str) -> np.ndarray:
        """Values of ``key`` per step (float64 ``[S]``, NaN where absent)."""
        return np.array([_to_float(r.get(key)) for r in self._rows], dtype=np.float64)

    def finite_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        v = self.series(key)
        ok = np.isfinite(v)
        return self.steps[ok], v[ok]

    def with_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """``(suffix, key)`` for keys ``prefix + suffix``, suffixes sorted numerically when they are numbers."""
        found = [(k[len(prefix):], k) for k in self.keys if k.startswith(prefix) and len(k) > len(prefix)]
        return sorted(found, key=lambda t: _natural_key(t[0]))


def _natural_key(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, math.inf, s)


def _has_finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


# --------------------------------------------------------------------------- #
# Figure helpers
# --------------------------------------------------------------------------- #


def _new_figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: Path) -> Path:
    # Write-then-rename so a reader (or a crash) never sees half a PNG.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _plot_lines(ax: Any, table: _Table, keys: Iterable[tuple[str, str]], cmap: str | None = None) -> int:
    """Plot each key that has finite data; returns how many lines were drawn."""
    keys = list(keys)
    colours = None
    if cmap is not None and keys:
        from matplotlib import colormaps  # noqa: PLC0415 - only needed here

        colours = colormaps[cmap](np.linspace(0.0, 0.95, len(keys)))
    n = 0
    for i, (label, key) in enumerate(keys):
        x, y = table.finite_series(key)
        if len(x) == 0:
            continue
        kwargs: dict[str, Any] = {"label": label}
        if colours is not None:
            kwargs["color"] = colours[i]
        if len(x) <= 30:  # sparse series (evals every N steps): show the measured points
            kwargs.update(marker="o", markersize=3)
        ax.plot(x, y, **kwargs)
        n += 1
    return n


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step for pcolormesh (handles irregular logging intervals)."""
    s = steps.astype(np.float64)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[:-1] + s[1:]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _reward_plot(table: _Table, out: Path) -> Path | None:
    x, y = table.finite_series(REWARD_KEY)
    if len(x) == 0:
        return None
    fig, ax = _new_figure()
    ax.plot(x, y, color="tab:blue", alpha=0.35 if len(x) > 20 else 1.0, label="per step",
            marker="o" if len(x) == 1 else None)
    if len(x) > 20:
        # A centred moving average over ~5% of the run shows the trend through GRPO noise.
        w = max(3, len(x) // 20)
        kernel = np.ones(w) / w
        smooth = np.convolve(y, kernel, mode="valid")
        ax.plot(x[w // 2: w // 2 + len(smooth)], smooth, color="tab:blue", label=f"moving mean ({w} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("Training reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, out / "reward.png")


def _eval_plots(table: _Table, out: Path) -> list[Path]:
    eval_keys = sorted(k for k in table.keys if k.startswith("eval/"))
    plain = [(k[len("eval/"):], k) for k in eval_keys if not _BAND_RE.match(k)]
    bands: dict[str, list[tuple[str, str]]] = {}
    for k in eval_keys:
        m = _BAND_RE.match(k)
        if m:
            bands.setdefault(m.group("metric"), []).append((f"band {m.group('band')}", k))
    paths: list[Path] = []
    if plain:
        fig, ax = _new_figure()
        if _plot_lines(ax, table, plain):
            ax.set_xlabel("step")
            ax.set_ylabel("score")
            ax.set_title("Evaluation")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
            paths.append(_save(fig, out / "eval.png"))
    if bands:
        metrics = sorted(bands)
        fig = Figure(figsize=(6.0 * len(metrics), 4.0), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        drawn = 0
        for j, metric in enumerate(metrics):
            ax = fig.add_subplot(1, len(metrics), j + 1)
            keys = sorted(bands[metric], key=lambda t: _natural_key(t[0].removeprefix("band ")))
            if _plot_lines(ax, table, keys, cmap="viridis"):
                drawn += 1
                ax.legend(loc="best", fontsize="x-small")
            ax.set_title(f"{metric} per difficulty band")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if drawn:
            paths.append(_save(fig, out / "eval_bands.png"))
    return paths


def _heatmap(table: _Table, prefix: str, title: str, cbar_label: str, path: Path) -> Path | None:
    cols = table.with_prefix(prefix)
    if not cols or len(table) == 0:
        return None
    mat = np.stack([table.series(k) for _, k in cols], axis=0)  # [bins, steps]
    if not _has_finite(mat):
        return None
    fig, ax = _new_figure(8.0, 0.9 + 0.28 * len(cols) + 1.5)
    mesh = ax.pcolormesh(
        _step_edges(table.steps), np.arange(len(cols) + 1) - 0.5, np.ma.masked_invalid(mat),
        cmap="viridis", shading="flat",
    )
    fig.colorbar(mesh, ax=ax, label=cbar_label)
    ax.set_yticks(np.arange(len(cols)))
    ax.set_yticklabels([b for b, _ in cols], fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("bin (0 = hardest)" if all(b.isdigit() for b, _ in cols) else "bin")
    ax.set_title(title)
    return _save(fig, path)


def _bin_reward_plot(table: _Table, out: Path) -> Path | None:
    cols = table.with_prefix(BIN_REWARD_PREFIX)
    if not cols:
        return None
    fig, ax = _new_figure()
    if not _plot_lines(ax, table, [(f"bin {b}", k) for b, k in cols], cmap="viridis"):
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("Mean reward per bin")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    return _save(fig, out / "bin_reward.png")


def _alloc_hist(table: _Table, out: Path) -> Path | None:
    cols = table.with_prefix(ALLOC_HIST_PREFIX)
    ns: list[float] = []
    counts: list[float] = []
    for n_str, key in cols:
        try:
            n = float(n_str)
        except ValueError:
            continue  # e.g. alloc/n_hist/other: not a rollout count
        ns.append(n)
        counts.append(float(np.nansum(table.series(key))))
    if not ns or sum(counts) <= 0:
        return None
    fig, ax = _new_figure()
    ax.bar(ns, counts, width=0.8, color="tab:purple")
    ax.set_xlabel("rollouts per prompt n")
    ax.set_ylabel("prompts (summed over steps)")
    ax.set_title(f"Rollout allocation ({len(table)} steps)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "alloc_hist.png")


def _load_tables(run_dir: Path) -> tuple[_Table, _Table]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    return _Table(read_jsonl(run_dir / METRICS_FILE)), _Table(read_jsonl(run_dir / EVAL_FILE))


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def make_plots(run_dir: Path | str) -> list[Path]:
    """Draw every plot whose data exists into ``run_dir/plots/``; returns the PNG paths written.

    Plots: ``reward.png`` (``train/reward_mean``), ``eval.png`` and
    ``eval_bands.png`` (``eval/...`` keys from ``eval.jsonl`` or
    ``metrics.jsonl``; ``.../band_<x>`` keys go to the band figure), the step x
    bin heatmaps of :data:`HEATMAPS`, ``bin_reward.png``
    (``bins/reward_mean/<b>``) and ``alloc_hist.png`` (``alloc/n_hist/<n>``
    counts summed over steps). Missing keys/files give fewer plots, not errors.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    train, evals = _load_tables(run_dir)
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    if (p := _reward_plot(train, out)) is not None:
        paths.append(p)
    # Eval keys may also have been logged with the training metrics; eval.jsonl wins when both exist.
    eval_table = evals if any(k.startswith("eval/") for k in evals.keys) else train
    paths += _eval_plots(eval_table, out)
    for stem, (prefix, title, label) in HEATMAPS.items():
        if (p := _heatmap(train, prefix, title, label, out / f"{stem}.png")) is not None:
            paths.append(p)
    for fn in (_bin_reward_plot, _alloc_hist):
        if (p := fn(train, out)) is not None:
            paths.append(p)
    return paths


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.4g}"


def write_summary(run_dir: Path | str) -> Path:
    """Write ``run_dir/summary.txt``: steps, final/best reward, first vs last eval, wall time, plot location.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    train, evals = _load_tables(run_dir)
    lines = [f"run: {run_dir}"]
    if len(train):
        lines.append(f"steps logged: {len(train)} (step {train.steps[0]} .. {train.steps[-1]})")
    else:
        lines.append("steps logged: 0")

    x, y = train.finite_series(REWARD_KEY)
    if len(x):
        best = int(np.argmax(y))
        lines.append(f"reward ({REWARD_KEY}): final {_fmt(y[-1])} at step {x[-1]}, "
                     f"best {_fmt(y[best])} at step {x[best]}")
    else:
        lines.append(f"reward ({REWARD_KEY}): not logged")

    eval_table = evals if any(k.startswith("eval/") for k in evals.keys) else train
    all_keys = [k for k in eval_table.keys if k.startswith("eval/")]
    before = sorted(k for k in all_keys if k.endswith(BEFORE_SFT_SUFFIX))
    eval_keys = sorted((k for k in all_keys if k not in before), key=lambda k: (bool(_BAND_RE.match(k)), k))
    if before:
        parts = []
        for k in before:
            _, ys = eval_table.finite_series(k)
            if len(ys) and not _BAND_RE.match(k[: -len(BEFORE_SFT_SUFFIX)]):
                parts.append(f"{k[len('eval/') : -len(BEFORE_SFT_SUFFIX)]} {_fmt(ys[-1])}")
        if parts:
            lines.append(f"eval before SFT: {', '.join(parts)}")
    if eval_keys:
        lines.append("eval (first -> last):")
        for k in eval_keys:
            xs, ys = eval_table.finite_series(k)
            if len(xs) == 1:
                lines.append(f"  {k}: {_fmt(ys[0])} (step {xs[0]})")
            elif len(xs):
                lines.append(f"  {k}: {_fmt(ys[0])} (step {xs[0]}) -> {_fmt(ys[-1])} (step {xs[-1]})")
    else:
        lines.append("eval: none logged")

    _, t = train.finite_series(STEP_TIME_KEY)
    if len(t):
        total = float(t.sum())
        lines.append(f"wall time ({STEP_TIME_KEY} summed over logged steps): {total:.1f} s "
                     f"= {total / 3600:.2f} h, mean {total / len(t):.2f} s/step")
    else:
        lines.append(f"wall time: not logged ({STEP_TIME_KEY})")

    plots_dir = run_dir / PLOTS_DIR
    pngs = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    if pngs:
        lines.append(f"plots: {plots_dir} ({', '.join(p.name for p in pngs)})")
    else:
        lines.append(f"plots: none yet (make_plots would write them to {plots_dir})")

    path = run_dir / SUMMARY_FILE
    tmp = path.with_name(f".{SUMMARY_FILE}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
