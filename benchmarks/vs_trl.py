"""nemo_gdro vs TRL's ``GRPOTrainer`` on the same work, side by side, on CPU.

    make setup-trl                       # TRL 1.16 in its own venv (.venv-trl), never a package dependency
    python benchmarks/vs_trl.py          # both sizes, 3 pairs, 4 steps each (first dropped)
    python benchmarks/vs_trl.py --quick  # a toy pair (tiny, 2 steps, 1 prompt x 8 rollouts x 16 tokens)
    python benchmarks/vs_trl.py --sizes tiny --pairs 1 --steps 20   # growth over 20 steps

Same work for both systems:

* the same HF checkpoint, built offline by ``python -m nemo_gdro.testing.tiny_hf`` with
  the real 151,936-token Qwen3 tokenizer: ``tiny`` (hidden 32, 2 layers, ~5M
  parameters) and ``m512`` (hidden 512, 8 layers, ~103M);
* the same DAPO-layout prompts (``tests/data/fixtures.write_dapo_math``), rendered as
  raw text with the DAPO instruction (``data.prompt_format=raw data.instruction=dapo``;
  the TRL driver builds the text with the same nemo_gdro function, so the token ids
  are identical), 4 prompts per step for tiny and 2 for m512, 8 rollouts each,
  at most 64 new tokens, temperature 1, top-p 1, no top-k; neither system forces a
  minimum length (random weights practically never sample an EOS, and the generated
  tokens are counted per step from each system's own record);
* one optimizer step per generation batch (nemo: ``trainer.minibatches_per_step=1``;
  TRL: ``num_iterations=1``, gradient accumulation = rows / 8), micro-batches of 8 rows,
  no KL reference (TRL ``beta=0``), Adam lr 1e-6, clip 0.2 / 0.28, token-mean loss,
  fp32, HF ``generate`` (``rollout.engine=hf``; TRL without vLLM);
* the same reward: nemo_gdro's ``dapo_math`` verifier (1 correct / 0 wrong), in-process
  for both (nemo: ``reward.num_workers=0``; TRL: a reward function calling it);
* one thread each (``OMP_NUM_THREADS=1``; the TRL driver also calls ``torch.set_num_threads``),
  evaluation, checkpoints and the SFT warm start off for nemo.

Each run is its own subprocess (nemo in this interpreter's venv or ``--nemo-python``,
TRL in ``.venv-trl/bin/python benchmarks/trl_driver.py``), alternated nemo / TRL in
pairs. Per step: ``step_s``; ``generate_s`` (nemo: ``time/generate_s``, the engine's
generation; TRL: the time inside ``GRPOTrainer._generate_single_turn``, its
``model.generate`` call); ``train_s`` = step - generation (the rest of the step, reward
and log-prob passes included, the same split for both); generated tokens / ``generate_s``;
the process's RSS, polled from ``/proc`` every 0.2 s and cut at each step's record.
Per run: peak RSS of the process (``os.wait4``'s ``ru_maxrss``). The first
``--drop`` steps of each run are dropped (start-up, first-call allocation).

Writes ``benchmarks/results/vs_trl.{json,md}`` (not with ``--quick``, which writes
``summary.json`` in its work directory only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the fixtures of this checkout
    sys.path.insert(0, str(REPO))

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "layers": 2, "prompts_per_step": 4},
    "m512": {"hidden": 512, "layers": 8, "prompts_per_step": 2},
}
SYSTEMS = ("nemo_gdro", "TRL")
ROLLOUTS, MAX_NEW_TOKENS, MICRO_BATCH, LR = 8, 64, 8, 1e-6
GIB = 2**30


@dataclass
class Run:
    """One subprocess run: its per-step records (all steps) and its peak RSS."""

    system: str
    size: str
    pair: int
    steps: list[dict[str, float]]
    peak_rss_gib: float
    wall_s: float
    log: str
    kept: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs


def build_checkpoint(python: str, out: Path, hidden: int, layers: int) -> Path:
    """The shared HF checkpoint (deterministic: seed 0), built by tiny_hf in the nemo venv."""
    if not (out / "config.json").is_file():
        cmd = [python, "-m", "nemo_gdro.testing.tiny_hf", str(out), "--layers", str(layers), "--hidden", str(hidden)]
        subprocess.run(cmd, check=True, cwd=REPO, env=child_env(1), stdout=subprocess.DEVNULL)
    return out


def write_prompts(path: Path, count: int) -> Path:
    """``count`` distinct DAPO-Math-17k-layout rows (English, one row per prompt), as JSON lines."""
    from tests.data.fixtures import write_dapo_math

    write_dapo_math(path, num_prompts=count, repeats=1, fmt="jsonl", cjk_prompts=0, variant=False, shuffle_seed=None)
    return path


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def nemo_command(a: argparse.Namespace, ckpt: Path, prompts: Path, out: Path, pps: int) -> list[str]:
    return [
        a.nemo_python, "-m", "nemo_gdro.cli", "train",
        "model=hf", f"model.path={ckpt}", "model.dtype=float32", "tokenizer.name=hf",
        "data=math", f"data.train_files=[{prompts}]", "data.prompt_format=raw", "data.instruction=dapo",
        "reward.verifier=dapo_math", "reward.num_workers=0", "reward.warmup=false",
        "reward.correct_reward=1.0", "reward.wrong_reward=0.0",
        "sft.steps=0", f"trainer.max_steps={a.steps}", f"trainer.prompts_per_step={pps}",
        "trainer.minibatches_per_step=1", f"trainer.micro_batch_size={MICRO_BATCH}",
        "rollout.engine=hf", f"rollout.n={ROLLOUTS}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", f"rollout.max_new_tokens={a.max_new_tokens}",
        f"optim.lr={LR}", "optim.grad_clip=1.0", "algorithm.policy_loss.kl_coef=0.0",
        "trainer.eval_every=0", "eval.at_start=false", "eval.at_end=false",
        "trainer.checkpoint_every=0", "checkpoint.at_start=false", "checkpoint.at_end=false",
        f"run.output_dir={out}", "run.resume=null", "logging.tensorboard=false", "logging.progress=false",
    ]  # fmt: skip


def trl_command(a: argparse.Namespace, ckpt: Path, prompts: Path, out: Path, pps: int) -> list[str]:
    return [
        a.trl_python, str(REPO / "benchmarks" / "trl_driver.py"),
        "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out / "steps.jsonl"),
        "--work-dir", str(out / "trl"), "--steps", str(a.steps), "--prompts-per-step", str(pps),
        "--rollouts", str(ROLLOUTS), "--max-new-tokens", str(a.max_new_tokens),
        "--micro-batch", str(MICRO_BATCH), "--lr", str(LR), "--threads", str(a.threads),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- running


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def run_child(cmd: list[str], env: dict[str, str], log: Path, step_file: Path) -> tuple[int, float, list[int], float]:
    """Run ``cmd``; returns (exit code, peak RSS bytes from wait4, per-step peak RSS bytes, wall s).

    A poller reads the child's VmRSS every 0.2 s and closes a step's window each
    time ``step_file`` gains a line (nemo's metrics.jsonl, the TRL driver's steps)."""
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
    per_step: list[int] = []
    window = [0]  # the peak since the last step record
    done = threading.Event()

    def close_steps() -> None:
        n = _count_lines(step_file)
        while len(per_step) < n:
            per_step.append(window[0])
            window[0] = 0

    def poll() -> None:
        while not done.is_set():
            window[0] = max(window[0], _rss_bytes(proc.pid))
            close_steps()
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    close_steps()  # records written after the last poll
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024.0, per_step, time.perf_counter() - t0


def read_nemo_steps(out: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = []
    for r in sorted((r for r in rows if "time/step_s" in r), key=lambda r: r["step"]):
        step_s, gen_s = r["time/step_s"], r["time/generate_s"]
        steps.append(
            {
                "step": r["step"],
                "step_s": step_s,
                "generate_s": gen_s,
                "train_s": step_s - gen_s,
                "tokens": r["train/response_tokens"],
                # nemo's own split of the rest of the step (verification, behaviour pass, training, push)
                **{k: r[k] for k in ("time/verify_s", "time/behaviour_s", "time/train_s", "time/weight_push_s") if k in r},
            }
        )
    return steps


def read_trl_steps(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]


def run_one(a: argparse.Namespace, system: str, size: str, pair: int, ckpt: Path, prompts: Path) -> Run:
    out = a.work_dir / size / f"{system}_{pair}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    pps = a.prompts_per_step or SIZES[size]["prompts_per_step"]
    if system == "nemo_gdro":
        cmd, step_file = nemo_command(a, ckpt, prompts, out / "run", pps), out / "run" / "metrics.jsonl"
    else:
        cmd, step_file = trl_command(a, ckpt, prompts, out, pps), out / "steps.jsonl"
    log = out / "log.txt"
    print(f"[vs_trl] {size} pair {pair}: {system} ...", flush=True)
    rc, peak, per_step_rss, wall = run_child(cmd, child_env(a.threads), log, step_file)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{system} ({size}, pair {pair}) exited with {rc}; log {log}:\n{tail}")
    steps = read_nemo_steps(out / "run") if system == "nemo_gdro" else read_trl_steps(out)
    for s, rss in zip(steps, per_step_rss):
        s["rss_gib"] = rss / GIB
    for s in steps:
        s["tok_s"] = s["tokens"] / s["generate_s"] if s["generate_s"] > 0 else float("nan")
    run = Run(system, size, pair, steps, peak / GIB, wall, str(log))
    run.kept = steps[a.drop :]
    if not run.kept:
        raise RuntimeError(f"{system} ({size}, pair {pair}): {len(steps)} step(s) recorded, none left after --drop {a.drop}")
    print(
        f"[vs_trl]   {system}: {len(steps)} steps, median step {med(run.kept, 'step_s'):.2f} s, "
        f"peak RSS {run.peak_rss_gib:.2f} GiB, {wall:.0f} s wall",
        flush=True,
    )
    return run


# ----------------------------------------------------------------------------- summary


def med(steps: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in steps)


def summarize(runs: list[Run], size: str) -> dict[str, Any]:
    """Per system: medians over all kept steps; per pair: nemo / TRL ratios of the run medians."""
    by = {sysname: [r for r in runs if r.size == size and r.system == sysname] for sysname in SYSTEMS}
    systems = {}
    for sysname, rs in by.items():
        kept = [s for r in rs for s in r.kept]
        systems[sysname] = {
            "step_s": med(kept, "step_s"),
            "step_s_range": [min(s["step_s"] for s in kept), max(s["step_s"] for s in kept)],
            "generate_s": med(kept, "generate_s"),
            "train_s": med(kept, "train_s"),
            "tok_s": med(kept, "tok_s"),
            "tokens_per_step": med(kept, "tokens"),
            "peak_rss_gib": statistics.median(r.peak_rss_gib for r in rs),
            "runs": len(rs),
            "steps_kept": len(kept),
        }
    ratios: dict[str, dict[str, Any]] = {}
    pairs = sorted({r.pair for r in by["nemo_gdro"]} & {r.pair for r in by["TRL"]})
    for key in ("step_s", "generate_s", "train_s", "tok_s", "peak_rss_gib"):
        per_pair = []
        for p in pairs:
            n = next(r for r in by["nemo_gdro"] if r.pair == p)
            t = next(r for r in by["TRL"] if r.pair == p)
            nv = n.peak_rss_gib if key == "peak_rss_gib" else med(n.kept, key)
            tv = t.peak_rss_gib if key == "peak_rss_gib" else med(t.kept, key)
            per_pair.append(nv / tv if tv else float("nan"))
        ratios[key] = {"median": statistics.median(per_pair), "min": min(per_pair), "max": max(per_pair), "per_pair": per_pair}
    return {"systems": systems, "ratio_nemo_over_trl": ratios}


def growth(run: Run, window: int = 5) -> dict[str, float] | None:
    """First-vs-last ``window`` kept steps: medians of generation time and per-step RSS."""
    k = run.kept
    if len(k) < 2 * window:
        return None
    first, last = k[:window], k[-window:]
    out = {"steps": len(k), "generate_s_first": med(first, "generate_s"), "generate_s_last": med(last, "generate_s")}
    if all("rss_gib" in s for s in k):
        out.update(rss_gib_first=med(first, "rss_gib"), rss_gib_last=med(last, "rss_gib"))
    return out


def table(size: str, summary: dict[str, Any]) -> str:
    cfg = SIZES[size]
    lines = [
        f"### {size} (hidden {cfg['hidden']}, {cfg['layers']} layers)",
        "",
        "| system | step s | generation s | training s | generated tok/s | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for sysname, s in summary["systems"].items():
        lines.append(
            f"| {sysname} | {s['step_s']:.2f} ({s['step_s_range'][0]:.2f}-{s['step_s_range'][1]:.2f}) | "
            f"{s['generate_s']:.2f} | {s['train_s']:.2f} | {s['tok_s']:.1f} | {s['peak_rss_gib']:.2f} |"
        )
    r = summary["ratio_nemo_over_trl"]

    def cell(key: str) -> str:
        return f"{r[key]['median']:.2f} ({r[key]['min']:.2f}-{r[key]['max']:.2f})"

    lines.append(
        f"| ratio nemo/TRL, per pair | {cell('step_s')} | {cell('generate_s')} | {cell('train_s')} | "
        f"{cell('tok_s')} | {cell('peak_rss_gib')} |"
    )
    return "\n".join(lines)


def machine_info(a: argparse.Namespace) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "platform": platform.platform(), "threads_per_process": a.threads}


def versions(python: str, names: tuple[str, ...]) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {list(names)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr.strip()[-200:]}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="nemo_gdro vs TRL GRPOTrainer, side by side on the same work (CPU).")
    p.add_argument("--sizes", default="tiny,m512", help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--pairs", type=int, default=3, help="nemo/TRL run pairs per size, alternated")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--drop", type=int, default=1, help="first steps of each run left out of the medians")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--prompts-per-step", type=int, default=None, help="override the size's (tiny 4, m512 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="toy pair: tiny, 2 steps, 1 pair, 1 prompt, 16 tokens")
    p.add_argument("--nemo-python", default=sys.executable, help="interpreter with nemo_gdro installed")
    p.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"), help="TRL's venv interpreter")
    p.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "vs_trl")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.pairs, a.steps, a.prompts_per_step, a.max_new_tokens = "tiny", 1, 2, 1, 16
    a.size_list = [s.strip() for s in a.sizes.split(",") if s.strip()]
    unknown = [s for s in a.size_list if s not in SIZES]
    if unknown or not a.size_list:
        p.error(f"--sizes: unknown {unknown or a.sizes!r}; choose from {list(SIZES)}")
    if a.pairs < 1 or a.steps < 1 or a.drop < 0 or a.steps <= a.drop:
        p.error(f"need --pairs >= 1 and --steps > --drop >= 0 (got pairs {a.pairs}, steps {a.steps}, drop {a.drop})")
    if not Path(a.trl_python).is_file():
        p.error(f"TRL's interpreter {a.trl_python} not found: run `make setup-trl` (creates .venv-trl) or pass --trl-python")
    a.work_dir = a.work_dir.resolve()
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs: list[Run] = []
    for size in a.size_list:
        cfg = SIZES[size]
        ckpt = build_checkpoint(a.nemo_python, a.work_dir / f"ckpt_{size}", cfg["hidden"], cfg["layers"])
        pps = a.prompts_per_step or cfg["prompts_per_step"]
        prompts = write_prompts(a.work_dir / f"prompts_{size}.jsonl", max(64, pps * a.steps))
        for pair in range(a.pairs):
            order = SYSTEMS if pair % 2 == 0 else SYSTEMS[::-1]  # alternate who goes first
            for system in order:
                runs.append(run_one(a, system, size, pair, ckpt, prompts))
    load_after = os.getloadavg()

    report: dict[str, Any] = {
        "started_utc": started,
        "machine": machine_info(a),
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "settings": {
            "sizes": {s: SIZES[s] for s in a.size_list},
            "prompts_per_step_override": a.prompts_per_step,
            "rollouts": ROLLOUTS, "max_new_tokens": a.max_new_tokens, "micro_batch": MICRO_BATCH, "lr": LR,
            "steps": a.steps, "dropped_steps": a.drop, "pairs": a.pairs, "threads": a.threads, "quick": a.quick,
        },  # fmt: skip
        "versions": {
            "nemo_venv": versions(a.nemo_python, ("nemo_gdro", "torch", "transformers", "megatron-core")),
            "trl_venv": versions(a.trl_python, ("trl", "torch", "transformers", "accelerate")),
        },
        "sizes": {},
        "growth": [],
        "runs": [asdict(r) for r in runs],
    }
    print()
    print(
        f"nemo_gdro vs TRL GRPOTrainer -- {report['machine']['nproc']} x {report['machine']['cpu']}, "
        f"{a.threads} thread(s) per process, load {load_before[0]:.2f} -> {load_after[0]:.2f}; "
        f"medians of steps {a.drop + 1}..{a.steps} over {a.pairs} pair(s)"
    )
    md = []
    for size in a.size_list:
        summary = summarize(runs, size)
        report["sizes"][size] = summary
        md.append(table(size, summary))
        print()
        print(md[-1])
    grow = [(r, g) for r in runs if (g := growth(r)) is not None]
    if grow:
        print("\nGrowth over the run (median of the first 5 vs the last 5 kept steps):")
        for r, g in grow:
            rss = f", RSS {g['rss_gib_first']:.2f} -> {g['rss_gib_last']:.2f} GiB" if "rss_gib_first" in g else ""
            print(f"  {r.size} {r.system} pair {r.pair}: generation {g['generate_s_first']:.2f} -> {g['generate_s_last']:.2f} s{rss}")
            report["growth"].append({"size": r.size, "system": r.system, "pair": r.pair, **g})
    (a.work_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    if not a.quick:
        a.results_dir.mkdir(parents=True, exist_ok=True)
        (a.results_dir / "vs_trl.json").write_text(json.dumps(report, indent=2) + "\n")
        head = (
            f"# nemo_gdro vs TRL GRPOTrainer\n\n{started}: {report['machine']['nproc']} x {report['machine']['cpu']}, "
            f"{a.threads} thread(s) per process, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; "
            f"steps {a.drop + 1}..{a.steps} of each run, {a.pairs} alternated pair(s); "
            f"versions {json.dumps(report['versions'])}.\n"
        )
        (a.results_dir / "vs_trl.md").write_text(head + "\n" + "\n\n".join(md) + "\n")
        print(f"\nwrote {a.results_dir / 'vs_trl.json'} and {a.results_dir / 'vs_trl.md'}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"vs_trl: {e}", file=sys.stderr)
        raise SystemExit(1)
