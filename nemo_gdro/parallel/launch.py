"""Where this process sits in a job: torchrun, Slurm ``srun`` or a lone process.

:func:`detect_launch_env` reads the launcher's environment once and returns a
:class:`LaunchEnv`; :meth:`LaunchEnv.export` writes the torchrun-style
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) that torch's ``env://`` rendezvous reads, so one code path
initialises ``torch.distributed`` under torchrun and under plain ``srun``.

Precedence: torchrun variables win over Slurm ones, because ``srun torchrun``
(one task per node spawning one worker per GPU) leaves the Slurm task
variables describing the *node* task while torchrun's describe the worker.

This module imports nothing heavy (no torch) so it can be unit-tested and used
by launch scripts cheaply.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping, MutableMapping

__all__ = [
    "LaunchEnv",
    "LaunchEnvError",
    "detect_launch_env",
    "expand_nodelist",
    "first_host",
    "port_from_job_id",
    "PORT_BASE",
    "PORT_SPAN",
]

Source = Literal["torchrun", "slurm", "single"]

# Derived rendezvous ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): above the
# well-known/registered services people usually run on compute nodes and below
# Linux's default ephemeral range (32768+), so an outgoing connection cannot
# already hold the port. Two jobs sharing a first node collide only when their
# ids agree modulo PORT_SPAN.
PORT_BASE = 15000
PORT_SPAN = 10000

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchEnvError(RuntimeError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job and the rendezvous address.

    ``master_addr``/``master_port`` are ``None`` only when nothing provides them
    (a lone process, or torchrun-style variables used with a ``file://``
    rendezvous that needs no address).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: Source

    @property
    def is_distributed(self) -> bool:
        """Whether a launcher started this process (as opposed to a lone run)."""
        return self.source != "single"

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the torchrun-style variables for ``init_process_group(init_method="env://")``.

        A lone process exports nothing, so it keeps its private FileStore world.
        """
        if not self.is_distributed:
            return
        env = os.environ if environ is None else environ
        env["RANK"] = str(self.rank)
        env["WORLD_SIZE"] = str(self.world_size)
        env["LOCAL_RANK"] = str(self.local_rank)
        if self.master_addr is not None:
            env["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)

    def describe(self) -> str:
        where = f"{self.master_addr}:{self.master_port}" if self.master_addr else "no address"
        return f"rank {self.rank}/{self.world_size} local_rank {self.local_rank} via {self.source} (rendezvous {where})"


# ----------------------------------------------------------------- node lists
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"nested '[' in node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchEnvError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_brackets(body: str, text: str) -> list[str]:
    """``001-003,7`` -> ``["001", "002", "003", "7"]``; a range keeps the low bound's zero padding."""
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise LaunchEnvError(f"empty range in node list {text!r}")
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchEnvError(f"bad range {item!r} in node list {text!r}")
        if not sep:
            values.append(lo)
            continue
        start, stop = int(lo), int(hi)
        if stop < start:
            raise LaunchEnvError(f"descending range {item!r} in node list {text!r}")
        # Slurm pads every member to the width of the range's written low bound.
        width = len(lo)
        values.extend(f"{n:0{width}d}" for n in range(start, stop + 1))
    return values


def _expand_host_pattern(pattern: str, text: str) -> list[str]:
    """One comma-free host expression, possibly with several bracket groups
    (``rack[1-2]-n[01-02]``): the cartesian product, in Slurm's order."""
    pieces: list[list[str]] = []
    rest = pattern
    while rest:
        open_at = rest.find("[")
        if open_at < 0:
            pieces.append([rest])
            break
        close_at = rest.find("]", open_at)
        if open_at > 0:
            pieces.append([rest[:open_at]])
        pieces.append(_expand_brackets(rest[open_at + 1 : close_at], text))
        rest = rest[close_at + 1 :]
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compact node-list syntax, as ``scontrol show hostnames`` does.

    ``"node[001-003,7],gpu-a1"`` -> ``["node001", "node002", "node003", "node7", "gpu-a1"]``.
    Raises :class:`LaunchEnvError` on malformed input (unbalanced brackets,
    non-numeric or descending ranges, empty entries).
    """
    text = nodelist.strip()
    if not text:
        raise LaunchEnvError("empty Slurm node list")
    hosts: list[str] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            raise LaunchEnvError(f"empty host in node list {nodelist!r}")
        hosts.extend(_expand_host_pattern(part, nodelist))
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The first host of a Slurm node list: the rendezvous (rank 0) node.

    Prefers ``scontrol show hostnames`` (the authority on the syntax) when it is
    on ``PATH`` and succeeds; containers often lack it, so the pure-Python
    parser is the fallback.
    """
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            return out[0]
    return expand_nodelist(nodelist)[0]


def port_from_job_id(job_id: int) -> int:
    """A rendezvous port every task of one job derives identically (see ``PORT_BASE``)."""
    return PORT_BASE + job_id % PORT_SPAN


# ----------------------------------------------------------------- detection
def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer") from None


def _port_var(env: Mapping[str, str], name: str) -> int:
    port = _int_var(env, name)
    if not 0 < port < 65536:
        raise LaunchEnvError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def _check_ranks(rank: int, world_size: int, local_rank: int, names: tuple[str, str, str]) -> None:
    rank_name, world_name, local_name = names
    if world_size < 1:
        raise LaunchEnvError(f"{world_name}={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise LaunchEnvError(f"{rank_name}={rank} is outside [0, {world_name}={world_size})")
    if not 0 <= local_rank <= rank:
        # A process's index on its node can never exceed its global index.
        raise LaunchEnvError(f"{local_name}={local_rank} must be in [0, {rank_name}={rank}]")


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
    if missing:
        present = [name for name in ("RANK", "WORLD_SIZE") if name in env]
        raise LaunchEnvError(f"{present[0]} is set but {missing[0]} is not; set both (torchrun sets both)")
    rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
    local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if "LOCAL_RANK" not in env and world_size > 1 and rank > 0:
        # Defaulting to 0 would put every process on GPU 0.
        raise LaunchEnvError("RANK/WORLD_SIZE are set without LOCAL_RANK; set LOCAL_RANK (torchrun does)")
    _check_ranks(rank, world_size, local_rank, ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    addr = env.get("MASTER_ADDR") or None
    port = _port_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    return LaunchEnv(rank, world_size, local_rank, addr, port, "torchrun")


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of an ``srun`` step.

    The batch script of an ``sbatch`` job also carries ``SLURM_PROCID=0`` and the
    job's ``SLURM_NTASKS``; a process started there directly (no ``srun``) is
    alone and must not wait for ranks that will never come. Only ``srun`` sets
    ``SLURM_STEP_ID``/``SLURM_STEPID`` (the batch step has none).
    """
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def _from_slurm(env: Mapping[str, str], use_scontrol: bool) -> LaunchEnv:
    for name in ("SLURM_NTASKS", "SLURM_LOCALID"):
        if name not in env:
            raise LaunchEnvError(f"SLURM_PROCID is set but {name} is not; is this an srun task?")
    rank, world_size = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
    local_rank = _int_var(env, "SLURM_LOCALID")
    if "SLURM_STEP_NUM_TASKS" in env and _int_var(env, "SLURM_STEP_NUM_TASKS") != world_size:
        raise LaunchEnvError(
            f"SLURM_NTASKS={world_size} disagrees with SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']}"
        )
    _check_ranks(rank, world_size, local_rank, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))

    addr = env.get("MASTER_ADDR") or None
    if addr is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchEnvError("Slurm task without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the rank 0 host")
        addr = first_host(nodelist, use_scontrol=use_scontrol)
    if env.get("MASTER_PORT"):
        port = _port_var(env, "MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        port = port_from_job_id(_int_var(env, "SLURM_JOB_ID"))
    else:
        raise LaunchEnvError("Slurm task without MASTER_PORT or SLURM_JOB_ID: cannot choose a rendezvous port")
    return LaunchEnv(rank, world_size, local_rank, addr, port, "slurm")


def detect_launch_env(environ: Mapping[str, str] | None = None, use_scontrol: bool = True) -> LaunchEnv:
    """Read this process's rank, world size, local rank and rendezvous address.

    Order: torchrun variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT``), then an ``srun`` task's Slurm variables
    (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the address is
    ``MASTER_ADDR`` or the first host of the step's node list, the port
    ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``), else a lone process.

    Raises :class:`LaunchEnvError` naming the variable when they are malformed
    or inconsistent.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if _in_slurm_step(env):
        return _from_slurm(env, use_scontrol)
    local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    return LaunchEnv(0, 1, local_rank, None, None, "single")


def main() -> int:
    """``python -m nemo_gdro.parallel.launch``: print this task's view (a launch dry run)."""
    import socket

    try:
        launch = detect_launch_env()
    except LaunchEnvError as err:
        print(f"[nemo-gdro] launch environment error: {err}", flush=True)
        return 2
    print(f"[nemo-gdro] dry run: {launch.describe()} on {socket.gethostname()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
