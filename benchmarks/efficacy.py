"""Efficacy benchmark (issue 11): every method against GRPO at equal total rollouts.

    python benchmarks/efficacy.py                      # the main group, seeds and budgets of efficacy.yaml
    python benchmarks/efficacy.py --quick              # ~2-minute smoke of the whole pipeline (make test runs it)
    python benchmarks/efficacy.py --group why --split validation   # diagnostics, settings chosen on validation
    python benchmarks/efficacy.py --report-only        # rebuild the report from finished runs

Everything that defines a method, the testbed and the budgets is in one YAML
file (``benchmarks/efficacy.yaml``): ``methods`` maps a name to its config
overrides of ``nemo_gdro/conf/train.yaml``; ``testbed`` holds the overrides
common to every run. Per seed the SFT warm start is trained once and every
method of that seed starts from the same weights (and sees the same data), so
gains are paired by seed. Every method generates the same number of rollouts
per step (the allocators keep the budget exactly), so equal steps means equal
total rollouts.

Runs go in parallel worker processes (``--workers``, one thread each); each
run's log, metrics and evaluations are under ``--work-dir``; finished runs are
reused when the benchmark is run again with the same settings. The report
(JSON with every figure, Markdown tables, a plot of the curves with bands and
a bar chart of the gains) goes to ``--results``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import nemo_gdro / benchmarks from this checkout
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

DEFAULT_CONFIG = ROOT / "benchmarks" / "efficacy.yaml"
DEFAULT_WORK = ROOT / "outputs" / "efficacy"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
class BenchmarkConfigError(ValueError):
    """A problem in the benchmark YAML; the message names the file and key."""


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class BenchConfig:
    """The parsed benchmark YAML (see ``efficacy.yaml`` for the meaning of each key)."""

    path: Path
    baseline: str
    seeds: list[int]
    warm_start_seed: int | None
    workers: int
    interval: str
    k: int
    testbed: list[str]
    warm_start: list[str]
    methods: dict[str, list[str]]
    notes: dict[str, str]
    groups: dict[str, list[str]]
    panels: dict[str, list[str]]
    quick: dict[str, Any]


def load_config(path: str | os.PathLike[str]) -> BenchConfig:
    """Read and check the benchmark YAML; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise BenchmarkConfigError(f"{path}: cannot read the benchmark config: {err}") from None
    if not isinstance(raw, dict):
        raise BenchmarkConfigError(f"{path}: the top level must be a mapping")

    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in raw:
            raise BenchmarkConfigError(f"{path}: missing key {key!r}")
        if not isinstance(raw[key], kind):
            raise BenchmarkConfigError(f"{path}: {key!r} must be a {getattr(kind, '__name__', kind)}")
        return raw[key]

    def str_list(value: Any, where: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BenchmarkConfigError(f"{path}: {where} must be a list of override strings")
        return list(value)

    methods_raw = need("methods", dict)
    methods = {str(name): str_list(ov, f"methods.{name}") for name, ov in methods_raw.items()}
    baseline = str(need("baseline", str))
    if baseline not in methods:
        raise BenchmarkConfigError(f"{path}: baseline {baseline!r} is not one of methods ({', '.join(methods)})")
    groups = {str(g): str_list(m, f"groups.{g}") for g, m in (raw.get("groups") or {}).items()}
    panels = {str(p): str_list(m, f"panels.{p}") for p, m in (raw.get("panels") or {}).items()}
    for where, table in (("groups", groups), ("panels", panels)):
        for g, names in table.items():
            unknown = [n for n in names if n not in methods]
            if unknown:
                raise BenchmarkConfigError(f"{path}: {where}.{g} names unknown methods {unknown}")
    notes = {str(k): str(v) for k, v in (raw.get("notes") or {}).items()}
    seeds = need("seeds", list)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise BenchmarkConfigError(f"{path}: seeds must be a non-empty list of integers")
    warm_start_seed = raw.get("warm_start_seed")
    if warm_start_seed is not None and (isinstance(warm_start_seed, bool) or not isinstance(warm_start_seed, int)):
        raise BenchmarkConfigError(f"{path}: warm_start_seed must be an integer or null, got {warm_start_seed!r}")
    interval = str(raw.get("interval", "t"))
    if interval not in ("t", "bootstrap"):
        raise BenchmarkConfigError(f"{path}: interval must be 't' or 'bootstrap', got {interval!r}")
    quick = raw.get("quick") or {}
    if not isinstance(quick, dict):
        raise BenchmarkConfigError(f"{path}: quick must be a mapping")
    return BenchConfig(
        path=path,
        baseline=baseline,
        seeds=[int(s) for s in seeds],
        warm_start_seed=warm_start_seed,
        workers=int(raw.get("workers", 2)),
        interval=interval,
        k=int(raw.get("k", 4)),
        testbed=str_list(raw.get("testbed"), "testbed"),
        warm_start=str_list(raw.get("warm_start"), "warm_start"),
        methods=methods,
        notes=notes,
        groups=groups,
        panels=panels,
        quick=quick,
    )


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class RunJob:
    """One (method, seed) run: its overrides, directory, warm start and length."""

    method: str
    seed: int
    overrides: list[str]
    run_dir: Path
    sft_dir: Path
    max_steps: int


def _max_steps(overrides: list[str]) -> int:
    """``trainer.max_steps`` of a run; composes and type-checks its config (a bad override fails here)."""
    from nemo_gdro.trainer.config import load

    return int(load("train", overrides).trainer.max_steps)


def plan_jobs(
    cfg: BenchConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    split: str,
    work: Path,
    extra: Sequence[str] = (),
    extra_warm_start: Sequence[str] = (),
) -> tuple[dict[Path, list[str]], list[RunJob]]:
    """The warm-start jobs (directory -> overrides) and the runs of ``methods`` x ``seeds``.

    Directories are named by a hash of what defines them, so a changed testbed
    or method never reuses stale results, and finished ones are reused. With
    ``cfg.warm_start_seed`` set, every seed starts from that seed's warm start
    (the seeds then differ only in the RL run); otherwise each seed has its own.
    """
    from benchmarks.efficacy_run import method_overrides, sft_overrides

    testbed = [*cfg.testbed, *extra]
    warm = [*cfg.warm_start, *extra_warm_start]
    sft_jobs: dict[Path, list[str]] = {}
    runs: list[RunJob] = []
    for seed in seeds:
        warm_seed = seed if cfg.warm_start_seed is None else cfg.warm_start_seed
        sft_dir = work / "sft" / f"seed{warm_seed}-{_short_hash([testbed, warm])}"
        sft_jobs[sft_dir] = sft_overrides(testbed, warm, warm_seed, sft_dir)
        for method in methods:
            tag = _short_hash([testbed, warm, cfg.methods[method]])
            run_dir = work / "runs" / split / f"{method}-{tag}" / f"seed{seed}"
            ov = method_overrides(testbed, cfg.methods[method], seed, split, sft_dir, run_dir)
            runs.append(RunJob(method, seed, ov, run_dir, sft_dir, 0))
    # Every run of the plan has the same length; compose once per method to check the overrides early.
    steps = {m: _max_steps(next(r.overrides for r in runs if r.method == m)) for m in methods}
    runs = [RunJob(r.method, r.seed, r.overrides, r.run_dir, r.sft_dir, steps[r.method]) for r in runs]
    return sft_jobs, runs


def execute(
    sft_jobs: Mapping[Path, list[str]], runs: Sequence[RunJob], workers: int, keep_checkpoints: bool = False
) -> list[str]:
    """Run the warm starts and the runs, at most ``workers`` jobs at a time. Returns failure messages.

    Order: a missing warm start first (every run of its seed waits on it), then
    the runs method-major in the order of ``runs`` (all seeds of the first
    method, then the next), skipping those whose warm start is not ready yet.
    So a benchmark stopped early leaves whole methods (all seeds) finished,
    not all methods at one seed.
    """
    from benchmarks.efficacy_run import init_worker, run_finished, sft_ready, train_job

    pending_runs = [r for r in runs if not run_finished(r.run_dir, r.max_steps)]
    skipped = len(runs) - len(pending_runs)
    needed = list(dict.fromkeys(r.sft_dir for r in pending_runs))
    todo_sft = [p for p in needed if not sft_ready(p)]
    print(
        f"[efficacy] {len(pending_runs)} runs to do ({skipped} already finished), {len(todo_sft)} warm starts, "
        f"{workers} worker process(es)",
        flush=True,
    )
    failures: list[str] = []
    if not pending_runs:
        return failures
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in runs))}
    queue = sorted(pending_runs, key=lambda r: (method_rank[r.method], r.seed))
    ready = {p for p in needed if p not in todo_sft}
    sft_queue = list(todo_sft)
    t_start = time.perf_counter()
    futures: dict[Future, tuple[str, Any]] = {}
    # A fresh process per job: each run initialises (and tears down) its own torch.distributed world.
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=init_worker, max_tasks_per_child=1
    )

    def fill() -> None:
        while len(futures) < workers:
            if sft_queue:
                path = sft_queue.pop(0)
                futures[pool.submit(train_job, sft_jobs[path], str(path), keep_checkpoints)] = ("sft", path)
                continue
            nxt = next((r for r in queue if r.sft_dir in ready), None)
            if nxt is None:
                return
            queue.remove(nxt)
            futures[pool.submit(train_job, nxt.overrides, str(nxt.run_dir), keep_checkpoints)] = ("run", nxt)

    with pool:
        fill()
        done_count = 0
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, what = futures.pop(fut)
                elapsed = time.perf_counter() - t_start
                try:
                    result = fut.result()
                    if kind == "sft" and not sft_ready(what):
                        raise RuntimeError(f"the warm start wrote no export at {what}")
                except Exception as err:  # a failed job is reported; the others go on
                    label = what.name if kind == "sft" else f"{what.method} seed {what.seed}"
                    log = what.with_name(what.name + ".log") if kind == "sft" else what.run_dir.with_name(what.run_dir.name + ".log")
                    failures.append(f"{kind} {label}: {type(err).__name__}: {err} (log: {log})")
                    print(f"[efficacy] FAILED {failures[-1]}", flush=True)
                    if kind == "sft":
                        for r in [r for r in queue if r.sft_dir == what]:
                            queue.remove(r)
                            failures.append(f"run {r.method} seed {r.seed}: skipped, its warm start failed")
                    continue
                ev = result.get("final_eval", {})
                if kind == "sft":
                    ready.add(what)
                    print(
                        f"[efficacy] {elapsed:6.0f}s warm start {what.name} ready ({result['wall_s']:.0f} s; "
                        f"validation pass@1 at the end of SFT: see {what}/eval.jsonl)",
                        flush=True,
                    )
                else:
                    done_count += 1
                    print(
                        f"[efficacy] {elapsed:6.0f}s run {done_count}/{len(pending_runs)} {what.method} seed {what.seed}: "
                        f"pass@1 {ev.get('eval/pass@1', math.nan):.3f} ({result['wall_s']:.0f} s)",
                        flush=True,
                    )
            fill()
    return failures


# ----------------------------------------------------------------- report
def start_check(runs: Sequence[RunJob], split: str, warm_start_seed: int | None = None) -> dict[str, Any]:
    """Do the runs of a seed start from the same policy?

    Every method of a seed loads its warm start's export and evaluates at step
    0 with the same seed, so their step-0 evaluations must agree exactly; on
    the validation split they must also equal the warm-start job's own
    evaluation at the end of SFT (compared for the seed that trained the warm
    start only: the evaluation samples with the run's seed). Returns the
    largest disagreement of pass@1.
    """
    from nemo_gdro.trainer.metrics import EVAL_FILE, read_jsonl

    def step0(path: Path) -> float | None:
        rows = [e for e in read_jsonl(path / EVAL_FILE) if int(e.get("step", -1)) == 0 and "eval/pass@1" in e]
        return float(rows[-1]["eval/pass@1"]) if rows else None

    per_seed: dict[str, Any] = {}
    worst_methods, worst_sft = 0.0, 0.0
    for seed in sorted({r.seed for r in runs}):
        mine = [r for r in runs if r.seed == seed and (r.run_dir / EVAL_FILE).is_file()]
        values = {r.method: step0(r.run_dir) for r in mine}
        values = {m: v for m, v in values.items() if v is not None}
        entry: dict[str, Any] = {"methods": values}
        if values:
            worst_methods = max(worst_methods, max(values.values()) - min(values.values()))
        same_sampling = warm_start_seed is None or seed == warm_start_seed
        if split == "validation" and same_sampling and mine and (mine[0].sft_dir / EVAL_FILE).is_file():
            sft = step0(mine[0].sft_dir)
            entry["warm_start_job"] = sft
            if sft is not None and values:
                worst_sft = max(worst_sft, max(abs(v - sft) for v in values.values()))
        per_seed[str(seed)] = entry
    out: dict[str, Any] = {"max_spread_across_methods": worst_methods, "per_seed": per_seed}
    if split == "validation":
        out["max_diff_to_warm_start_job"] = worst_sft
    return out


def report(
    cfg: BenchConfig, runs: Sequence[RunJob], split: str, results: Path, meta: Mapping[str, Any], stem: str = "efficacy"
) -> dict[str, Any]:
    """Build the JSON, Markdown and plots from the finished runs."""
    from benchmarks import efficacy_report as er
    from benchmarks.efficacy_run import run_finished

    data: dict[str, list[er.RunData]] = {}
    for r in runs:
        if run_finished(r.run_dir, r.max_steps):
            data.setdefault(r.method, []).append(er.load_run(r.run_dir, r.method, r.seed))
    if cfg.baseline not in data:
        raise RuntimeError(f"no finished run of the baseline {cfg.baseline!r}: nothing to compare against")
    order = [m for m in dict.fromkeys(r.method for r in runs) if m in data]
    opts = er.ReportOptions(baseline=cfg.baseline, k=cfg.k, interval=cfg.interval, method_notes=cfg.notes)
    full_meta = {
        **meta,
        "split": split,
        "methods_overrides": {m: cfg.methods[m] for m in order},
        "testbed": cfg.testbed,
        "warm_start": cfg.warm_start,
        "warm_start_seed": cfg.warm_start_seed,
        "start_check": start_check([r for r in runs if r.method in data], split, cfg.warm_start_seed),
    }
    rep = er.build_report({m: data[m] for m in order}, opts, full_meta)
    results.mkdir(parents=True, exist_ok=True)
    er.write_json(rep, results / f"{stem}.json")
    panels = {p: [m for m in names if m in data] for p, names in cfg.panels.items()}
    panels = {p: names for p, names in panels.items() if names} or {"all": order}
    er.plot_curves(rep, results / f"{stem}_curves.png", panels)
    er.plot_gains(rep, results / f"{stem}_gains.png")
    er.plot_occupancy(rep, results / f"{stem}_occupancy.png")
    (results / f"{stem}.md").write_text(er.markdown_report(rep, f"Efficacy benchmark ({split} split)"), encoding="utf-8")
    print(er.markdown_table(rep), flush=True)
    print(f"[efficacy] report: {results / (stem + '.json')} (+ .md, _curves.png, _gains.png, _occupancy.png)", flush=True)
    return rep


# -------------------------------------------------------------------- main
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="efficacy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="benchmark YAML (methods, testbed, seeds)")
    p.add_argument("--group", default="main", help="method group of the YAML to run (default: main)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names (overrides --group, and the quick section's methods with --quick)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the YAML's)")
    p.add_argument("--split", default="eval", choices=("eval", "validation"),
                   help="held-out split the runs report (choose settings on validation, report on eval)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes, one thread each (default: the YAML's)")
    p.add_argument("--work-dir", default=None, help=f"runs and warm starts (default: {DEFAULT_WORK})")
    p.add_argument("--results", default=None, help=f"report directory (default: {DEFAULT_RESULTS})")
    p.add_argument("--stem", default=None, help="file name stem of the report (default: efficacy[_validation])")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run (repeatable)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke of the whole pipeline (tiny budgets)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (default: deleted)")
    return p.parse_args(argv)


def _load_avg() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): how busy the cores were."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def previous_timing(report_json: Path) -> dict[str, Any]:
    """The wall time and load averages of the report being rebuilt, if there is one.

    ``--report-only`` runs nothing, so its own wall time says nothing about the runs; rebuilding a
    committed report keeps the timing of the invocation that produced them.
    """
    try:
        old = json.loads(report_json.read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if old.get("wall_s") is None:
        return {}
    keep = {k: old.get(k) for k in ("wall_s", "load_avg_at_start", "load_avg_at_end")}
    return {**keep, "timing": f"carried over from the previous {report_json.name} (--report-only runs nothing)"}


def _method_list(arg: str | None) -> list[str]:
    """``--methods a,b`` -> ``["a", "b"]`` (``[]`` when not given)."""
    return [m.strip() for m in (arg or "").split(",") if m.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_config(args.config)
    except BenchmarkConfigError as err:
        print(f"efficacy.py: {err}", file=sys.stderr)
        return 2
    extra, extra_warm = list(args.extra), []
    if args.quick:
        q = cfg.quick
        # --methods picks the methods of the smoke too (e.g. to try a new method at toy size).
        methods = _method_list(args.methods) or list(q.get("methods") or cfg.groups.get("main") or cfg.methods)
        seeds = [int(s) for s in (args.seeds.split(",") if args.seeds else q.get("seeds", [0, 1]))]
        extra = [*(q.get("overrides") or []), *extra]
        extra_warm = list(q.get("warm_start") or [])
        workers = int(args.workers or q.get("workers", 2))
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="efficacy-quick-"))
        results = Path(args.results) if args.results else work / "results"
    else:
        if args.methods:
            methods = _method_list(args.methods)
        elif args.group in cfg.groups:
            methods = cfg.groups[args.group]
        else:
            print(f"efficacy.py: {cfg.path}: no group {args.group!r} (groups: {', '.join(cfg.groups)})", file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg.seeds
        workers = int(args.workers or cfg.workers)
        work = Path(args.work_dir) if args.work_dir else DEFAULT_WORK
        results = Path(args.results) if args.results else DEFAULT_RESULTS
    unknown = [m for m in methods if m not in cfg.methods]
    if unknown:
        print(f"efficacy.py: {cfg.path}: unknown methods {unknown} (known: {', '.join(cfg.methods)})", file=sys.stderr)
        return 2
    if cfg.baseline not in methods:
        methods = [cfg.baseline, *methods]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from nemo_gdro.typed_config import ConfigError

    try:
        sft_jobs, runs = plan_jobs(cfg, methods, seeds, args.split, work.resolve(), extra, extra_warm)
    except ConfigError as err:  # a bad override fails here, before any job starts
        print(f"efficacy.py: {cfg.path}: {err}", file=sys.stderr)
        return 2
    stem = args.stem or ("efficacy_quick" if args.quick else "efficacy" if args.split == "eval" else f"efficacy_{args.split}")
    failures: list[str] = []
    if args.report_only:  # nothing runs: keep the timing of the report being rebuilt, if any
        timing = {"wall_s": None, "load_avg_at_start": None, "load_avg_at_end": None, "timing": None}
        timing.update(previous_timing(results / f"{stem}.json"))
    else:
        load_start, t0 = _load_avg(), time.perf_counter()
        failures = execute(sft_jobs, runs, workers, args.keep_checkpoints)
        timing = {"wall_s": time.perf_counter() - t0, "load_avg_at_start": load_start,
                  "load_avg_at_end": _load_avg(), "timing": "this invocation"}
    meta = {
        "config": str(cfg.path.relative_to(ROOT) if cfg.path.is_relative_to(ROOT) else cfg.path),
        "methods": methods,
        "seeds": seeds,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        **timing,
        "extra_overrides": extra,
        "quick": bool(args.quick),
    }
    try:
        report(cfg, runs, args.split, results, meta, stem)
    except (RuntimeError, ValueError) as err:
        print(f"efficacy.py: {err}", file=sys.stderr)
        failures.append(str(err))
    if failures:
        print(f"[efficacy] {len(failures)} failure(s):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
