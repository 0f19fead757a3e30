r"""Throughput and pathological-input costs of the math reward (``dapo_math``).

Workload: ``--rows`` DAPO-style responses (a few hundred characters of
reasoning, then the final answer) against integer ground truths, of which a
fraction ``--sympy-frac`` gives the answer as LaTeX that the string pre-check
cannot decide (``Answer: \frac{84}{2}``, ``\boxed{\sqrt{1764}}``...), so
math-verify runs in a worker; the rest are plain integers decided in the
trainer process. Every row is distinct (no de-duplication help).

Prints, for inline verification (``num_workers=0``) and pools of 1 and 2
workers: start-up time (server import + worker forks), then the median over
``--repeats`` batches of wall time per batch and rows/s and math-verify
items/s; then the cost of each pathological input (one row, 1 worker,
``timeout_s``) with the soft deadline on and off (off: only the hard kill
bounds it), and the cost of the normal item that follows (worker
replacement included).

Usage: python benchmarks/reward.py [--rows 256] [--sympy-frac 0.25] [--repeats 3] [--timeout 2.0]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402,F401 - the trainer has it loaded; keep its import out of the timings

from nemo_gdro.rewards.registry import RewardConfig, build_reward  # noqa: E402

NESTED_POW = "2^{2^{2^{2^{2^{100}}}}}"
PATHOLOGICAL = {
    "nested powers (Answer:)": (f"Answer: ${NESTED_POW}$", "5", "dapo"),
    "nested powers (whole response)": (f"\\boxed{{{NESTED_POW}}}", "5", "math_verify_full"),
    "5000-digit number": ("Answer: " + "7" * 5000, "5", "dapo"),
    "deeply nested braces": ("\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}", "1", "math_verify_full"),
    "frac chain x200": ("\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}", "2", "math_verify_full"),
    "200 kB response": ("So " + "x + 1 = 2, thus $\\frac{1}{2}$ " * 6000, "\\frac{1}{3}", "math_verify_full"),
}
NORMAL = ("Answer: \\frac{6}{4}", "1.5")


def workload(rows: int, sympy_frac: float, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, golds = [], []
    for i in range(rows):
        gold = rng.randint(10, 10_000) + i * 10_007  # distinct ground truths
        right = rng.random() < 0.5
        shown = gold if right else gold + rng.randint(1, 9)
        reasoning = " ".join(f"step {k}: x_{k} = {rng.randint(0, 99)}." for k in range(20))
        if rng.random() < sympy_frac:
            form = rng.randrange(3)
            if form == 0:
                final = f"Answer: $\\frac{{{2 * shown}}}{{2}}$"
            elif form == 1:
                final = f"Thus the answer is $\\boxed{{\\sqrt{{{shown * shown}}}}}$."
            else:
                final = f"Answer: ${shown} \\cdot 1$"
        else:
            final = f"Answer: {shown}"
        texts.append(f"{reasoning}\n{final}")
        golds.append(str(gold))
    return texts, golds


def bench_throughput(args: argparse.Namespace) -> None:
    batches = [workload(args.rows, args.sympy_frac, seed=r) for r in range(args.repeats)]  # distinct batches
    print(f"throughput: {args.rows} rows, sympy fraction {args.sympy_frac}, median of {args.repeats} batches")
    print(f"{'mode':<10} {'start s':>8} {'batch s':>8} {'rows/s':>9} {'mv items/s':>11} {'mv items':>9}")
    for workers in (0, 1, 2):
        name = "inline" if workers == 0 else f"pool x{workers}"
        t0 = time.perf_counter()
        cfg = RewardConfig(verifier="dapo_math", num_workers=workers, timeout_s=args.timeout)
        with build_reward(cfg) as pool:
            pool.wait_ready()
            start = time.perf_counter() - t0
            times, n_items = [], []
            for texts, golds in batches:
                n_items.append(sum(not isinstance(pool.prepare(t, g), bool) for t, g in zip(texts, golds, strict=True)))
                t1 = time.perf_counter()
                res = pool.verify_batch(texts, golds)
                times.append(time.perf_counter() - t1)
                bad = [texts[i][-60:] for i in range(len(texts)) if int(res.status[i]) != 0]
                assert not bad, f"{name}: {len(bad)} rows timed out or failed: {bad[:3]}"
            med, items = statistics.median(times), statistics.median(n_items)
        print(f"{name:<10} {start:>8.2f} {med:>8.3f} {args.rows / med:>9.0f} {items / med:>11.1f} {items:>9.0f}")


def bench_pathological(args: argparse.Namespace) -> None:
    print(f"\npathological inputs: one row, 1 worker, timeout_s={args.timeout} (cost = wall time of verify_batch)")
    print(f"{'case':<32} {'soft':>5} {'cost s':>7} {'status':>8} {'restarts':>8} {'next normal s':>13}")
    names = {0: "ok", 1: "timeout", 2: "failure"}
    for soft in (0.8, 0.0):
        pools = {}
        try:
            for mode in ("dapo", "math_verify_full"):
                cfg = RewardConfig(
                    verifier="dapo_math",
                    num_workers=1,
                    timeout_s=args.timeout,
                    soft_timeout_fraction=soft,
                    options={"extract": mode},
                )
                pools[mode] = build_reward(cfg)
            for p in pools.values():
                p.wait_ready()
            for case, (text, gold, mode) in PATHOLOGICAL.items():
                pool = pools[mode]
                t0 = time.perf_counter()
                res = pool.verify_batch([text], [gold])
                cost = time.perf_counter() - t0
                t1 = time.perf_counter()
                nxt = pool.verify_batch([NORMAL[0]], [NORMAL[1]])
                after = time.perf_counter() - t1
                assert nxt.correct.tolist() == [True]
                st = names[int(res.status[0])]
                print(f"{case:<32} {soft:>5.1f} {cost:>7.3f} {st:>8} {res.worker_restarts:>8d} {after:>13.3f}")
        finally:
            for p in pools.values():
                p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--sympy-frac", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    bench_throughput(args)
    bench_pathological(args)


if __name__ == "__main__":
    main()
