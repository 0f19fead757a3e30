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
# Config sections that determine the SFT warm start (its cache key).
SFT_KEYS = ("model", "data", "sft", "optim", "parallel", "run.seed", "trainer.micro_batch_size", "rollout.temperature")


class BenchmarkConfigError(ValueError):
    """A problem in the benchmark YAML; the message names the file and key."""


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class BenchConfig:
    """The parsed benchmark YAML (see ``efficacy.yaml`` for the meaning of each key)."""

    path: Path
    baseline: str
    seeds: list[int]
    workers: int
    interval: str
    k: int
    testbed: list[str]
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
        workers=int(raw.get("workers", 2)),
        interval=interval,
        k=int(raw.get("k", 4)),
        testbed=str_list(raw.get("testbed"), "testbed"),
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
    method: str
    seed: int
    overrides: list[str]
    run_dir: Path
    sft_path: Path
    max_steps: int


def _run_overrides(testbed: Sequence[str], method_ov: Sequence[str], seed: int, split: str, run_dir: Path) -> list[str]:
    return [
        *testbed,
        *method_ov,
        f"run.seed={seed}",
        f"++eval.split={split}",
        f"run.output_dir={run_dir}",
        "run.resume=auto",
    ]


def _sft_key(overrides: list[str]) -> tuple[str, int]:
    """(cache key, max_steps) of a run's composed config."""
    from omegaconf import OmegaConf

    from benchmarks.efficacy_run import compose_run

    cfg = compose_run(overrides)
    parts = {k: OmegaConf.to_container(OmegaConf.select(cfg, k), resolve=True) if OmegaConf.is_config(OmegaConf.select(cfg, k)) else OmegaConf.select(cfg, k) for k in SFT_KEYS}
    return _short_hash(parts), int(cfg.trainer.max_steps)


def plan_jobs(
    cfg: BenchConfig, methods: Sequence[str], seeds: Sequence[int], split: str, work: Path, extra: Sequence[str] = ()
) -> tuple[dict[Path, list[str]], list[RunJob]]:
    """The SFT jobs (cache path -> overrides) and the run jobs for ``methods`` x ``seeds``."""
    testbed = [*cfg.testbed, *extra]
    sft_jobs: dict[Path, list[str]] = {}
    runs: list[RunJob] = []
    for method in methods:
        tag = _short_hash([testbed, cfg.methods[method]])
        for seed in seeds:
            run_dir = work / "runs" / split / f"{method}-{tag}" / f"seed{seed}"
            ov = _run_overrides(testbed, cfg.methods[method], seed, split, run_dir)
            key, max_steps = _sft_key(ov)
            sft_path = work / "sft" / f"seed{seed}-{key}.pt"
            sft_jobs.setdefault(sft_path, [*testbed, f"run.seed={seed}", f"run.output_dir={work / 'sft' / f'seed{seed}-{key}'}"])
            runs.append(RunJob(method, seed, ov, run_dir, sft_path, max_steps))
    return sft_jobs, runs


def run_finished(run_dir: Path, max_steps: int) -> bool:
    """True when ``run_dir`` holds an evaluation at ``max_steps`` (the run's last step)."""
    from nemo_gdro.trainer.metrics import EVAL_FILE, read_jsonl

    return any(int(e.get("step", -1)) == max_steps and "eval/pass@1" in e for e in read_jsonl(run_dir / EVAL_FILE))


# ------------------------------------------------------------- the workers
def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from nemo_gdro.cli import _quiet_third_party_warnings

    _quiet_third_party_warnings()


def _redirect(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _sft_job(overrides: list[str], path: str) -> dict[str, Any]:
    from benchmarks.efficacy_run import compose_run, prepare_sft

    _redirect(Path(path).with_suffix(".log"))
    t0 = time.perf_counter()
    metrics = prepare_sft(compose_run(overrides), path)
    return {"wall_s": time.perf_counter() - t0, **metrics}


def _run_job(overrides: list[str], sft_path: str, run_dir: str, keep_checkpoints: bool) -> dict[str, Any]:
    import shutil

    from benchmarks.efficacy_run import compose_run, run_one

    _redirect(Path(run_dir) / "run.log")
    t0 = time.perf_counter()
    out = run_one(compose_run(overrides), sft_path)
    if not keep_checkpoints:
        shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    out["wall_s"] = time.perf_counter() - t0
    return out


def execute(
    sft_jobs: Mapping[Path, list[str]], runs: Sequence[RunJob], workers: int, keep_checkpoints: bool = False
) -> list[str]:
    """Run the SFT jobs, then each run once its seed's SFT weights exist. Returns failure messages."""
    pending_runs = [r for r in runs if not run_finished(r.run_dir, r.max_steps)]
    skipped = len(runs) - len(pending_runs)
    needed = {r.sft_path for r in pending_runs}
    todo_sft = {p: ov for p, ov in sft_jobs.items() if p in needed and not p.is_file()}
    print(
        f"[efficacy] {len(pending_runs)} runs to do ({skipped} already finished), {len(todo_sft)} SFT warm starts, "
        f"{workers} worker process(es)",
        flush=True,
    )
    failures: list[str] = []
    if not pending_runs:
        return failures
    t_start = time.perf_counter()
    ctx = get_context("spawn")
    waiting = {p: [r for r in pending_runs if r.sft_path == p] for p in needed}
    futures: dict[Future, tuple[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:

        def submit_runs(path: Path) -> None:
            for r in waiting.pop(path, []):
                fut = pool.submit(_run_job, r.overrides, str(r.sft_path), str(r.run_dir), keep_checkpoints)
                futures[fut] = ("run", r)

        for path in needed:
            if path in todo_sft:
                futures[pool.submit(_sft_job, todo_sft[path], str(path))] = ("sft", path)
        for path in [p for p in needed if p not in todo_sft]:
            submit_runs(path)
        done_count = 0
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, what = futures.pop(fut)
                elapsed = time.perf_counter() - t_start
                try:
                    result = fut.result()
                except Exception as err:  # a failed job is reported; the others go on
                    label = what.name if kind == "sft" else f"{what.method} seed {what.seed} ({what.run_dir}/run.log)"
                    failures.append(f"{kind} {label}: {type(err).__name__}: {err}")
                    print(f"[efficacy] FAILED {failures[-1]}", flush=True)
                    if kind == "sft":
                        for r in waiting.pop(what, []):
                            failures.append(f"run {r.method} seed {r.seed}: skipped, its SFT warm start failed")
                    continue
                if kind == "sft":
                    print(f"[efficacy] {elapsed:6.0f}s SFT {what.name} ready ({result.get('wall_s', 0):.0f} s)", flush=True)
                    submit_runs(what)
                else:
                    done_count += 1
                    ev = result.get("final_eval", {})
                    print(
                        f"[efficacy] {elapsed:6.0f}s run {done_count}/{len(pending_runs)} {what.method} seed {what.seed}: "
                        f"pass@1 {ev.get('eval/pass@1', math.nan):.3f} ({result['wall_s']:.0f} s)",
                        flush=True,
                    )
    return failures


# ----------------------------------------------------------------- report
def report(
    cfg: BenchConfig, runs: Sequence[RunJob], split: str, results: Path, meta: Mapping[str, Any], stem: str = "efficacy"
) -> dict[str, Any]:
    """Build the JSON, Markdown and plots from the finished runs."""
    from benchmarks import efficacy_report as er

    data: dict[str, list[er.RunData]] = {}
    for r in runs:
        if run_finished(r.run_dir, r.max_steps):
            data.setdefault(r.method, []).append(er.load_run(r.run_dir, r.method, r.seed))
    if cfg.baseline not in data:
        raise RuntimeError(f"no finished run of the baseline {cfg.baseline!r}: nothing to compare against")
    order = [m for m in dict.fromkeys(r.method for r in runs) if m in data]
    opts = er.ReportOptions(baseline=cfg.baseline, k=cfg.k, interval=cfg.interval, method_notes=cfg.notes)
    full_meta = {**meta, "split": split, "methods_overrides": {m: cfg.methods[m] for m in order}, "testbed": cfg.testbed}
    rep = er.build_report({m: data[m] for m in order}, opts, full_meta)
    results.mkdir(parents=True, exist_ok=True)
    er.write_json(rep, results / f"{stem}.json")
    panels = {p: [m for m in names if m in data] for p, names in cfg.panels.items()} or {"all": order}
    er.plot_curves(rep, results / f"{stem}_curves.png", panels)
    er.plot_gains(rep, results / f"{stem}_gains.png")
    md = [f"# Efficacy benchmark ({split} split)\n", er.markdown_table(rep), "\n## Final pass@1 per difficulty band\n",
          er.markdown_bands(rep), f"\n## Bin occupancy of {cfg.baseline} (prompt share per bin, mean over seeds)\n",
          er.markdown_occupancy(rep, cfg.baseline)]
    (results / f"{stem}.md").write_text("\n".join(md), encoding="utf-8")
    print(er.markdown_table(rep), flush=True)
    print(f"[efficacy] report: {results / (stem + '.json')} (+ .md, _curves.png, _gains.png)", flush=True)
    return rep


# -------------------------------------------------------------------- main
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="efficacy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="benchmark YAML (methods, testbed, seeds)")
    p.add_argument("--group", default="main", help="method group of the YAML to run (default: main)")
    p.add_argument("--methods", default=None, help="comma-separated method names (overrides --group)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the YAML's)")
    p.add_argument("--split", default="eval", choices=("eval", "validation"), help="where runs are evaluated")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: the YAML's)")
    p.add_argument("--work-dir", default=None, help=f"runs and SFT caches (default: {DEFAULT_WORK})")
    p.add_argument("--results", default=None, help=f"report directory (default: {DEFAULT_RESULTS})")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run (repeatable)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke of the whole pipeline (tiny budgets)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (default: deleted)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_config(args.config)
    except BenchmarkConfigError as err:
        print(f"efficacy.py: {err}", file=sys.stderr)
        return 2
    extra = list(args.extra)
    if args.quick:
        q = cfg.quick
        methods = list(q.get("methods") or cfg.groups.get("main") or cfg.methods)
        seeds = [int(s) for s in q.get("seeds", [0, 1])]
        extra = [*(q.get("overrides") or []), *extra]
        workers = int(args.workers or q.get("workers", 2))
        tmp = None if args.work_dir else tempfile.mkdtemp(prefix="efficacy-quick-")
        work = Path(args.work_dir or tmp)
        results = Path(args.results) if args.results else work / "results"
    else:
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
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
    sft_jobs, runs = plan_jobs(cfg, methods, seeds, args.split, work.resolve(), extra)
    t0 = time.perf_counter()
    failures: list[str] = []
    if not args.report_only:
        failures = execute(sft_jobs, runs, workers, args.keep_checkpoints)
    wall = time.perf_counter() - t0
    stem = "efficacy" if args.split == "eval" else f"efficacy_{args.split}"
    if args.quick:
        stem = "efficacy_quick"
    meta = {
        "config": str(cfg.path.relative_to(ROOT) if cfg.path.is_relative_to(ROOT) else cfg.path),
        "seeds": seeds,
        "workers": workers,
        "wall_s": None if args.report_only else wall,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "extra_overrides": extra,
        "quick": bool(args.quick),
    }
    try:
        report(cfg, runs, args.split, results, meta, stem)
    except RuntimeError as err:
        print(f"efficacy.py: {err}", file=sys.stderr)
        failures.append(str(err))
    if failures:
        print(f"[efficacy] {len(failures)} failure(s):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
