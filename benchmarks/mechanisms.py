"""Mechanism benchmark (issue 19): what each method does to the gradient, at a frozen policy.

    python benchmarks/mechanisms.py                         # M1, M2, M3, M4 on the default subject (below)
    python benchmarks/mechanisms.py --parts m1 --step 20    # one part, one checkpoint
    python benchmarks/mechanisms.py --run RUN_DIR           # any run with checkpoints
    python benchmarks/mechanisms.py --quick                 # a toy version (~2 minutes; make test runs it)

The subject: without ``--run``, a GRPO run of the efficacy testbed
(``benchmarks/efficacy.yaml``, method ``grpo``, seed 0) with a checkpoint after
every step, made through the efficacy harness (reused when finished, resumed
when stopped; ``benchmarks/mech_run.py``). At each chosen checkpoint the policy
is frozen (``benchmarks/mech_policy.py``): ``K`` rollouts per pool prompt and
per eval prompt, each rollout's score gradient (count-sketched) and its exact
inner products with the held-out band gradients (plain and Adam-preconditioned),
cached under the work directory so the parts re-run in seconds.

- M1 (``benchmarks/mech_m1.py``): rollout allocation at equal rollouts: cosine of
  each allocator's estimate to the train and held-out gradients, signal-to-noise,
  informative-rollout share, paired against uniform.
- M2 (``benchmarks/mech_m2.py``): data weighting and selection: each method's
  Adam update and its linearised effect on each difficulty band's held-out
  objective (and the worst band), paired against GRPO, per step and per
  generated rollout.
- M3 (``benchmarks/mech_m3.py``, when present): stale data and reuse.
- M4 (``benchmarks/mech_m4.py``, when present): DynaMO's token modulation at a frozen policy.

Default checkpoints: step 0 (the warm start, M1 only: M2 needs Adam's state)
and step 20 of 80, where zero-variance groups and headroom are both present
(``--quick``: the toy run's second-to-last step only).
Writes ``mechanisms.json`` / ``.md`` and one PNG per part (``mechanisms_m1.png``,
``_m2.png``, ``_m3.png``, ``_m4.png``) to ``--results`` and prints each part's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import nemo_gdro / benchmarks from this checkout
    sys.path.insert(0, str(ROOT))

DEFAULT_WORK = ROOT / "outputs" / "mechanisms"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
PARTS = ("m1", "m2", "m3", "m4")
#: The checkpoint M1 and M2 study by default: a quarter into the testbed's 80 steps.
DEFAULT_MID_STEP = 20


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mechanisms.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="m1,m2,m3,m4", help="comma-separated parts: m1, m2, m3, m4 (default: all)")
    p.add_argument("--run", default=None, help="run directory with checkpoints (default: prepare the GRPO subject)")
    p.add_argument("--step", default=None,
                   help="comma-separated checkpoint steps for M1/M2 (default: 0 and 20, or a quarter of the run)")
    p.add_argument("--quick", action="store_true", help="a toy version of every part (~2 minutes)")
    p.add_argument("--work-dir", default=None, help=f"runs and caches (default: {DEFAULT_WORK}; --quick: a temp dir)")
    p.add_argument("--results", default=None, help=f"report directory (default: {DEFAULT_RESULTS}; --quick: work/results)")
    p.add_argument("--replicates", type=int, default=None, help="replicate steps of M1 / M2 (default 1000; quick 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cached rollouts and the replicates")
    p.add_argument("--train-k", type=int, default=None, help="cached rollouts per pool prompt (default 64; quick 16)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default 256; quick 16)")
    p.add_argument("--eval-k", type=int, default=None, help="rollouts per held-out prompt (default 16; quick 8)")
    p.add_argument("--sketch-dim", type=int, default=None, help="count-sketch dimension (default 16384; quick 2048)")
    return p.parse_args(argv)


def _steps(spec: str | None, run_dir: Path, quick: bool) -> list[int]:
    from benchmarks.mech_policy import available_steps

    have = available_steps(run_dir)
    if not have:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint under checkpoints/")
    if spec:
        return [int(s) for s in spec.split(",") if s.strip()]
    last = have[-1]
    if quick:  # the toy run: one checkpoint after a few updates
        return [min(have, key=lambda s: abs(s - max(1, last - 1)))]
    target = DEFAULT_MID_STEP if DEFAULT_MID_STEP in have else max(1, round(last / 4))
    mid = min(have, key=lambda s: abs(s - target))
    return sorted({have[0], mid})


def _settings(args: argparse.Namespace) -> Any:
    from benchmarks.mech_policy import CacheSettings

    q = args.quick
    return CacheSettings(
        train_k=args.train_k or (16 if q else 64),
        eval_prompts=args.eval_prompts or (16 if q else 256),
        eval_k=args.eval_k or (8 if q else 16),
        sketch_dim=args.sketch_dim or (2048 if q else 16384),
        seed=args.seed,
    )


def _load_avg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_part_m12(part: str, run_dir: Path, steps: list[int], work: Path, results: Path, args: argparse.Namespace,
                 caches: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """M1 or M2 at each step: the cache (built once per step and shared), the replicates, table, plot."""
    from benchmarks import mech_common as mc
    from benchmarks.mech_policy import build_cache, checkpoint_dir

    module = importlib.import_module(f"benchmarks.mech_{part}")
    replicates = args.replicates or (100 if args.quick else 1000)
    settings = _settings(args)
    out: dict[str, Any] = {"steps": {}, "settings": {"replicates": replicates, "cache": dataclasses.asdict(settings)}}
    md = []
    for step in steps:
        if step not in caches:
            caches[step] = build_cache(checkpoint_dir(run_dir, step), work, settings)
        cache = caches[step]
        label = f"step {step}"
        if part == "m2" and not cache["has_adam"]:
            note = f"{label}: no Adam state in this checkpoint (before the first optimizer step): M2 skipped"
            print(f"[mech] {note}", flush=True)
            out["steps"][label] = {"skipped": note}
            md.append(f"### {part.upper()} at {label}\n\n{note}.\n")
            continue
        pool = mc.load_pool(cache)
        res = module.run(pool, replicates, args.seed, log=lambda s: print(s, flush=True))
        res["cache"] = {k: cache[k] for k in ("checkpoint", "step", "num_params", "logp_check", "wall_s",
                                              "gen_s", "grad_ms_per_rollout", "settings")}
        res["cache"]["pool_prompts"] = pool.num_prompts
        res["cache"]["pool_mean_reward"] = float(pool.rewards.mean())
        res["cache"]["pool_zero_variance_prompts"] = float(
            (pool.rewards.max(1).values == pool.rewards.min(1).values).double().mean())
        res["cache"]["heldout_mean_reward"] = float(cache["eval_rewards"].double().mean())
        out["steps"][label] = res
        table = module.markdown(res, f"{part.upper()} at {label} ({pool.num_prompts} pool prompts x {pool.k} rollouts, "
                                f"mean reward {res['cache']['pool_mean_reward']:.3f}, zero-variance prompts "
                                f"{res['cache']['pool_zero_variance_prompts']:.2f})")
        print(table, flush=True)
        md.append(table)
    done = {k: v for k, v in out["steps"].items() if "skipped" not in v}
    plots = [str(module.plot(done, results / f"mechanisms_{part}.png"))] if done else []
    return {"markdown": "\n".join(md), "json": out, "plots": plots}


def run_part_module(part: str, run_dir: Path, results: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """M3 / M4 from ``benchmarks/mech_<part>.py`` (``run_<part>(run_dir, out_dir, quick, seed)``; another module,
    imported lazily: the part is skipped with a message where it is absent)."""
    name = f"benchmarks.mech_{part}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        print(f"[mech] {part.upper()}: benchmarks/mech_{part}.py is not in this checkout: part skipped", flush=True)
        return None
    res = getattr(module, f"run_{part}")(run_dir, results, args.quick, args.seed)
    plots = [str(p) for p in res.get("plots", [])]
    target = results / f"mechanisms_{part}.png"
    if plots and Path(plots[0]).resolve() != target.resolve():
        shutil.copyfile(plots[0], target)
        plots = [str(target), *plots[1:]]
    print(res.get("markdown", ""), flush=True)
    return {"markdown": res.get("markdown", ""), "json": res.get("json", {}), "plots": plots}


def write_report(results: Path, report: dict[str, Any]) -> None:
    """``mechanisms.json`` (every part run so far: a later run of one part keeps the others) and ``.md``."""
    path = results / "mechanisms.json"
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    merged = {"meta": report["meta"], "parts": {**old.get("parts", {}), **report["parts"]}}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True, default=_json_default, allow_nan=True) + "\n")
    lines = ["# Mechanism benchmark", "",
             "What each method does to the gradient at a frozen policy (``python benchmarks/mechanisms.py``; "
             "see its docstring and ``benchmarks/mech_m1.py`` / ``mech_m2.py`` for the definitions).", "",
             f"Subject: `{merged['meta'].get('run_dir')}`; wall time of the last invocation "
             f"{merged['meta'].get('wall_s', math.nan):.0f} s on {merged['meta'].get('cpu_count')} CPUs.", ""]
    for part in PARTS:
        if part in merged["parts"]:
            entry = merged["parts"][part]
            where = entry.get("meta", {})
            lines += [f"## {part.upper()}", "",
                      f"Run `{where.get('run_dir', '?')}`, {entry.get('wall_s', math.nan):.0f} s "
                      f"({where.get('threads', '?')} thread(s)).", "", entry["markdown"], ""]
    (results / "mechanisms.md").write_text("\n".join(lines), encoding="utf-8")


def _json_default(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    parts = [p.strip().lower() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"mechanisms.py: unknown parts {unknown} (known: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work_dir) if args.work_dir else (
        Path(tempfile.mkdtemp(prefix="mechanisms-quick-")) if args.quick else DEFAULT_WORK)
    results = Path(args.results) if args.results else (work / "results" if args.quick else DEFAULT_RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from nemo_gdro.cli import _quiet_third_party_warnings

    _quiet_third_party_warnings()
    t0, load_start = time.perf_counter(), _load_avg()
    if args.run:
        run_dir = Path(args.run)
    else:
        from benchmarks.mech_run import prepare_default_run

        run_dir = prepare_default_run(work, args.quick, seed=0)
    steps = _steps(args.step, run_dir, args.quick)
    print(f"[mech] subject {run_dir}; checkpoints {steps}; parts {parts}", flush=True)
    report: dict[str, Any] = {"parts": {}}
    caches: dict[int, dict[str, Any]] = {}
    for part in parts:
        t = time.perf_counter()
        if part in ("m3", "m4"):
            res = run_part_module(part, run_dir, results, args)
            if res is None:
                continue
        else:
            res = run_part_m12(part, run_dir, steps, work, results, args, caches)
        res["wall_s"] = time.perf_counter() - t
        # Each part keeps what it was run on: a later invocation of another part leaves it in the report.
        res["meta"] = {"run_dir": str(run_dir), "steps": steps, "quick": bool(args.quick), "seed": args.seed,
                       "threads": torch.get_num_threads(), "load_avg_at_end": _load_avg()}
        report["parts"][part] = res
        print(f"[mech] {part.upper()} done in {res['wall_s']:.0f} s", flush=True)
    report["meta"] = {
        "run_dir": str(run_dir), "steps": steps, "parts_run": parts, "quick": bool(args.quick), "seed": args.seed,
        "wall_s": time.perf_counter() - t0, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_avg_at_start": load_start, "load_avg_at_end": _load_avg(),
    }
    write_report(results, report)
    print(f"[mech] report: {results / 'mechanisms.json'} (+ .md, mechanisms_<part>.png)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
