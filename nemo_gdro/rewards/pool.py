"""Verification in worker processes with a hard per-item timeout.

``PooledVerifier(cfg)`` wraps the verifier ``cfg.verifier`` and is itself a
:class:`~nemo_gdro.rewards.base.Verifier` (``verify_batch``, ``score_batch``,
``reward_range``). One batch:

1. ``prepare`` runs here for every row (cheap, bounded string work): most
   rows are decided at once (DAPO integer answers, GPQA letters, arithmetic);
2. the remaining work items are de-duplicated (rollouts of one prompt often
   share an answer) and handed one at a time to idle workers;
3. each item has a hard deadline ``timeout_s`` from hand-off. Inside the
   worker a soft deadline (``soft_timeout_fraction * timeout_s``, SIGALRM in
   the worker's main thread) interrupts Python-level sympy loops, so the
   worker can report the timeout itself; an item still running at the hard
   deadline (a C call holding the GIL, a wedged process) has its worker
   SIGKILLed, and is a timeout. A worker that dies on an item (segfault, OOM
   kill) makes it a failure. Either way the item is scored wrong, the worker
   is replaced by a fresh fork (also after a soft timeout or an exception:
   an interrupted computation may leave state behind, and a fork is cheap),
   and training goes on;
4. results are fanned back out in row order.

Processes: one *server* per pool, started with ``subprocess`` (fork + exec
of a fresh interpreter running :mod:`nemo_gdro.rewards._worker`), imports
the verifier and math-verify once and then forks the *workers* on request
(see ``_worker.py``). Why this and not ``multiprocessing``:

- not ``fork`` of the trainer: it holds torch's thread pools, gloo / NCCL
  sockets and maybe a CUDA context; a fork copies locks held by other
  threads (deadlocks in the child) and those descriptors;
- not ``spawn``: every worker (and every replacement after a hard timeout)
  would pay the interpreter start and the math-verify / sympy import --
  about a CPU-second, several seconds of wall time on a loaded 2-core box --
  and ``multiprocessing`` re-imports the trainer's ``__main__`` in the child
  (``python -m nemo_gdro.cli`` would pull in torch and Megatron);
- so a fork server, like ``forkserver``, but one whose only imports are the
  verifier's: the exec'd server inherits nothing but its control socket
  (``close_fds``), is single-threaded (forking it is safe), and its forked
  workers start warm in milliseconds.

A pathological item therefore costs at most ``timeout_s`` of wall time on its
worker plus a fork (~tens of ms) for the replacement, which other workers
overlap. Results do not depend on which worker ran an item or on how many
there are, except that whether an item finishes within its deadline depends
on the machine's speed.

Lifetime: ``close()`` (also via the context manager, ``atexit`` and garbage
collection) closes the pipes and the control socket -- the server then
SIGKILLs and reaps its workers and exits -- and reaps the server (SIGKILL
after a short grace). If the trainer is killed, the server sees end of file
(and has ``PR_SET_PDEATHSIG``, armed from a long-lived spawner thread because
the kernel ties it to the *thread* that started the child) and the workers
die with the server (``PR_SET_PDEATHSIG`` towards it).

``verify_batch`` may be called from any thread (calls are serialised).
``num_workers=0`` verifies inline in the calling thread, with only the soft
deadline, and only in the main thread (debugging). Verifiers that decide
every row in ``prepare`` (``decides_in_prepare``: arithmetic, GPQA) never
start processes.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import queue
import selectors
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_gdro.rewards._deadline import VerificationTimeout, signals_usable, soft_deadline
from nemo_gdro.rewards._ipc import REPLY_GROUND_TRUTH_ERROR, PipeClosed, read_frame, write_frame
from nemo_gdro.rewards.base import GroundTruthError, Verifier, WorkItem, check_batch_lengths
from nemo_gdro.rewards.registry import RewardConfig, build_verifier
from nemo_gdro.rewards.result import STATUS_FAILURE, STATUS_OK, STATUS_TIMEOUT, VerifyResult

_MAX_START_FAILURES = 3  # consecutive failed starts (server or worker) -> give up with an error
_CLOSE_GRACE_S = 2.0

Outcome = tuple[int, bool, str]  # (status, correct, detail)


@dataclass
class _Server:
    """The fork server as the pool sees it; ``proc`` is set by the spawner thread (``spawned``)."""

    sock: socket.socket
    started: float
    spawned: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen[bytes] | None = None
    spawn_error: BaseException | None = None
    ready_at: float | None = None
    closed: bool = False


@dataclass
class _Worker:
    """One forked worker: the pool's ends of its pipes and what it is doing."""

    task_fd: int  # parent writes tasks
    result_fd: int  # parent reads results
    requested: float
    pid: int | None = None  # from its "ready" message
    busy: tuple[int, int, float] | None = None  # (task_id, item index, hard deadline)
    tasks_done: int = 0
    closed: bool = False

    @property
    def ready(self) -> bool:
        return self.pid is not None


class _StartFailed(RuntimeError):
    pass


class _Spawner:
    """Starts the server from one long-lived thread.

    PR_SET_PDEATHSIG fires when the *thread* that started the child exits, so
    the server must not be started from a short-lived caller thread. The
    child's socket end is closed here once the child holds it.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="reward-pool-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            req = self._requests.get()
            if req is None:
                return
            server, cmd, kwargs, child_sock = req
            try:
                server.proc = subprocess.Popen(cmd, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported as a failed start
                server.spawn_error = e
            finally:
                child_sock.close()  # the pool sees end of file if the start failed
                server.spawned.set()

    def submit(self, server: _Server, cmd: list[str], kwargs: dict[str, Any], child_sock: socket.socket) -> None:
        self._requests.put((server, cmd, kwargs, child_sock))

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5.0)


_LIVE_POOLS: weakref.WeakSet[PooledVerifier] = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class PooledVerifier(Verifier):
    """``cfg.verifier`` behind ``cfg.num_workers`` worker processes (module docstring).

    Args:
        cfg: a :class:`~nemo_gdro.rewards.registry.RewardConfig`.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__(cfg.correct_reward, cfg.wrong_reward)
        self.cfg = cfg
        self.verifier = build_verifier(cfg.verifier, cfg.options, cfg.correct_reward, cfg.wrong_reward)
        self.decides_in_prepare = self.verifier.decides_in_prepare
        self.timeout_s = float(cfg.timeout_s)
        frac = float(cfg.soft_timeout_fraction)
        self.soft_timeout_s: float | None = frac * self.timeout_s if frac > 0 else None
        self.uses_workers = cfg.num_workers > 0 and not self.decides_in_prepare
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._server: _Server | None = None
        self._workers: list[_Worker] = []
        self._retired: list[subprocess.Popen[bytes]] = []  # old servers, reaped later
        self._selector: selectors.BaseSelector | None = None
        self._spawner: _Spawner | None = None
        self._next_task_id = 0
        self._start_failures = 0
        self._restarts = 0  # over this pool's life
        self._closed = False
        self._warned_inline = False
        self._inline_warm = False
        if self.uses_workers:
            self._selector = selectors.DefaultSelector()
            self._spawner = _Spawner()
            _LIVE_POOLS.add(self)
            self._start_server()  # now: its imports overlap with the caller's setup

    # ------------------------------------------------------------ Verifier API
    def prepare(self, response_text: str, answer: str) -> bool | WorkItem:
        return self.verifier.prepare(response_text, answer)

    def check(self, item: WorkItem) -> bool:
        return self.verifier.check(item)

    def is_correct(self, response_text: str, answer: str) -> bool:
        return bool(self.verify_batch([response_text], [answer]).correct[0])

    def warmup(self) -> None:
        self.wait_ready()

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the workers that are ready (for tests and diagnostics)."""
        return [w.pid for w in self._workers if w.pid is not None]

    @property
    def server_pid(self) -> int | None:
        s = self._server
        return s.proc.pid if s is not None and s.proc is not None else None

    @property
    def total_restarts(self) -> int:
        """Workers (or servers) replaced after a timeout, a failure or a death, over the pool's life."""
        return self._restarts

    def verify_batch(self, texts: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        """Row-aligned verification; see the module docstring for timeouts and failures."""
        check_batch_lengths(texts, answers)
        if self._closed:
            raise RuntimeError("PooledVerifier.verify_batch called after close()")
        with self._lock:
            t0 = time.perf_counter()
            restarts0 = self._restarts
            n = len(texts)
            correct = [False] * n
            status = [STATUS_OK] * n
            rows_of: dict[WorkItem, list[int]] = {}
            for i in range(n):
                try:
                    decided = self.verifier.prepare(texts[i], answers[i])
                except GroundTruthError as e:
                    raise GroundTruthError(f"row {i}: {e}") from e
                except Exception:  # noqa: BLE001 - a bad row is a failure, never a crashed step
                    status[i] = STATUS_FAILURE
                    continue
                if isinstance(decided, bool):
                    correct[i] = decided
                else:
                    rows_of.setdefault(decided, []).append(i)
            items = list(rows_of)
            if items:
                outcomes = self._run_pool(items) if self.uses_workers else self._run_inline(items)
                for item, (st, ok, detail) in zip(items, outcomes, strict=True):
                    rows = rows_of[item]
                    if st == REPLY_GROUND_TRUTH_ERROR:
                        raise GroundTruthError(f"row {rows[0]}: {detail}")
                    for i in rows:
                        correct[i], status[i] = ok, st
            return VerifyResult.from_rows(correct, status, time.perf_counter() - t0, self._restarts - restarts0)

    # ------------------------------------------------------------ inline
    def _run_inline(self, items: list[WorkItem]) -> list[Outcome]:
        if not signals_usable() and not self._warned_inline:
            warnings.warn(
                "reward.num_workers=0 off the main thread: verification has no timeout at all", stacklevel=3
            )
            self._warned_inline = True
        if not self._inline_warm and self.cfg.warmup:  # lazy imports (sympy, latex2sympy) outside any item's deadline
            self.verifier.warmup()
            self._inline_warm = True
        out: list[Outcome] = []
        for item in items:
            try:
                with soft_deadline(self.timeout_s):
                    out.append((STATUS_OK, bool(self.verifier.check(item)), ""))
            except VerificationTimeout:
                out.append((STATUS_TIMEOUT, False, ""))
            except GroundTruthError as e:
                out.append((REPLY_GROUND_TRUTH_ERROR, False, str(e)))
            except Exception as e:  # noqa: BLE001
                out.append((STATUS_FAILURE, False, f"{type(e).__name__}: {e}"))
        return out

    # ------------------------------------------------------------ processes
    def _server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding nemo_gdro/
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONHASHSEED"] = "0"  # set/dict orders inside sympy identical in every worker
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        return env

    def _start_server(self) -> None:
        """A new server (started asynchronously by the spawner) and ``num_workers`` worker requests queued to it."""
        assert self._spawner is not None and self._selector is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        init = {
            "verifier": self.cfg.verifier,
            "options": dict(self.cfg.options),
            "correct_reward": self.cfg.correct_reward,
            "wrong_reward": self.cfg.wrong_reward,
            "soft_timeout_s": self.soft_timeout_s,
            "max_memory_mb": self.cfg.max_memory_mb,
            "warmup": self.cfg.warmup,
        }
        cmd = [
            sys.executable, "-m", "nemo_gdro.rewards._worker",
            str(theirs.fileno()), str(os.getpid()), json.dumps(init),
        ]  # fmt: skip
        kwargs = {
            "pass_fds": (theirs.fileno(),),
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.DEVNULL,
            "env": self._server_env(),
        }
        server = _Server(sock=ours, started=time.monotonic())
        self._server = server
        self._selector.register(ours, selectors.EVENT_READ, server)
        self._spawner.submit(server, cmd, kwargs, theirs)
        self._workers = [self._request_worker() for _ in range(self.cfg.num_workers)]

    def _request_worker(self) -> _Worker:
        """Ask the server to fork a worker; it reports "ready" on its result pipe."""
        assert self._server is not None and self._selector is not None
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            socket.send_fds(self._server.sock, [pickle.dumps(("spawn",))], [task_r, res_w])
        except OSError:  # the server is gone: its end of file is handled by the event loop
            pass
        finally:
            os.close(task_r)
            os.close(res_w)
        w = _Worker(task_fd=task_w, result_fd=res_r, requested=time.monotonic())
        self._selector.register(res_r, selectors.EVENT_READ, w)
        return w

    def _discard(self, w: _Worker, kill: bool) -> None:
        """Stop using ``w``: SIGKILL it via the server (or let it exit on end of file); release its pipes."""
        if w.closed:
            return
        w.closed = True
        assert self._selector is not None
        self._selector.unregister(w.result_fd)
        os.close(w.task_fd)  # end of file: an idle worker exits by itself
        os.close(w.result_fd)
        if kill and w.pid is not None and self._server is not None and not self._server.closed:
            try:
                self._server.sock.send(pickle.dumps(("kill", w.pid)))
            except OSError:  # the server is gone, and its workers with it
                pass

    def _replace(self, w: _Worker, kill: bool) -> None:
        self._discard(w, kill)
        self._workers[self._workers.index(w)] = self._request_worker()

    def _start_failed(self, why: str) -> None:
        self._start_failures += 1
        if self._start_failures >= _MAX_START_FAILURES:
            self._shutdown()
            raise _StartFailed(
                f"reward workers for verifier {self.cfg.verifier!r} failed to start {self._start_failures} times "
                f"in a row (last: {why}; the server's stderr is above); the pool is closed"
            )

    def _retire_server(self) -> None:
        """Close the current server's socket (it then kills its workers and exits); reap it later."""
        s = self._server
        if s is None or s.closed:
            return
        s.closed = True
        assert self._selector is not None
        self._selector.unregister(s.sock)
        s.sock.close()
        proc = s.proc if s.spawned.wait(30.0) else None
        if proc is not None:
            self._retired.append(proc)

    def _reap_retired(self, kill_after_s: float | None = None) -> None:
        keep = []
        for p in self._retired:
            if p.poll() is not None:
                continue
            if kill_after_s is not None:
                try:
                    p.wait(timeout=kill_after_s)
                    continue
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    continue
            keep.append(p)
        self._retired = keep

    def _server_lost(self, why: str) -> list[tuple[int, Outcome]]:
        """The server died or failed to start: its workers are gone too; start over."""
        s = self._server
        assert s is not None
        was_ready = s.ready_at is not None
        lost = [(w.busy[1], (STATUS_FAILURE, False, f"verification server lost ({why})")) for w in self._workers if w.busy]
        for w in self._workers:
            self._discard(w, kill=False)
        self._workers = []
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
        self._retire_server()
        if was_ready:
            self._restarts += 1
        else:
            self._start_failed(why)
        self._start_server()
        return lost

    # ------------------------------------------------------------ events
    def _on_server_readable(self) -> list[tuple[int, Outcome]]:
        s = self._server
        assert s is not None
        try:
            msg = s.sock.recv(4096)
        except OSError:
            msg = b""
        if not msg:
            try:
                code = s.proc.wait(timeout=5.0) if s.proc is not None else None
            except subprocess.TimeoutExpired:
                code = None
            why = f"could not start: {s.spawn_error!r}" if s.spawn_error is not None else f"exit code {code}"
            return self._server_lost(why)
        if pickle.loads(msg)[0] == "ready":
            s.ready_at = time.monotonic()
        return []

    def _on_worker_readable(self, w: _Worker) -> tuple[int, Outcome] | None:
        """One message of ``w``: ``(item index, outcome)`` when an item finished or died with its worker."""
        try:
            msg = read_frame(w.result_fd)
        except (PipeClosed, OSError, EOFError):
            busy = w.busy
            server_ok = self._server is not None and self._server.ready_at is not None
            if not w.ready and server_ok:
                self._replace(w, kill=False)
                self._start_failed("a worker exited before it was ready")
                return None
            self._restarts += 1
            self._replace(w, kill=True)
            if busy is None:  # died while idle (e.g. killed from outside): nothing lost
                return None
            return busy[1], (STATUS_FAILURE, False, "worker died")
        if msg[0] == "ready":
            w.pid = int(msg[1])
            self._start_failures = 0
            return None
        task_id, st, ok, detail = msg
        if w.busy is None or w.busy[0] != task_id:  # pragma: no cover - protocol invariant
            return None
        k = w.busy[1]
        w.busy = None
        w.tasks_done += 1
        if st in (STATUS_TIMEOUT, STATUS_FAILURE):
            # An interrupted computation (soft deadline, MemoryError) may have left state behind in that
            # interpreter; a fresh fork costs milliseconds and keeps every verdict independent of history.
            self._restarts += 1
            self._replace(w, kill=True)
        elif self.cfg.max_tasks_per_worker and w.tasks_done >= self.cfg.max_tasks_per_worker:
            self._replace(w, kill=False)
        return k, (int(st), bool(ok), str(detail))

    def _poll(self, wait_s: float | None) -> list[tuple[int, Outcome]]:
        """Wait up to ``wait_s`` for events and handle them (server first: its death explains the workers')."""
        assert self._selector is not None
        events = [key.data for key, _ in self._selector.select(wait_s)]
        events.sort(key=lambda obj: not isinstance(obj, _Server))
        done: list[tuple[int, Outcome]] = []
        for obj in events:
            if obj.closed:  # discarded by an earlier event of this batch
                continue
            if isinstance(obj, _Server):
                done += self._on_server_readable()
            else:
                r = self._on_worker_readable(obj)
                if r is not None:
                    done.append(r)
        return done

    def _start_deadline(self, w: _Worker) -> float:
        s = self._server
        assert s is not None
        if s.ready_at is None:
            return s.started + self.cfg.start_timeout_s
        return max(w.requested, s.ready_at) + self.cfg.start_timeout_s

    def _enforce_deadlines(self) -> list[tuple[int, Outcome]]:
        now = time.monotonic()
        done: list[tuple[int, Outcome]] = []
        for w in list(self._workers):
            if w.busy is not None and now >= w.busy[2]:
                done.append((w.busy[1], (STATUS_TIMEOUT, False, "hard timeout")))
                self._restarts += 1
                self._replace(w, kill=True)
        s = self._server
        assert s is not None
        if s.ready_at is None and now >= s.started + self.cfg.start_timeout_s:
            return done + self._server_lost(f"not ready after {self.cfg.start_timeout_s:g} s")
        for w in list(self._workers):
            if not w.ready and now >= self._start_deadline(w):
                self._replace(w, kill=False)
                self._start_failed(f"a worker was not ready {self.cfg.start_timeout_s:g} s after its request")
        return done

    def _next_wake(self) -> float | None:
        times = [w.busy[2] for w in self._workers if w.busy is not None]
        times += [self._start_deadline(w) for w in self._workers if not w.ready]
        if self._server is not None and self._server.ready_at is None:
            times.append(self._server.started + self.cfg.start_timeout_s)
        return max(min(times) - time.monotonic(), 0.0) if times else None

    def _run_pool(self, items: list[WorkItem]) -> list[Outcome]:
        self._reap_retired()
        results: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        remaining = len(items)
        while remaining:
            for w in list(self._workers):
                if not (w.ready and w.busy is None and pending) or w.closed:
                    continue
                k = pending.popleft()
                task_id = self._next_task_id
                self._next_task_id += 1
                try:
                    write_frame(w.task_fd, (task_id, items[k].prediction, items[k].answer))
                except OSError:  # died while idle: the item never ran, hand it to another worker
                    pending.appendleft(k)
                    self._restarts += 1
                    self._replace(w, kill=True)
                    continue
                w.busy = (task_id, k, time.monotonic() + self.timeout_s)
            finished = self._poll(self._next_wake())
            finished += self._enforce_deadlines()
            for k, outcome in finished:
                if results[k] is None:
                    results[k] = outcome
                    remaining -= 1
        return [r for r in results if r is not None]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server and every worker are ready; ``TimeoutError`` after ``timeout_s``."""
        if not self.uses_workers:
            return
        if self._closed:
            raise RuntimeError("PooledVerifier.wait_ready called after close()")
        with self._lock:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not all(w.ready for w in self._workers):
                wait = self._next_wake()
                if deadline is not None:
                    left = max(deadline - time.monotonic(), 0.0)
                    wait = left if wait is None else min(wait, left)
                self._poll(wait)  # idle workers: only "ready" or a death
                self._enforce_deadlines()
                if deadline is not None and time.monotonic() >= deadline and not all(w.ready for w in self._workers):
                    raise TimeoutError(f"reward workers not ready after {timeout_s} s")

    # ------------------------------------------------------------ lifecycle
    def _shutdown(self) -> None:
        self._closed = True
        _LIVE_POOLS.discard(self)
        if os.getpid() != self._owner_pid or not self.uses_workers:
            return
        for w in self._workers:
            self._discard(w, kill=False)
        self._workers = []
        self._retire_server()  # end of file: the server kills and reaps its workers, then exits
        self._reap_retired(kill_after_s=_CLOSE_GRACE_S)
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._spawner is not None:
            self._spawner.stop()
            self._spawner = None

    def close(self) -> None:
        """Stop the server and every worker and reap them; idempotent. A forked copy of the pool touches nothing."""
        if self._closed:
            return
        self._shutdown()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

