"""Randomised kill / corrupt campaign against real training runs (README, "Reliability").

    python benchmarks/faults.py --trials 12 --seed 0 [--out /tmp/faults]

A warm start (SFT, so that the RL steps have rewards and gradients to
learn from) is trained once; its step-0 checkpoint seeds an uninterrupted
reference run and ``--trials`` trials. A trial runs the same job and, until
it completes, repeatedly: SIGKILLs it (inside a checkpoint save, or after a
random delay), sometimes damages the newest checkpoint (flipped byte,
truncated file, deleted manifest), and starts it again with
``run.resume=auto``. It counts as

- resumed: every restart continued the run to the end;
- identical: final weights and every logged value (timings aside) equal the
  reference run's;
- lost: a metrics / eval step missing or repeated, or no final checkpoint.

Prints one line per trial and the totals ``trials / resumed / identical /
lost`` (also as JSON with ``--json``). Runs come from a pre-warmed forkserver
(:mod:`nemo_gdro.testing.faults`); a trial takes ~10-40 s on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_gdro.testing.faults import (  # noqa: E402
    JOB_ARGS,
    Launcher,
    compare_runs,
    corrupt_newest,
    prepare_reference,
    seed_run,
)

STEPS = 4


def trial(
    launcher: Launcher, out: Path, warm: Path, reference: Path, rng: random.Random, run_s: float, max_restarts: int = 8
) -> dict:
    run = out / "run"
    seed_run(warm, run)
    args = [*JOB_ARGS, f"trainer.max_steps={STEPS}", f"run.output_dir={run}", "run.resume=auto"]
    faults: list[str] = []
    kills = rng.randint(1, 3)
    done = False
    for attempt in range(max_restarts):
        log = out / f"attempt{attempt}.log"
        if attempt < kills:
            if rng.random() < 0.5:
                outcome = launcher.kill_during_save(args, log, run / "checkpoints", skip_saves=rng.randint(0, 3))
                faults.append("kill-in-save" if outcome.killed else "kill-in-save(missed)")
            else:
                outcome = launcher.kill_after(args, log, delay=rng.uniform(0.05, 0.7) * run_s)
                faults.append("kill" if outcome.killed else "kill(missed)")
            if outcome.exitcode == 0:
                done = True
                break
            if rng.random() < 0.3:
                faults.append(corrupt_newest(run / "checkpoints", rng))
            continue
        outcome = launcher.run(args, log)
        if outcome.exitcode != 0:
            faults.append(f"resume failed rc={outcome.exitcode}: {outcome.log.strip().splitlines()[-1:]}")
            break
        done = True
        break
    verdict = compare_runs(reference, run, STEPS) if done else {"lost": ["did not finish"], "identical": False,
                                                                 "differences": []}
    return {"resumed": done, "faults": faults, **verdict}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = args.out or Path(tempfile.mkdtemp(prefix="nemo_gdro_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    launcher = Launcher()
    start = time.monotonic()
    try:
        try:
            warm, reference, run_s = prepare_reference(launcher, root, STEPS)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        grads = [r.get("actor/grad_norm") or 0.0 for r in map(json.loads, (reference / "metrics.jsonl").open())]
        print(f"reference: {STEPS} RL steps in {run_s:.1f} s, grad norms {[round(g, 4) for g in grads[1:]]}")
        totals = {"trials": 0, "resumed": 0, "identical": 0, "lost": 0, "kills_in_save": 0, "kills": 0, "corruptions": 0}
        for i in range(args.trials):
            out = root / f"trial{i:03d}"
            t0 = time.monotonic()
            result = trial(launcher, out, warm, reference, rng, run_s)
            totals["trials"] += 1
            totals["resumed"] += int(result["resumed"])
            totals["identical"] += int(result["identical"])
            totals["lost"] += int(bool(result["lost"]))
            totals["kills_in_save"] += sum(f == "kill-in-save" for f in result["faults"])
            totals["kills"] += sum(f in ("kill-in-save", "kill") for f in result["faults"])
            totals["corruptions"] += sum(f.startswith(("flipped", "truncated", "deleted")) for f in result["faults"])
            status = "identical" if result["identical"] else ("LOST " + "; ".join(result["lost"]) if result["lost"]
                                                              else "differs: " + ", ".join(result["differences"]))
            print(f"trial {i:3d} ({time.monotonic() - t0:5.1f} s): {', '.join(result['faults'])} -> {status}", flush=True)
            if result["identical"] and args.out is None:
                shutil.rmtree(out, ignore_errors=True)
        elapsed = time.monotonic() - start
        print(
            f"trials {totals['trials']} / resumed {totals['resumed']} / identical {totals['identical']} / "
            f"lost {totals['lost']}  ({totals['kills']} kills, {totals['kills_in_save']} inside a checkpoint save, "
            f"{totals['corruptions']} corrupted checkpoints; {elapsed:.0f} s)"
        )
        if args.json:
            print(json.dumps({**totals, "seconds": round(elapsed, 1)}))
        return 0 if totals["lost"] == 0 and totals["identical"] == totals["trials"] else 1
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
