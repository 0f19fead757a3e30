"""The verification server and its workers: ``python -m nemo_gdro.rewards._worker CTRL_FD PARENT_PID INIT_JSON``.

:class:`nemo_gdro.rewards.pool.PooledVerifier` starts this module once per
pool, in a fresh interpreter (the *server*). The server builds the verifier
named in ``INIT_JSON``, warms it up (imports math-verify, sympy and
latex2sympy: about a CPU-second), freezes its heap and then, single-threaded,
forks one *worker* per request. A forked worker is ready in milliseconds and
already warm, so replacing a worker that was killed on a hard timeout is
cheap; only the server pays the import cost, once.

Control socket (``CTRL_FD``, ``AF_UNIX`` / ``SOCK_SEQPACKET``, one pickled
tuple per packet), pool -> server:

- ``("spawn",)`` with two file descriptors attached (``SCM_RIGHTS``): the
  read end of the new worker's task pipe and the write end of its result pipe;
- ``("kill", pid)``: SIGKILL that worker (only a live child of this server,
  so a recycled pid is never hit).

Server -> pool: ``("ready", pid)`` once warm. End of file on the socket (the
pool closed, or the trainer process died) makes the server SIGKILL and reap
its workers and exit.

Worker protocol (its two pipes): it sends ``("ready", pid)``, then for each
task frame ``(task_id, prediction, answer)`` one result ``(task_id, status,
correct, detail)``; end of file on its task pipe means exit.

Nothing outlives the trainer: the server has ``PR_SET_PDEATHSIG`` (Linux;
the pool starts it from a long-lived thread, because the kernel ties the
signal to the *thread* that started the child), checks its parent pid every
second and exits on end of file; each worker has ``PR_SET_PDEATHSIG`` towards
the server (single-threaded, so thread = process), which works even while the
worker is stuck in a C call holding the GIL. Ctrl-C (SIGINT to the whole
process group) is ignored: the pool owns these processes' lifetime.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

_PR_SET_PDEATHSIG = 1
_CTRL_BUFSIZE = 4096


def _set_pdeathsig() -> bool:
    """Have the kernel SIGKILL this process when its parent (thread) exits; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return False


def _limit_memory(max_memory_mb: int) -> None:
    if max_memory_mb <= 0:
        return
    import resource

    limit = int(max_memory_mb) * (1 << 20)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _quiet_math_verify() -> None:
    # Parse failures of model output are expected and scored wrong; do not spam the trainer's stderr.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# ------------------------------------------------------------------ worker (forked child)
def _worker_loop(verifier: Any, task_fd: int, result_fd: int, init: dict[str, Any]) -> int:
    from nemo_gdro.rewards._deadline import VerificationTimeout, soft_deadline
    from nemo_gdro.rewards._ipc import REPLY_GROUND_TRUTH_ERROR, PipeClosed, read_frame, write_frame
    from nemo_gdro.rewards.base import GroundTruthError, WorkItem
    from nemo_gdro.rewards.result import STATUS_FAILURE, STATUS_OK, STATUS_TIMEOUT

    _limit_memory(init["max_memory_mb"])
    soft_s: float | None = init["soft_timeout_s"]
    try:
        write_frame(result_fd, ("ready", os.getpid()))
    except BrokenPipeError:  # the pool gave up on this worker before it was ready
        return 0
    while True:
        try:
            task_id, prediction, answer = read_frame(task_fd)
        except PipeClosed:
            return 0
        status, ok, detail = STATUS_OK, False, ""
        try:
            with soft_deadline(soft_s):
                ok = bool(verifier.check(WorkItem(prediction, answer)))
        except VerificationTimeout:
            status = STATUS_TIMEOUT
        except GroundTruthError as e:
            status, detail = REPLY_GROUND_TRUTH_ERROR, str(e)[:500]
        except Exception as e:  # noqa: BLE001 - includes MemoryError under the address-space limit
            status, detail = STATUS_FAILURE, f"{type(e).__name__}: {str(e)[:300]}"
        try:
            write_frame(result_fd, (task_id, status, ok, detail))
        except BrokenPipeError:  # the pool abandoned this item (hard timeout) or closed
            return 0


def _run_worker(server_pid: int, verifier: Any, task_fd: int, result_fd: int, init: dict[str, Any]) -> None:
    """Body of a freshly forked worker; never returns into the server loop."""
    code = 1
    try:
        # The server's heap stays frozen: unfreezing would let the next full GC pass write to every
        # inherited object and copy the whole heap page by page (seconds). New objects are collected as usual.
        if not _set_pdeathsig():
            _start_parent_watchdog(server_pid)
        if os.getppid() != server_pid:  # the server died before prctl took effect
            os._exit(0)
        code = _worker_loop(verifier, task_fd, result_fd, init)
    except BaseException:  # noqa: BLE001 - report, then exit without running the server's cleanup
        traceback.print_exc()
    finally:
        os._exit(code)


def _start_parent_watchdog(parent_pid: int) -> None:
    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watchdog, name="reward-worker-watchdog", daemon=True).start()


# ------------------------------------------------------------------ server
def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


def serve(ctrl_fd: int, parent_pid: int, init: dict[str, Any]) -> int:
    """The server loop (module docstring). Single-threaded, so that ``fork`` is safe."""
    ctrl = socket.socket(fileno=ctrl_fd)
    _set_pdeathsig()
    if os.getppid() != parent_pid:
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from nemo_gdro.rewards.registry import build_verifier

    verifier = build_verifier(init["verifier"], init["options"], init["correct_reward"], init["wrong_reward"])
    if init["warmup"]:
        verifier.warmup()
    _quiet_math_verify()
    gc.collect()
    gc.freeze()  # keep the warm heap shared with the workers (no copy-on-write from GC passes)
    try:
        ctrl.send(pickle.dumps(("ready", os.getpid())))
    except OSError:  # the pool closed before this server was ready
        return 0

    server_pid = os.getpid()
    children: set[int] = set()
    killed = False  # a child was just killed: reap it promptly
    while True:
        readable, _, _ = select.select([ctrl], [], [], 0.05 if killed else 1.0)
        _reap(children)
        killed = False
        if os.getppid() != parent_pid:
            break
        if not readable:
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctrl, _CTRL_BUFSIZE, 2)
        except OSError:
            break
        if not msg:  # end of file: the pool closed or its process died
            for fd in fds:
                os.close(fd)
            break
        op = pickle.loads(msg)
        if op[0] == "spawn" and len(fds) == 2:
            task_fd, result_fd = fds
            pid = os.fork()
            if pid == 0:
                ctrl.close()
                _run_worker(server_pid, verifier, task_fd, result_fd, init)
            children.add(pid)
            os.close(task_fd)
            os.close(result_fd)
        elif op[0] == "kill":
            if op[1] in children:
                os.kill(op[1], signal.SIGKILL)
                killed = True
        else:
            for fd in fds:
                os.close(fd)
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return 0


def main(argv: list[str]) -> int:
    ctrl_fd, parent_pid = int(argv[1]), int(argv[2])
    return serve(ctrl_fd, parent_pid, json.loads(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
