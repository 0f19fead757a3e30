"""Time and peak extra memory of per-token log-prob / entropy / Ebar from logits.

Compares, for tokens x vocab in {2048, 8192} x {32000, 151936} (fp32 logits):

- ``naive-full``: ``full_vocab_token_stats`` (log_softmax over the full logits,
  gather, entropy and Ebar from the materialised probabilities) -- the
  reference the actor used so far;
- ``naive-logp``: ``log_softmax`` + gather only (what a plain log-prob costs);
- ``ours``: :func:`vocab_parallel_token_stats` with one shard (TP=1), which
  returns log-prob, entropy and Ebar in one chunked pass.

All runs are forward-only (no autograd graph). Reported per method: median
wall time over ``--repeats`` runs (after one untimed run) and the peak *extra*
memory, i.e. the most memory the call held at once beyond the logits that
already existed, as a multiple of the logits tensor's bytes. Then the two
targets of issue #4: ``ours / naive-logp`` time (<= 1.2) and ``ours`` peak
extra / logits bytes (< 0.25).

How memory is measured (why it is sound):

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the
  call after ``reset_peak_memory_stats()`` -- the caching allocator's exact
  high-water mark of live tensor bytes.
- CPU: the PyTorch profiler with ``profile_memory=True``. Every allocation
  and free of PyTorch's CPU allocator is then reported with the running total
  of bytes allocated *since the profiler started* (the ``Total Allocated``
  field of the ``[memory]`` trace events), including temporaries allocated
  inside operators. Its maximum over the call is exactly the peak extra tensor
  memory; the logits (allocated before) are not counted. ``tracemalloc``
  cannot see these allocations (they bypass Python's allocator). As a
  cross-check the resident-set high-water mark is also printed (``rss``:
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus the
  RSS before the call), which includes allocator slack and is therefore a
  little larger and noisier; it is ``-`` where the kernel does not allow the
  reset.

``naive-full`` needs about 6x the logits' bytes; sizes whose estimate does
not fit into the available memory are skipped and reported as such (on the
23 GiB CPU test machine: 8192 x 151936).

Usage::

    python benchmarks/logprob_entropy.py [--device cpu|cuda] [--repeats 3] \
        [--tokens 2048 8192] [--vocab 32000 151936] [--dtype float32|bfloat16] \
        [--chunk-tokens 4096] [--workspace-mib auto] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import torch

from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
from nemo_gdro.parallel.vocab_parallel import vocab_parallel_token_stats

# naive-full holds up to 6x the logits' bytes (log_pi, pi and their products; measured).
_NAIVE_FULL_FACTOR = 6.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem_available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, int | None]:
    """``(peak extra tensor bytes, peak extra RSS bytes or None)`` of one call of ``fn``."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak, None

    from torch.profiler import ProfilerActivity, profile

    rss_ok = _reset_rss_peak()
    rss_before = _rss_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    rss_peak = _rss_peak_bytes() - rss_before if rss_ok else None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    return (max(totals) if totals else 0), rss_peak


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    parser.add_argument(
        "--workspace-mib", type=float, default=None, help="each of ours' two tile workspaces (default: 4 CPU, 64 GPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    workspace_bytes = None if args.workspace_mib is None else int(args.workspace_mib * 2**20)
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} repeats={args.repeats} "
        f"chunk_tokens={args.chunk_tokens} workspace_mib={args.workspace_mib or 'auto'}"
    )
    header = f"{'tokens':>6} {'vocab':>7} {'logits':>9} | {'method':<10} {'time s':>8} "
    header += f"{'peak/logits':>11} {'rss/logits':>10}"
    print(header)
    print("-" * len(header))
    summary = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for n in args.tokens:
        for v in args.vocab:
            logits_bytes = n * v * torch.empty((), dtype=dtype).element_size()
            if logits_bytes * 2 > _mem_available_bytes(device):
                print(f"{n:>6} {v:>7} {logits_bytes / 2**30:>7.2f}G | skipped: logits do not fit twice")
                continue
            logits = (torch.randn(n, v, generator=g) * 2.0).to(device=device, dtype=dtype)
            tokens = torch.randint(0, v, (n,), generator=g).to(device)

            def naive_full() -> object:
                return full_vocab_token_stats(logits, tokens)

            def naive_logp() -> object:
                x = logits if dtype == torch.float32 else logits.float()
                return torch.log_softmax(x, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

            def ours() -> object:
                return vocab_parallel_token_stats(
                    logits, tokens, vocab_start=0, chunk_tokens=args.chunk_tokens, workspace_bytes=workspace_bytes
                )

            methods = {"naive-full": naive_full, "naive-logp": naive_logp, "ours": ours}
            row: dict[str, tuple[float, float]] = {}
            for name, fn in methods.items():
                label = f"{n:>6} {v:>7} {logits_bytes / 2**30:>7.2f}G | {name:<10}"
                need = (_NAIVE_FULL_FACTOR if name == "naive-full" else 1.5) * logits_bytes
                if need > _mem_available_bytes(device):
                    print(f"{label} skipped (needs ~{need / 2**30:.1f} GiB)")
                    continue
                with torch.no_grad():
                    peak, rss = peak_extra_bytes(fn, device)  # also the untimed warm-up run
                    t = median_time(fn, device, args.repeats)
                rss_s = f"{rss / logits_bytes:>10.3f}" if rss is not None else f"{'-':>10}"
                print(f"{label} {t:>8.3f} {peak / logits_bytes:>11.3f} {rss_s}", flush=True)
                row[name] = (t, peak / logits_bytes)
            if "ours" in row and "naive-logp" in row:
                summary.append((n, v, row["ours"][0] / row["naive-logp"][0], row["ours"][1]))
            del logits, tokens
            gc.collect()
    print()
    print("targets: ours/naive-logp time <= 1.2, ours peak extra / logits bytes < 0.25")
    for n, v, tr, mr in summary:
        ok = "ok" if tr <= 1.2 and mr < 0.25 else "MISSED"
        print(f"  tokens={n:>5} vocab={v:>6}: time ratio {tr:.2f}, memory ratio {mr:.3f}  {ok}")


if __name__ == "__main__":
    main()
