"""How fast ``nemo-gdro train`` answers a bad input (README, "Reliability"; issue 12 item 4).

    python benchmarks/config_errors.py [--repeat 3]

Runs the command line in a fresh interpreter for each bad value of the fault
probe (the values that used to pass validation and crash seconds later) and
prints, per case, the exit code, the wall time (best of ``--repeat``), whether
torch was imported, and the one-line message; then the median and the maximum.
The config is typed and checked before torch and Megatron are imported, so the
answer comes in about a second on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The probe's bad values (issue 12, items 2-4), each answered by one line naming its key.
CASES = [
    "optim.lr=abc",
    "sft.batch_size=0",
    "run.seed=-1",
    "trainer.keep_last_checkpoints=abc",
    "trainer.max_steps=true",
    "rollout.temperature=0",
    "eval.temperature=-1",
    "rollout.top_p=2",
    "parallel.tensor_parallel=3",
    "model.preset=nope",
    "run.resume=/nonexistent",
    "trainer.prompts_per_step=100000",
    "+rollout.temprature=0.5",
    "algorithm.loss=ppo",
]

_PROBE = (
    "import sys\n"
    "from nemo_gdro.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('torch imported:', 'torch' in sys.modules)\n"
    "sys.exit(rc)\n"
)


def run_case(override: str, out_dir: Path) -> tuple[int, float, bool, str]:
    """(exit code, wall seconds, torch imported, last stderr line) of one CLI call."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "train", override, f"run.output_dir={out_dir}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    elapsed = time.perf_counter() - start
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    return done.returncode, elapsed, "torch imported: True" in done.stdout, (lines[-1] if lines else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="calls per case; the best time is reported")
    args = parser.parse_args(argv)
    times: list[float] = []
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for override in CASES:
            results = [run_case(override, Path(tmp) / "run") for _ in range(max(1, args.repeat))]
            rc, _, torch_imported, message = results[0]
            best = min(r[1] for r in results)
            times.append(best)
            ok = rc == 2 and not torch_imported and message.startswith("nemo-gdro train: configuration error:")
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} rc={rc} {best:5.2f} s torch={'yes' if torch_imported else 'no '} "
                  f"{override}: {message[len('nemo-gdro train: configuration error: '):][:110]}")
    print(f"\n{len(CASES)} bad inputs: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
          f"(best of {args.repeat}); {len(CASES) - bad} answered as one configuration error without importing torch")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
