"""M3's short training sweep: rollouts to a target pass@1 when data is reused or replayed, per loss.

    python benchmarks/mech_m3_sweep.py                       # 3 losses x {fresh, reuse 2, replay S=1, S=2}, seeds 0-1
    python benchmarks/mech_m3_sweep.py --reuse 1,2,4 --staleness 1,2,4   # the issue's full grid
    python benchmarks/mech_m3_sweep.py --quick               # toy sizes; only the configs this checkout can load

The frozen-policy part of M3 (:mod:`benchmarks.mech_m3`) measures what each
loss does to the gradient of a stale batch; this part asks whether that turns
into fewer generated rollouts. Every run is an ordinary efficacy-harness run
(``benchmarks/efficacy.py`` ``plan_jobs`` / ``execute``: the testbed of
``efficacy.yaml``, the seed-0 warm start, the validation split), 40 steps with
an evaluation every 5 (the
sweep's runs share the efficacy benchmark's warm start in the same ``--work-dir``). The losses:

- ``clipped``: GRPO's clipped loss (DAPO eps 0.2 / 0.28, dual clip 3);
- ``r2vpo``: R²VPO with its additive dual (r2vpo.md §2 defaults);
- ``r2vpo_lam0``: R²VPO with lambda held at 0 (``eta_lam=0``, ``lam_init=0``): unclipped importance sampling.

and the data regimes: ``fresh`` (each rollout used once), ``reuse<k>``
(``trainer.epochs_per_batch=k``: each batch used for k passes) and
``replay_s<S>`` (``algorithm.replay.ratio=1.0``, ``staleness=S``: each
step trains on its fresh batch plus as many replayed groups at most S
updates old). Every regime generates the same rollouts per step, so the
report's "rollouts to baseline final" (the first evaluation at which pass@1
reaches the baseline's final pass@1, ``clipped_fresh`` = GRPO, mean over
seeds) compares rollout efficiency directly.

A checkout that lacks a feature the sweep needs (``trainer.epochs_per_batch``,
``algorithm.replay``: both issue 19) refuses those configs before any job
starts; ``--quick`` then runs the configs that load and lists the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import efficacy as eff  # noqa: E402

#: The losses of the sweep: name -> overrides.
LOSSES: dict[str, list[str]] = {
    "clipped": ["algorithm.loss=clipped"],
    "r2vpo": ["algorithm.loss=r2vpo"],
    "r2vpo_lam0": ["algorithm.loss=r2vpo", "algorithm.r2vpo.eta_lam=0.0", "algorithm.r2vpo.lam_init=0.0"],
}
#: Overrides of every sweep run on top of the efficacy testbed: 40 steps, evaluated every 5.
SWEEP_OVERRIDES = ["trainer.max_steps=40", "trainer.eval_every=5"]
BASELINE = "clipped_fresh"
STEM = "mechanisms_m3_sweep"


def regimes(reuse: Sequence[int] = (1, 2), staleness: Sequence[int] = (1, 2)) -> dict[str, list[str]]:
    """Data regimes: name -> overrides (``fresh`` = reuse 1 without replay)."""
    out: dict[str, list[str]] = {"fresh": []}
    for k in reuse:
        if k > 1:
            out[f"reuse{k}"] = [f"trainer.epochs_per_batch={k}"]
    for s in staleness:
        out[f"replay_s{s}"] = ["algorithm.replay.ratio=1.0", f"algorithm.replay.staleness={s}"]
    return out


def sweep_methods(
    reuse: Sequence[int] = (1, 2), staleness: Sequence[int] = (1, 2), run: Sequence[str] = tuple(SWEEP_OVERRIDES)
) -> dict[str, list[str]]:
    """``<loss>_<regime>`` -> overrides (then ``run``, the sweep's run length), loss-major.

    The run length is part of each method, not of the testbed: the warm start's directory is named by the
    testbed alone, so the sweep shares the efficacy benchmark's warm start in the same work directory."""
    return {f"{loss}_{name}": [*lo, *ro, *run] for loss, lo in LOSSES.items()
            for name, ro in regimes(reuse, staleness).items()}


def sweep_config(base: eff.BenchConfig, methods: dict[str, list[str]]) -> eff.BenchConfig:
    """The efficacy config with the sweep's methods (baseline ``clipped_fresh``), one panel per loss."""
    panels = {loss: [m for m in methods if m.startswith(loss + "_") and m != BASELINE
                     and (loss != "r2vpo" or not m.startswith("r2vpo_lam0"))] for loss in LOSSES}
    notes = {BASELINE: "GRPO: clipped loss, each rollout used once"}
    return dataclasses.replace(base, methods=dict(methods), baseline=BASELINE, notes=notes,
                               groups={"m3_sweep": list(methods)}, panels=panels)


def loadable(cfg: eff.BenchConfig, methods: Sequence[str], work: Path, extra: Sequence[str],
             extra_warm: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The methods whose run config loads in this checkout, and why each other one does not."""
    from nemo_gdro.typed_config import ConfigError

    ok, refused = [], {}
    for m in methods:
        try:
            eff.plan_jobs(cfg, [m], [0], "validation", work, extra, extra_warm)
            ok.append(m)
        except ConfigError as err:
            refused[m] = str(err).splitlines()[0]
    return ok, refused


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mech_m3_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", default="1,2", help="passes per batch (trainer.epochs_per_batch), comma-separated")
    p.add_argument("--staleness", default="1,2", help="replay staleness S (algorithm.replay.ratio 1.0), comma-separated")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (every seed starts from the seed-0 warm start)")
    p.add_argument("--split", default="validation", choices=("validation", "eval"))
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: efficacy.yaml's)")
    p.add_argument("--work-dir", default=None, help=f"runs (default: {eff.DEFAULT_WORK}, shared with efficacy.py)")
    p.add_argument("--results", default=None, help=f"report directory (default: {eff.DEFAULT_RESULTS})")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    p.add_argument("--quick", action="store_true", help="toy sizes (efficacy.yaml's quick), loadable configs only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from nemo_gdro.typed_config import ConfigError

    base = eff.load_config(eff.DEFAULT_CONFIG)
    # --quick: the efficacy quick sizes (its run length too: the quick overrides are testbed overrides).
    methods = sweep_methods(_ints(args.reuse), _ints(args.staleness), () if args.quick else SWEEP_OVERRIDES)
    cfg = sweep_config(base, methods)
    extra, extra_warm = list(args.extra), []
    seeds = _ints(args.seeds)
    if args.quick:
        extra = [*(base.quick.get("overrides") or []), *args.extra]
        extra_warm = list(base.quick.get("warm_start") or [])
        seeds = seeds[:1]
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="m3-sweep-quick-"))
        results = Path(args.results) if args.results else work / "results"
    else:
        work = Path(args.work_dir) if args.work_dir else eff.DEFAULT_WORK
        results = Path(args.results) if args.results else eff.DEFAULT_RESULTS
    work = work.resolve()
    names, refused = loadable(cfg, list(methods), work, extra, extra_warm)
    for m, why in refused.items():
        print(f"[m3-sweep] {m}: this checkout refuses its config: {why}", file=sys.stderr)
    if refused and not args.quick:
        print(f"[m3-sweep] {len(refused)} config(s) do not load here: run the sweep on a checkout with "
              "trainer.epochs_per_batch and algorithm.replay (or pass --quick)", file=sys.stderr)
        return 2
    if BASELINE not in names:
        print(f"[m3-sweep] the baseline {BASELINE} does not load", file=sys.stderr)
        return 2
    try:
        sft_jobs, runs = eff.plan_jobs(cfg, names, seeds, args.split, work, extra, extra_warm)
    except ConfigError as err:
        print(f"[m3-sweep] {err}", file=sys.stderr)
        return 2
    workers = int(args.workers or (base.quick.get("workers", 2) if args.quick else base.workers))
    t0 = time.perf_counter()
    failures = eff.execute(sft_jobs, runs, workers)
    meta = {
        "part": "M3 training sweep", "methods": names, "refused_here": refused, "seeds": seeds,
        "workers": workers, "cpu_count": os.cpu_count(), "wall_s": time.perf_counter() - t0,
        "extra_overrides": extra, "quick": bool(args.quick), "config": "benchmarks/efficacy.yaml + mech_m3_sweep.py",
    }
    try:
        eff.report(cfg, runs, args.split, results, meta, STEM + ("_quick" if args.quick else ""))
    except (RuntimeError, ValueError) as err:
        failures.append(str(err))
    if failures:
        print("[m3-sweep] failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
