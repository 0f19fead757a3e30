"""torch.distributed + Megatron-Core parallel-state initialisation (CPU/gloo or GPU/NCCL).

One process per device (SPMD). Under ``torchrun``/``srun`` the usual
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) describe the job; without them the process
forms a world of size 1 over an in-memory ``HashStore`` (no port is ever
reserved, so parallel test workers cannot collide, and nothing is left on
disk when the process is killed).

Every collective (and Megatron's process groups) times out after
``timeout_s`` (``parallel.timeout_s``): a rank that stalls or dies fails the
job after that long instead of blocking it for the default 30 minutes.
"""

from __future__ import annotations

import contextlib
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from nemo_gdro.parallel.launch import detect_launch_env
from nemo_gdro.parallel.megatron_compat import apply_cpu_compat

__all__ = ["DistInfo", "init_distributed", "destroy_distributed", "is_initialized", "seed_everything", "preserved_rng_state"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    ``world_size = tensor_parallel * pipeline_parallel * data_parallel``.
    ``device`` is ``cuda:<local_rank>`` on GPU hosts and ``cpu`` otherwise.
    """

    rank: int
    world_size: int
    local_rank: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device


_OWNS_PROCESS_GROUP = False


def is_initialized() -> bool:
    """Whether Megatron's model-parallel state is initialised in this process."""
    from megatron.core import parallel_state

    return dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and Megatron's model-parallel RNG streams.

    Needs the Megatron parallel state.
    As in Megatron-LM, pipeline stages get distinct seeds (``seed + 100 pp_rank``)
    so that their layers are not initialised identically; data-parallel
    replicas share the seed so that they start from the same weights.
    """
    from megatron.core import parallel_state, tensor_parallel

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    # On CPU this drives the CPU generator through the compat shim (patch 2).
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore Python, numpy, torch (CPU and CUDA) and Megatron tracker RNG states on exit.

    Lets a component reseed for its own reproducible initialisation (for
    example building a model from a seed) without disturbing the streams of
    the caller.
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker = get_cuda_rng_tracker()
    tracker_states = dict(tracker.get_states()) if tracker.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if tracker_states is not None:
            # model_parallel_cuda_manual_seed may have replaced the tracker object.
            get_cuda_rng_tracker().set_states(tracker_states)


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 0,
    backend: str | None = None,
    timeout_s: float = 1800.0,
    init_method: str | None = None,
) -> DistInfo:
    """Initialise torch.distributed, Megatron parallel state and RNG seeding.

    Args:
        tensor_parallel: TP size; must divide the world size.
        pipeline_parallel: PP size; ``tp * pp`` must divide the world size.
        seed: base seed (see :func:`seed_everything`).
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available,
            gloo otherwise.
        timeout_s: collective timeout in seconds (also of Megatron's groups).
        init_method: rendezvous URL used with ``RANK``/``WORLD_SIZE`` from the
            environment instead of ``env://`` (e.g. ``file:///tmp/x`` in
            multi-process tests, which then need no port).
    Returns:
        :class:`DistInfo` for this process.

    If torch.distributed is already initialised (by the launcher or a caller)
    that process group is reused and left alone by :func:`destroy_distributed`.
    """
    global _OWNS_PROCESS_GROUP
    if not timeout_s > 0:
        raise ValueError(f"parallel.timeout_s must be > 0, got {timeout_s}")
    apply_cpu_compat()  # no-op on GPU hosts
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron parallel state is already initialised; call destroy_distributed() first")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    # torchrun or srun (Slurm task variables); exported as torchrun-style
    # variables so env:// and anything else reading RANK/LOCAL_RANK agree.
    launch = detect_launch_env()
    launch.export()
    local_rank = launch.local_rank
    # With per-task GPU binding (srun --gpus-per-task / --gpu-bind) a task sees
    # only its own GPU(s), so the local rank indexes modulo the visible count.
    device_index = local_rank % torch.cuda.device_count() if cuda else 0
    if cuda:
        torch.cuda.set_device(device_index)

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if launch.is_distributed:
            dist.init_process_group(
                backend=backend,
                init_method=init_method or "env://",
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timeout,
            )
            if launch.world_size > 1:
                print(f"[nemo-gdro] {launch.describe()} on {socket.gethostname()}, backend {backend}", flush=True)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        _OWNS_PROCESS_GROUP = True

    world_size = dist.get_world_size()
    if world_size % (tensor_parallel * pipeline_parallel) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel * pipeline_parallel "
            f"= {tensor_parallel} * {pipeline_parallel}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    seed_everything(seed)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        data_parallel=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        backend=backend,
        device=torch.device("cuda", device_index) if cuda else torch.device("cpu"),
    )


def destroy_distributed() -> None:
    """Tear down Megatron parallel state and the process group this module created.

    Safe to call when nothing is initialised; afterwards :func:`init_distributed`
    may be called again in the same process.
    """
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
