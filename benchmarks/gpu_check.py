"""The GPU check (``scripts/gpu_check.sh``): every part in its own process, one JSON of figures.

Parts, in order (the longest last, so that a slow one cannot starve the others):

``env``
    torch / CUDA / GPU / NCCL / megatron-core / transformers / TE versions, and
    one all-reduce of a device tensor through :mod:`nemo_gdro.parallel.comm`
    under the backend ``init_distributed`` picks (NCCL on a GPU).
``logprob_entropy``
    the vocabulary-parallel log-prob / entropy / Ebar pass against a naive
    ``log_softmax`` + gather at 8192 x 151,936 bf16: forward time and peak
    extra memory, their ratios (targets: time <= 1.2x, extra peak < 0.25x the
    logits), and forward + backward of each.
``actor_qwen3_0p6b``, ``actor_qwen3_1p7b``
    a random-init Qwen3-0.6B- / 1.7B-shaped actor step in bf16 under NCCL
    (:mod:`gpu_actor_step`): step time, tokens/s, peak memory; the 0.6B one
    also times the token-statistics variants and the optimizer offload.
``tiny_train``
    the default tiny training run on CUDA, shortened (SFT + a few RL steps
    with an evaluation, a checkpoint): wall time, steps/s, held-out pass@1.

Each part runs in a subprocess with its own timeout (and a global deadline
that shrinks the later ones); a part that fails, hangs or crashes records
``status`` ``error`` / ``timeout`` with the tail of its log, and the others
still run. The JSON is rewritten atomically after every part, so a killed
check still leaves the figures gathered so far.

``--cpu-dry-run`` runs every part at toy sizes on CPU (gloo): CI uses it to
check that the script itself works.

Usage::

    python benchmarks/gpu_check.py [--out gpu_check.json] [--cpu-dry-run] [--parts env,tiny_train]
        [--deadline-s 470]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: part -> (timeout on a GPU, timeout in the CPU dry run), seconds.
TIMEOUTS: dict[str, tuple[int, int]] = {
    "env": (60, 60),
    "logprob_entropy": (60, 60),
    "actor_qwen3_0p6b": (100, 90),
    "actor_qwen3_1p7b": (90, 90),
    "tiny_train": (190, 150),
}
PARTS = tuple(TIMEOUTS)


# ---------------------------------------------------------------------------- parts (run in the child)
def part_env(dry: bool) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            sm=props.major * 10 + props.minor,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    for module in ("megatron.core", "transformers", "transformer_engine", "apex", "vllm", "omegaconf", "hydra"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            out[f"version/{module}"] = getattr(mod, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - missing or broken: say which
            out[f"version/{module}"] = f"unavailable ({type(exc).__name__})"
    from nemo_gdro.models.megatron_options import host_info
    from nemo_gdro.parallel import comm
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=0)
    try:
        x = torch.arange(4, dtype=torch.float32, device=info.device)
        y = comm.all_reduce(x.clone())
        out.update(backend=info.backend, device=str(info.device), all_reduce_ok=bool(torch.equal(y.cpu(), x.cpu())))
        host = host_info(check_megatron=True)
        out.update(te_installed=host.te_installed, te_usable_by_megatron=host.te_usable)
    finally:
        destroy_distributed()
    return out


def part_logprob_entropy(dry: bool) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    import logprob_entropy as bench  # benchmarks/logprob_entropy.py: the same measurement code

    from nemo_gdro.parallel.vocab_parallel import vocab_parallel_token_stats

    device = torch.device("cpu" if dry else "cuda")
    n, v, dtype, repeats = (512, 4096, torch.float32, 2) if dry else (8192, 151_936, torch.bfloat16, 5)
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2.0).to(device=device, dtype=dtype)
    tokens = torch.randint(0, v, (n,), generator=g).to(device)
    logits_bytes = logits.numel() * logits.element_size()

    def naive_logp() -> Any:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def ours() -> Any:
        return vocab_parallel_token_stats(logits, tokens, vocab_start=0)

    out: dict[str, Any] = {"tokens": n, "vocab": v, "dtype": str(dtype).replace("torch.", ""),
                           "logits_gib": round(logits_bytes / 2**30, 3), "repeats": repeats}
    with torch.no_grad():
        for name, fn in (("naive_logp", naive_logp), ("ours", ours)):
            peak, _ = bench.peak_extra_bytes(fn, device)
            out[f"{name}_s"] = round(bench.median_time(fn, device, repeats), 5)
            out[f"{name}_peak_extra_over_logits"] = round(peak / logits_bytes, 4)
    out["time_ratio"] = round(out["ours_s"] / out["naive_logp_s"], 3)
    out["targets_met"] = out["time_ratio"] <= 1.2 and out["ours_peak_extra_over_logits"] < 0.25

    # Forward + backward (the training path): d(sum logp + sum entropy) / d logits.
    leaf = logits.detach().requires_grad_(True)

    def naive_backward() -> Any:
        logp_all = torch.log_softmax(leaf.float(), dim=-1)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        (logp.sum() + entropy.sum()).backward()
        leaf.grad = None

    def ours_backward() -> Any:
        logp, entropy, _ = vocab_parallel_token_stats(leaf, tokens, vocab_start=0)
        (logp.sum() + entropy.sum()).backward()
        leaf.grad = None

    for name, fn in (("naive_fwd_bwd", naive_backward), ("ours_fwd_bwd", ours_backward)):
        peak, _ = bench.peak_extra_bytes(fn, device)
        out[f"{name}_s"] = round(bench.median_time(fn, device, repeats), 5)
        out[f"{name}_peak_extra_over_logits"] = round(peak / logits_bytes, 4)
    out["fwd_bwd_time_ratio"] = round(out["ours_fwd_bwd_s"] / out["naive_fwd_bwd_s"], 3)
    return out


def _actor(preset: str, dry: bool, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import gpu_actor_step

    if dry:
        base = dict(preset="tiny", rows=4, seq=32, micro_batch=2, steps=2, dtype="float32")
    else:
        base = dict(preset=preset, rows=16, seq=1024, micro_batch=4, steps=4, dtype="bfloat16")
    out: dict[str, Any] = {}
    for name, extra in variants.items():
        try:
            out[name] = gpu_actor_step.run(**{**base, **extra})
        except Exception as exc:  # noqa: BLE001 - one variant failing keeps the others
            out[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    out["failed_variants"] = [name for name, rec in out.items() if rec.get("status") == "error"]
    return out


def part_actor_qwen3_0p6b(dry: bool) -> dict[str, Any]:
    return _actor(
        "qwen3_0p6b",
        dry,
        {
            "default": {"offload_check": True},
            "vocab_parallel_stats": {"stats": "vocab_parallel"},
            "distributed_optimizer_full_recompute": {"distributed_optimizer": True, "recompute": "full"},
        },
    )


def part_actor_qwen3_1p7b(dry: bool) -> dict[str, Any]:
    return _actor("qwen3_1p7b", dry, {"default": {}})


def part_tiny_train(dry: bool) -> dict[str, Any]:
    from nemo_gdro.cli import main as cli_main
    from nemo_gdro.trainer.metrics import EVAL_FILE, METRICS_FILE, read_jsonl

    out_dir = Path(tempfile.mkdtemp(prefix="nemo_gdro_gpu_check_"))
    if dry:
        overrides = ["sft.steps=2", "trainer.max_steps=2", "trainer.prompts_per_step=4", "rollout.n=2",
                     "data.num_eval=8", "eval.k=1"]
    else:
        overrides = ["sft.steps=200", "trainer.max_steps=6"]
    overrides += [
        "trainer.eval_every=3", "trainer.checkpoint_every=3", "run.resume=null", "logging.progress=false",
        "logging.tensorboard=false", "++run.name=gpu_check_tiny", f"run.output_dir={out_dir}",
    ]
    try:
        t0 = time.perf_counter()
        rc = cli_main(["train", *overrides])
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"nemo-gdro train exited {rc}")
        # RL steps only (the file also holds the SFT phase's rows).
        metrics = [m for m in read_jsonl(out_dir / METRICS_FILE) if m.get("time/step_s") is not None]
        evals = read_jsonl(out_dir / EVAL_FILE)
        step_times = [m["time/step_s"] for m in metrics]
        last_eval = evals[-1] if evals else {}
        return {
            "overrides": overrides,
            "wall_s": round(wall, 2),
            "rl_steps": len(metrics),
            "rl_step_s_mean": round(sum(step_times) / len(step_times), 4) if step_times else None,
            "rl_steps_per_s": round(len(step_times) / sum(step_times), 4) if step_times else None,
            "generate_s_mean": _mean(metrics, "time/generate_s"),
            "train_s_mean": _mean(metrics, "time/train_s"),
            "reward_mean_last": metrics[-1].get("train/reward_mean") if metrics else None,
            "eval_last": {k: v for k, v in last_eval.items() if "pass@1" in k or k in ("step", "eval/mean@k")},
            "checkpoints": sorted(p.name for p in (out_dir / "checkpoints").glob("step_*")),
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(values) / len(values), 4) if values else None


PART_FUNCTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "env": part_env,
    "logprob_entropy": part_logprob_entropy,
    "actor_qwen3_0p6b": part_actor_qwen3_0p6b,
    "actor_qwen3_1p7b": part_actor_qwen3_1p7b,
    "tiny_train": part_tiny_train,
}


def _child(part: str, dry: bool, result_path: str) -> int:
    """Run one part in this process; its figures (or its error) go to ``result_path`` as JSON."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        figures = PART_FUNCTIONS[part](dry)
        result = {"status": "partial" if figures.get("failed_variants") else "ok", **figures}
    except BaseException as exc:  # noqa: BLE001 - everything is reported, nothing is lost
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    Path(result_path).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["status"] == "ok" else 1


# ---------------------------------------------------------------------------- the parent
def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_part(part: str, dry: bool, timeout: float, log_dir: Path) -> dict[str, Any]:
    """``part`` in a fresh interpreter (own process group, killed at ``timeout``); its record."""
    log_path = log_dir / f"{part}.log"
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--child-out", str(result_path)]
        if dry:
            cmd.append("--cpu-dry-run")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        if dry:
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc, status = None, "timeout"
        wall = round(time.perf_counter() - t0, 2)
        if status == "timeout":
            record: dict[str, Any] = {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
        elif result_path.is_file():
            record = json.loads(result_path.read_text())
        else:
            record = {"status": "error", "error": f"the part's process died (exit code {rc}) without a result"}
    record["wall_s"] = wall
    if record["status"] != "ok":
        record["log_tail"] = _tail(log_path)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every part at toy sizes on CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="global time budget (default: 470 s on a GPU, 420 s dry); later parts get what is left")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    if args.child:
        return _child(args.child, dry, args.child_out)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "gpu_check.json")).resolve()
    log_dir = out.parent / "gpu_check_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + (args.deadline_s or (420.0 if dry else 470.0))
    report: dict[str, Any] = {
        "mode": "cpu-dry-run" if dry else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "parts": {},
    }
    _write_atomic(out, report)
    for part in parts:
        left = deadline - time.perf_counter()
        timeout = min(TIMEOUTS[part][1 if dry else 0], left)
        if timeout < 5:
            report["parts"][part] = {"status": "skipped", "error": "global deadline reached"}
        else:
            print(f"[gpu_check] {part} (timeout {timeout:.0f} s) ...", flush=True)
            report["parts"][part] = run_part(part, dry, timeout, log_dir)
            rec = report["parts"][part]
            print(f"[gpu_check] {part}: {rec['status']} in {rec['wall_s']} s"
                  + (f" -- {rec.get('error')}" if rec["status"] != "ok" else ""), flush=True)
        _write_atomic(out, report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["all_ok"] = all(r["status"] == "ok" for r in report["parts"].values())
    _write_atomic(out, report)
    print(f"[gpu_check] wrote {out} (all_ok={report['all_ok']})", flush=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
