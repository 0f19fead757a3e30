"""Peak memory and time of one forward + backward of the loss pass on CPU: reference vs chunked vs fused.

For each (hidden size, token count) at the real Qwen3 vocabulary (151,936), one
fresh subprocess per method builds fp32 final hidden states ``[tokens, h]`` and
an output weight ``[V, h]`` (both with gradients), then runs, once,
``(logp, entropy) -> sum(logp) + 0.01 sum(entropy) -> backward``:

- ``reference``: ``logits = hidden @ W.T`` then the full-vocabulary
  :func:`~nemo_gdro.algorithms.token_stats.full_vocab_token_stats` (the actor's
  TP = 1 path before issue 24);
- ``chunked``: the same logits, then the chunked
  :func:`~nemo_gdro.parallel.vocab_parallel.vocab_parallel_token_stats`
  (``megatron.fused_linear_token_stats=false``);
- ``fused``: :func:`~nemo_gdro.parallel.fused_linear_stats.fused_linear_token_stats`
  from the hidden states and the weight, chunk by chunk (the default).

Memory: the resident-set high-water mark of the call minus the resident set
just before it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
where the kernel refuses the reset, ``ru_maxrss``, which may then also include
the import's peak), in MiB: the extra memory the loss pass needs beyond its
inputs (the weight gradient, ``V * h * 4`` bytes, is part of it for every
method). ``logits MiB`` is the size of one fp32 ``[tokens, V]`` tensor for
scale. A configuration whose estimate exceeds the free memory is skipped.

Timings on a shared machine are indicative only. Usage::

    python benchmarks/token_stats_memory.py                      # 512 / 2048 / 8192 tokens, h 32 / 512
    python benchmarks/token_stats_memory.py --tokens 128 512 --hidden 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("reference", "chunked", "fused")
VOCAB = 151_936
# Rough extra bytes per token x vocabulary entry of each method (fp32), to skip what cannot fit.
_EST_PER_ELEMENT = {"reference": 40, "chunked": 12, "fused": 0}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(method: str, tokens: int, hidden: int, vocab: int, threads: int) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    import torch

    from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
    from nemo_gdro.parallel.fused_linear_stats import fused_linear_token_stats
    from nemo_gdro.parallel.vocab_parallel import vocab_parallel_token_stats

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)

    def run() -> None:
        if method == "fused":
            logp, ent, _ = fused_linear_token_stats(x, w, targets, ebar=False)
        elif method == "chunked":
            logp, ent, _ = vocab_parallel_token_stats(x @ w.t(), targets, vocab_start=0, ebar=False)
        else:
            logp, ent, _ = full_vocab_token_stats(x @ w.t(), targets)
        (logp.sum() + 0.01 * ent.sum()).backward()

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert x.grad is not None and w.grad is not None
    return {"seconds": seconds, "peak_extra_mib": (peak - before) / 1024, "hwm_reset": float(reset)}


def _free_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--hidden", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        method, tokens, hidden = args.child.split(",")
        print(json.dumps(_child(method, int(tokens), int(hidden), args.vocab, args.threads)))
        return 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    print(f"vocab {args.vocab}, fp32, CPU, {args.threads} thread(s); one forward + backward per cell, "
          "fresh process each; peak = extra resident memory of the call")
    header = f"{'hidden':>6} {'tokens':>7} {'logits MiB':>10} | " + " | ".join(
        f"{m + ' MiB':>14} {m + ' s':>12}" for m in args.methods
    )
    print(header)
    print("-" * len(header))
    for hidden in args.hidden:
        for tokens in args.tokens:
            logits_mib = tokens * args.vocab * 4 / 2**20
            cells = []
            for method in args.methods:
                estimate = tokens * args.vocab * _EST_PER_ELEMENT[method] + args.vocab * hidden * 16
                if estimate > 0.8 * _free_bytes():
                    cells.append(f"{'(skipped)':>14} {'':>12}")
                    continue
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", f"{method},{tokens},{hidden}", "--vocab", str(args.vocab),
                     "--threads", str(args.threads)],
                    capture_output=True, text=True, env=env, check=False,
                )
                if proc.returncode != 0:
                    cells.append(f"{'(failed ' + str(proc.returncode) + ')':>14} {'':>12}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                cells.append(f"{r['peak_extra_mib']:>14.0f} {r['seconds']:>12.2f}")
            print(f"{hidden:>6} {tokens:>7} {logits_mib:>10.0f} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
