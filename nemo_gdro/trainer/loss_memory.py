"""Memory model of the loss pass (token statistics from the final hidden states), and a guard.

Bytes per token of the loss pass
--------------------------------
With ``V`` the vocabulary size per TP rank (``model.vocab_size / tensor_parallel``),
``h`` the hidden size and ``b`` the parameter element size (4 for fp32, 2 for bf16),
the loss pass of one micro-batch of ``N`` tokens (rows x padded width) needs,
beyond the model's own activations:

* fused path (``megatron.fused_linear_token_stats``, the default;
  :mod:`nemo_gdro.parallel.fused_linear_stats`)::

      N * (h * b + 24)  +  C * V * b  +  V * h * 4  (+ V * h * b if b != 4)  +  2 * 4 MiB (64 MiB on GPU)

  per token only the hidden-state gradient and six fp32 scalars; ``C`` rows of
  one chunk's logits (``C * V * b`` <= 32 MiB on CPU, 512 MiB on GPU), the fp32
  weight-gradient accumulator (and, below fp32, one per-chunk product) are
  fixed, so the peak does not grow with micro-batch size x vocabulary;
* logits path (``megatron.fused_linear_token_stats=false``, sequence
  parallelism, a caller's ``token_stats_fn``)::

      N * 2 * V * b  +  2 * 4 MiB (64 MiB on GPU)

  Megatron's output layer writes the logits ``[s, b, V]`` and their transposed
  copy ``[b, s, V]``, which is kept for the backward pass, where the gradient of
  the logits (same size) is written before the kept logits are freed; the
  chunked statistics themselves add only tile workspaces. (The full-vocabulary
  reference, a test oracle, adds about eight fp32 ``[N, V]`` tensors more.)

:func:`check_loss_pass_memory` refuses a micro-batch whose loss pass alone
would not fit in the free memory of its device, before anything is allocated,
with one line that names the settings to change.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nemo_gdro.trainer.errors import RunError

__all__ = ["loss_pass_bytes", "free_memory_bytes", "loss_pass_problem", "check_loss_pass_memory"]

_MiB = 2**20
_GiB = 2**30


def _fixed_workspace(device: torch.device) -> int:
    return 2 * (64 if device.type == "cuda" else 4) * _MiB


def loss_pass_bytes(
    tokens: int, *, vocab_local: int, hidden: int, param_bytes: int, fused: bool, device: torch.device
) -> int:
    """Bytes the loss pass of a ``tokens``-token micro-batch needs (module doc's formulas)."""
    from nemo_gdro.parallel.fused_linear_stats import chunk_rows_for

    fixed = _fixed_workspace(device)
    if not fused:
        return tokens * 2 * vocab_local * param_bytes + fixed
    dtype = {4: torch.float32, 2: torch.bfloat16, 8: torch.float64}.get(param_bytes, torch.float32)
    chunk = min(tokens, chunk_rows_for(None, vocab_local, dtype, device)) * vocab_local * param_bytes
    weight_grad = vocab_local * hidden * (4 + (param_bytes if param_bytes != 4 else 0))
    return tokens * (hidden * param_bytes + 24) + chunk + weight_grad + fixed


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or ``None`` without one."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        base = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (GPU: driver free + the caching allocator's unused
    reserve; CPU: ``MemAvailable``, capped by a cgroup limit), or ``None`` where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free()
    if available is None:
        return cgroup
    return available if cgroup is None else min(available, cgroup)


def loss_pass_problem(
    tokens: int,
    *,
    vocab_local: int,
    hidden: int,
    param_bytes: int,
    fused: bool,
    device: torch.device,
    available_bytes: int | None = None,
) -> str | None:
    """One line saying why the loss pass of the largest micro-batch (``tokens`` = rows x padded
    width) cannot fit in free memory, or ``None`` when it fits.

    ``available_bytes`` defaults to :func:`free_memory_bytes` of ``device``; nothing is checked
    where that is unknown. Only the loss pass is counted (the model's activations come on
    top), so a refused micro-batch could never have run.
    """
    if available_bytes is None:
        available_bytes = free_memory_bytes(device)
    if available_bytes is None:
        return None
    need = loss_pass_bytes(
        tokens, vocab_local=vocab_local, hidden=hidden, param_bytes=param_bytes, fused=fused, device=device
    )
    if need <= available_bytes:
        return None
    per_token = need / max(tokens, 1)
    fit = max(0, math.floor(available_bytes / per_token))
    path = (
        "its fused loss pass" if fused
        else f"the logits of its loss pass (2 x {vocab_local} vocabulary x {param_bytes} bytes per token)"
    )
    advice = "" if fused else "; or set megatron.fused_linear_token_stats=true"
    return (
        f"a micro-batch of {tokens} tokens needs {need / _GiB:.2f} GiB for {path} but {device.type} has "
        f"{available_bytes / _GiB:.2f} GiB free: lower trainer.micro_batch_size or set "
        f"trainer.max_tokens_per_microbatch (about {fit} tokens fit){advice}"
    )


def check_loss_pass_memory(tokens: int, **kwargs) -> None:
    """Raise :class:`~nemo_gdro.trainer.errors.RunError` with :func:`loss_pass_problem`'s line, if any."""
    problem = loss_pass_problem(tokens, **kwargs)
    if problem is not None:
        raise RunError(problem)
