"""Collectives that put their buffers on the backend's device.

NCCL only moves CUDA tensors and gloo is the CPU backend, so a collective on a
tensor that lives on the wrong device fails ("No backend type associated with
device type cpu") or, worse, works on CPU and breaks on the cluster. Every
collective of the trainer and of the algorithm controllers goes through the
functions here: each copies its tensor to :func:`backend_device` of the group
(a no-op when it is already there), runs the collective, and returns the
result on the caller's device. With one process (or a group of size 1) they
return the input unchanged and need no initialised ``torch.distributed``.

The pieces that move large tensors on the GPU (vocabulary-parallel
statistics, weight export) call ``torch.distributed`` directly on tensors that
are on the model's device by construction; everything that assembles small
host-side vectors (counts, per-row values, controller statistics) uses this
module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "group_size",
    "group_rank",
    "backend_device",
    "all_reduce",
    "all_gather",
    "broadcast",
]


def is_distributed() -> bool:
    """``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: Any = None) -> int:
    """Processes in ``group`` (``None``: the default group); 1 without ``torch.distributed``."""
    if not is_distributed():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1
    return dist.get_world_size(group)


def group_rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without ``torch.distributed``."""
    return dist.get_rank(group) if is_distributed() else 0


def backend_device(group: Any = None) -> torch.device:
    """Where ``group``'s collectives need their tensors: the current CUDA device for NCCL, else CPU."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """``op`` (default SUM) over ``group``; returns the result on ``tensor``'s device (input untouched)."""
    if group_size(group) == 1:
        return tensor
    buf = _to(tensor, backend_device(group)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return _to(buf, tensor.device)


def all_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order, on ``tensor``'s device."""
    if group_size(group) == 1:
        return [tensor]
    buf = _to(tensor, backend_device(group)).contiguous()
    out = [torch.empty_like(buf) for _ in range(group_size(group))]
    dist.all_gather(out, buf, group=group)
    return [_to(o, tensor.device) for o in out]


def broadcast(tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """``tensor`` of global rank ``src`` on every rank of ``group``, on the caller's device."""
    if group_size(group) == 1:
        return tensor
    buf = _to(tensor, backend_device(group)).clone()
    dist.broadcast(buf, src=src, group=group)
    return _to(buf, tensor.device)
