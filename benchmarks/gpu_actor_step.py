"""One training step of a random-init Megatron actor: step time, tokens/s, peak memory (GPU or CPU).

Builds :class:`~nemo_gdro.trainer.actor.MegatronActor` for a preset
(``qwen3_0p6b``, ``qwen3_1p7b``, ... or ``tiny``) in one process (NCCL on a
GPU, gloo on CPU), then times ``--steps`` optimizer steps on ``--rows`` rows
of ``--seq`` tokens (micro-batches of ``--micro-batch`` rows) with a
GRPO-style loss (policy gradient on log-probs over a response mask plus an
entropy bonus, normalised by the global token count). The first step is a
warm-up (Adam state is allocated there) and is reported separately.

Reported (JSON with ``--json``, and printed):

- ``build_s``: actor construction (weights initialised on the device);
- ``warmup_step_s``, ``step_s`` (median of the timed steps), ``tokens_per_s``
  (``rows * seq / step_s``, every position counts) and ``model_tflops``
  (``6 * params * tokens / step_s``, attention FLOPs not counted);
- ``token_stats_s``: the forward-only log-prob pass (behaviour log-probs);
- ``peak_memory_gib`` (``torch.cuda.max_memory_allocated`` over the run) and
  ``memory_after_step_gib`` (weights + grads + optimizer state, steady state);
- with ``--offload-check``: the optimizer offload around generation
  (``offload_optimizer_state``): bytes moved, memory freed, seconds each way,
  and whether the optimizer state came back bit-identical (GPU only).

Usage::

    python benchmarks/gpu_actor_step.py --preset qwen3_0p6b --rows 16 --seq 1024 --micro-batch 4 \\
        [--steps 4] [--dtype bfloat16] [--stats fused|vocab_parallel|full] [--distributed-optimizer] \\
        [--recompute none|selective|full] [--offload-check] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


def _batch(rows: int, seq: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prompt of seq/4 tokens, response mask over the rest (all rows full length: worst case)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.zeros(rows, seq - 1)
    mask[:, seq // 4 :] = 1.0
    return tokens, {"mask": mask, "advantages": torch.randn(rows, generator=g)}


def _loss(global_tokens: float):
    def loss_fn(stats: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]):
        m = extras["mask"]
        pg = -(extras["advantages"].unsqueeze(1) * stats["logp"] * m).sum()
        entropy = (stats["entropy"] * m).sum()
        return (pg - 1e-3 * entropy) / global_tokens, {"entropy": entropy.detach() / global_tokens}

    return loss_fn


def _optimizer_checksum(actor: Any) -> float:
    total = 0.0
    for optimizer in actor._megatron_optimizers():
        for state in optimizer.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += float(value.double().sum())
    return total


def _offload_check(actor: Any) -> dict[str, Any]:
    _sync()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    checksum = _optimizer_checksum(actor)
    t0 = time.perf_counter()
    moved = actor.offload_optimizer_state()
    _sync()
    t1 = time.perf_counter()
    during = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    actor.reload_optimizer_state()
    _sync()
    t2 = time.perf_counter()
    after = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return {
        "moved_gib": _gib(moved),
        "memory_before_gib": _gib(before),
        "memory_offloaded_gib": _gib(during),
        "memory_after_reload_gib": _gib(after),
        "offload_s": round(t1 - t0, 4),
        "reload_s": round(t2 - t1, 4),
        "state_identical": _optimizer_checksum(actor) == checksum,
    }


def run(
    preset: str = "qwen3_0p6b",
    rows: int = 16,
    seq: int = 1024,
    micro_batch: int = 4,
    steps: int = 4,
    dtype: str = "bfloat16",
    stats: str = "fused",
    distributed_optimizer: bool = False,
    recompute: str = "none",
    offload_check: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Build, step, measure; returns the figures (see the module doc). Initialises and destroys the process group."""
    from nemo_gdro.models.gpt import PRESETS
    from nemo_gdro.models.megatron_options import MegatronOptions
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed
    from nemo_gdro.algorithms.token_stats import full_vocab_token_stats
    from nemo_gdro.parallel.vocab_parallel import make_token_stats_fn
    from nemo_gdro.trainer.actor import MegatronActor, OptimConfig

    if steps < 2:
        raise ValueError("--steps must be >= 2 (one warm-up, at least one timed)")
    spec = PRESETS[preset]
    if seq > spec.max_position_embeddings:
        raise ValueError(f"--seq {seq} exceeds {preset}'s max_position_embeddings {spec.max_position_embeddings}")
    recompute_options = {
        "none": {},
        "selective": {"recompute_granularity": "selective", "recompute_modules": ("core_attn", "mlp")},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }[recompute]
    megatron = MegatronOptions(distributed_optimizer=distributed_optimizer, **recompute_options)
    info = init_distributed(seed=seed)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        actor = MegatronActor(
            spec,
            OptimConfig(lr=1e-6, weight_decay=0.01, micro_batch_size=micro_batch),
            seed=seed,
            params_dtype=getattr(torch, dtype),
            # fused: the actor's default (hidden states, chunked output layer); vocab_parallel: chunked
            # statistics over Megatron's logits; full: the full-vocabulary reference over the logits.
            token_stats_fn={"fused": None, "vocab_parallel": make_token_stats_fn(),
                            "full": full_vocab_token_stats}[stats],
            megatron=megatron,
        )
        _sync()
        build_s = time.perf_counter() - t0
        num_params = sum(p.numel() for p in actor.module.parameters())
        tokens, extras = _batch(rows, seq, spec.vocab_size, seed)
        loss_fn = _loss(float(extras["mask"].sum()))
        times, losses = [], []
        for _ in range(steps):
            _sync()
            t = time.perf_counter()
            report = actor.train_step(tokens, extras, loss_fn)
            _sync()
            times.append(time.perf_counter() - t)
            losses.append(report["loss"])
        memory_after_step = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        _sync()
        t = time.perf_counter()
        actor.compute_token_stats(tokens)
        _sync()
        token_stats_s = time.perf_counter() - t
        step_s = statistics.median(times[1:])
        n_tokens = rows * seq
        out: dict[str, Any] = {
            "preset": preset,
            "params_b": round(num_params / 1e9, 4),
            "dtype": dtype,
            "device": str(info.device),
            "backend": info.backend,
            "rows": rows,
            "seq": seq,
            "micro_batch": micro_batch,
            "stats": stats,
            "distributed_optimizer": distributed_optimizer,
            "recompute": recompute,
            "build_s": round(build_s, 3),
            "warmup_step_s": round(times[0], 4),
            "step_s": round(step_s, 4),
            "step_times_s": [round(x, 4) for x in times],
            "tokens_per_s": round(n_tokens / step_s, 1),
            "model_tflops": round(6 * num_params * n_tokens / step_s / 1e12, 2),
            "token_stats_s": round(token_stats_s, 4),
            "losses": losses,
            "loss_finite": all(x == x and abs(x) < float("inf") for x in losses),
            "grad_norm": report["grad_norm"],
            "peak_memory_gib": _gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
            "memory_after_step_gib": _gib(memory_after_step) if torch.cuda.is_available() else None,
        }
        if offload_check:
            out["offload"] = _offload_check(actor)
            # A step after the round trip still trains.
            out["offload"]["step_after_reload_loss"] = actor.train_step(tokens, extras, loss_fn)["loss"]
        return out
    finally:
        destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3_0p6b")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--stats", default="fused", choices=["fused", "vocab_parallel", "full"])
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--offload-check", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = run(
        preset=args.preset, rows=args.rows, seq=args.seq, micro_batch=args.micro_batch, steps=args.steps,
        dtype=args.dtype, stats=args.stats, distributed_optimizer=args.distributed_optimizer,
        recompute=args.recompute, offload_check=args.offload_check,
    )
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
