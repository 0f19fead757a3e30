"""Step metrics: JSON lines (the source of truth), TensorBoard, optional wandb, and a progress line.

Files under ``out_dir``:

- ``metrics.jsonl``: one object per training step, ``{"step": s, "<key>": value, ...}``.
- ``eval.jsonl``: one object per evaluation, keys prefixed ``eval/``.
- ``tb/``: TensorBoard event files (same keys).

Non-finite values (NaN, +-inf) are written as JSON ``null`` so the files stay
strict JSON (``jq``, pandas); :func:`read_jsonl` returns them as ``None`` and
the plots treat ``None`` as NaN.

Durability: every record is flushed and fsynced when it is written, so a
record that precedes a checkpoint is on disk before the checkpoint is. The
logger also keeps the records written since the last checkpoint
(:meth:`MetricsLogger.tail`); the checkpoint stores them, and a run resumed
from it reconciles the files with it (:func:`reconcile`): records after the
checkpoint's step are dropped (they will be logged again), records up to it
that are missing or damaged (a torn last line, a lost write) are restored
from the checkpoint's copy. So across any number of crashes and resumes each
step is logged exactly once.

In a data-parallel run only rank 0 should construct a :class:`MetricsLogger`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TB_DIR = "tb"


def read_jsonl(path: Path | str, *, warn: bool = False) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a truncated or unparsable *last* line is dropped.

    A crash mid-``write`` can only damage the last line; damage anywhere else
    means the file was edited or corrupted, and raises ``ValueError`` naming
    the file and line number. A missing file reads as ``[]``. ``warn``: say
    (``warnings.warn``, naming file and line) when a damaged last line is dropped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    rows: list[dict[str, Any]] = []
    last_nonempty = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == last_nonempty:
                if warn:
                    warnings.warn(f"{path}:{i + 1}: dropped a damaged last line ({e}): {line[:80]!r}", stacklevel=2)
                break  # interrupted write of the final record
            raise ValueError(f"{path}:{i + 1}: malformed JSON line ({e})") from e
        rows.append(row)
    return rows


def _clean_value(key: str, value: Any) -> float | int | None:
    """Coerce a metric to a JSON number; non-finite -> None. Raises TypeError naming the key."""
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:
            raise TypeError(f"metric {key!r} must be a scalar, got an array/tensor with several elements") from e
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is None:
        return None
    raise TypeError(f"metric {key!r} must be a real number, got {type(value).__name__}: {value!r}")


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names must be non-empty str, got {key!r}")
        if key == "step":
            raise ValueError("metric name 'step' is reserved (pass the step as the first argument)")
        out[key] = _clean_value(key, value)
    return out


def _step_of(row: dict[str, Any]) -> int | None:
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically by ``rows`` (temp file, fsync, rename, fsync of the dir)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reconcile(path: Path, resume_step: int, saved: dict[str, Any] | None = None) -> dict[str, int]:
    """Make ``path`` hold exactly the records of steps ``<= resume_step`` (see the module docstring).

    Args:
        resume_step: the checkpoint's step.
        saved: the checkpoint's copy of the records logged since the previous
            checkpoint, ``{"since": s, "rows": [...]}`` (records with ``step > s``);
            ``None`` (an older checkpoint): keep what the file has up to
            ``resume_step`` and warn about missing steps.
    Returns:
        ``{"dropped": records after the checkpoint, "restored": records put back}``.
    """
    raw = path.read_bytes() if path.is_file() else b""
    rows = read_jsonl(path, warn=True)
    def after(row: dict[str, Any], step: int) -> bool:
        s = _step_of(row)
        return s is not None and s > step

    if saved is not None:
        since = int(saved["since"])
        tail = [r for r in rows if after(r, since)]
        keep = [r for r in rows if not after(r, since)] + [dict(r) for r in saved["rows"]]
        dropped = sum(1 for r in tail if after(r, resume_step))
        restored = sum(1 for r in saved["rows"] if r not in tail)
    else:
        keep = [r for r in rows if not after(r, resume_step)]
        dropped, restored = len(rows) - len(keep), 0
    ends_clean = raw.endswith(b"\n") or not raw
    if keep != rows or not ends_clean or len(rows) != raw.count(b"\n"):
        _rewrite(path, keep)
    if restored > 0:
        warnings.warn(f"{path}: restored {restored} record(s) up to step {resume_step} from the checkpoint", stacklevel=2)
    return {"dropped": dropped, "restored": restored}


class MetricsLogger:
    """Append-only metrics sink for one run.

    Args:
        out_dir: run directory (created if missing).
        tensorboard: also write TensorBoard scalars to ``out_dir/tb`` (the
            writer is created on the first ``log``; if TensorBoard cannot be
            imported a warning is issued once and JSONL logging continues).
        wandb: keyword arguments for ``wandb.init`` (e.g. ``{"project": ...,
            "name": ..., "id": ..., "resume": "allow"}``); None disables wandb.
        resume_step: the step of the checkpoint the run resumes from. Rows with
            a larger step are dropped from both JSONL files first, so that the
            replayed steps are not duplicated; TensorBoard purges them too.
            With None (fresh run) an existing non-empty ``metrics.jsonl`` /
            ``eval.jsonl`` is renamed to ``*.jsonl.bak-<time>`` with a warning
            rather than mixed with the new run or deleted.
        resume_log: the checkpoint's :meth:`tail` (restores records up to
            ``resume_step`` the files lack; see :func:`reconcile`).
    """

    def __init__(
        self,
        out_dir: Path | str,
        *,
        tensorboard: bool = True,
        wandb: dict[str, Any] | None = None,
        resume_step: int | None = None,
        resume_log: dict[str, Any] | None = None,
    ) -> None:
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                        or resume_step < 0):
            raise ValueError(f"resume_step must be None or an int >= 0, got {resume_step!r}")
        if wandb is not None and not isinstance(wandb, dict):
            raise TypeError(f"wandb must be a dict of wandb.init kwargs or None, got {type(wandb).__name__}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.eval_path = self.out_dir / EVAL_FILE
        self.resume_step = resume_step
        self._use_tb = tensorboard
        self._tb: Any = None
        self._tb_failed = False
        self._closed = False

        # Records written since the last checkpoint (what the next checkpoint stores).
        self._since = -1 if resume_step is None else resume_step
        self._tail: dict[str, list[dict[str, Any]]] = {"metrics": [], "eval": []}
        for kind, path in (("metrics", self.metrics_path), ("eval", self.eval_path)):
            if resume_step is not None:
                saved = None
                if resume_log is not None and kind in resume_log:
                    saved = {"since": resume_log["since"], "rows": resume_log[kind]}
                reconcile(path, resume_step, saved)
            elif path.is_file() and path.stat().st_size > 0:
                backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
                warnings.warn(
                    f"{path} exists and this is a fresh run (resume_step=None); moved it to {backup}",
                    stacklevel=2,
                )
                os.replace(path, backup)

        # Line buffering is not enough: flush() after each record so that a
        # crash loses at most the record being written.
        self._metrics_f: TextIO = open(self.metrics_path, "a", encoding="utf-8")
        self._eval_f: TextIO = open(self.eval_path, "a", encoding="utf-8")

        self._wandb_run: Any = None
        if wandb is not None:
            try:
                import wandb as wandb_mod  # noqa: PLC0415 - optional dependency
            except ImportError as e:
                self.close()
                raise ImportError(
                    "metrics: wandb logging is configured but the 'wandb' package is not installed; "
                    "run `pip install wandb` or remove the wandb settings"
                ) from e
            kwargs = {"dir": str(self.out_dir), **wandb}
            self._wandb_run = wandb_mod.init(**kwargs)

    # ------------------------------------------------------------ internals
    def _tb_writer(self) -> Any:
        if not self._use_tb or self._tb_failed:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - slow import, optional
            except Exception as e:  # noqa: BLE001 - any import problem just disables TB
                self._tb_failed = True
                warnings.warn(f"TensorBoard logging disabled: cannot import SummaryWriter ({e})", stacklevel=3)
                return None
            # purge_step hides events of steps after the checkpoint that a
            # crashed run had already written, like the JSONL truncation.
            purge = None if self.resume_step is None else self.resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.out_dir / TB_DIR), purge_step=purge)
        return self._tb

    def _emit(self, f: TextIO, step: int, metrics: dict[str, Any]) -> dict[str, float | int | None]:
        if self._closed:
            raise RuntimeError("MetricsLogger is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}: {step!r}")
        clean = _clean_metrics(metrics)
        row = {"step": step, **clean}
        try:
            f.write(json.dumps(row, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as err:
            from nemo_gdro.trainer.checkpoint import is_disk_full
            from nemo_gdro.trainer.errors import RunError

            if is_disk_full(err):
                raise RunError(
                    f"no space left on device at {self.out_dir} while writing {Path(f.name).name} (step {step}); "
                    "the checkpoints are kept: free space and run again (run.resume=auto)"
                ) from None
            raise
        self._tail["eval" if f is self._eval_f else "metrics"].append(row)
        tb = self._tb_writer()
        if tb is not None:
            for k, v in clean.items():
                if v is not None:
                    tb.add_scalar(k, v, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in clean.items() if v is not None}, step=step)
        return clean

    # ---------------------------------------------------------------- public
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the training metrics of ``step`` (scalars: python/numpy/0-d torch numbers)."""
        self._emit(self._metrics_f, step, metrics)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Record evaluation metrics at ``step`` to ``eval.jsonl``; keys get an ``eval/`` prefix if they lack one."""
        prefixed = {(k if isinstance(k, str) and k.startswith("eval/") else f"eval/{k}"): v for k, v in metrics.items()}
        self._emit(self._eval_f, step, prefixed)

    def tail(self) -> dict[str, Any]:
        """Records written since :meth:`mark_checkpoint` (or the start): ``{"since": step,
        "metrics": [...], "eval": [...]}``, JSON-ready; a checkpoint stores it."""
        return {"since": self._since, "metrics": list(self._tail["metrics"]), "eval": list(self._tail["eval"])}

    def mark_checkpoint(self, step: int) -> None:
        """A checkpoint of ``step`` holds the tail: start a new one."""
        self._since = int(step)
        self._tail = {"metrics": [], "eval": []}

    def close(self) -> None:
        """Flush and close every sink; idempotent."""
        if self._closed:
            return
        self._closed = True
        for f in (getattr(self, "_metrics_f", None), getattr(self, "_eval_f", None)):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger:
    """Stands in for the metrics logger on ranks other than 0 (only rank 0 writes)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def tail(self) -> dict[str, Any]:
        return {"since": -1, "metrics": [], "eval": []}

    def mark_checkpoint(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(
    out_dir: Path | str, logging: Any, *, main: bool, resume_step: int | None, resume_log: dict[str, Any] | None = None
) -> MetricsLogger | NullLogger:
    """The run's logger: a :class:`MetricsLogger` on the main rank (``logging`` = the typed
    ``logging`` section: ``tensorboard``, ``wandb``), a :class:`NullLogger` elsewhere."""
    if not main:
        return NullLogger()
    return MetricsLogger(
        out_dir, tensorboard=logging.tensorboard, wandb=logging.wandb, resume_step=resume_step, resume_log=resume_log
    )


def _fmt_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``--:--`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Single-line training progress without dependencies.

    On a TTY the line is redrawn in place (carriage return); otherwise (log
    files, SLURM output) every update prints its own line.

    Args:
        total_steps: the step number at which training ends.
        stream: where to write (default stderr).
        width: characters of the bar itself.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None, width: int = 24) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        self.total = total_steps
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0
        self._last_time: float | None = None
        self._time_sum = 0.0  # s, over updates seen by this process (not steps before a resume)
        self._time_n = 0

    def update(
        self,
        step: int,
        *,
        reward: float | None = None,
        pass_rate: float | None = None,
        step_time: float | None = None,
    ) -> str:
        """Show progress after ``step`` steps are done (1-based: the step just finished).

        Args:
            reward: mean reward of the step.
            pass_rate: fraction of correct responses, in [0, 1] (shown as %).
            step_time: seconds the step took; when omitted the wall time since
                the previous update is used (nothing for the first one).

        Returns:
            The rendered line (without control characters), handy for logging.
        """
        now = time.monotonic()
        if step_time is None and self._last_time is not None:
            step_time = now - self._last_time
        self._last_time = now
        if step_time is not None and math.isfinite(step_time) and step_time >= 0:
            self._time_sum += step_time
            self._time_n += 1
        mean_t = self._time_sum / self._time_n if self._time_n else float("nan")
        eta = mean_t * max(self.total - step, 0)

        frac = min(max(step / self.total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        parts = [f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total}"]
        if reward is not None and math.isfinite(reward):
            parts.append(f"reward {reward:.3f}")
        if pass_rate is not None and math.isfinite(pass_rate):
            parts.append(f"pass {100 * pass_rate:.1f}%")
        if step_time is not None and math.isfinite(step_time):
            parts.append(f"{step_time:.2f}s/step")
        parts.append(f"ETA {_fmt_duration(eta)}")
        line = " | ".join(parts)

        if self._is_tty:
            pad = " " * max(self._last_len - len(line), 0)  # erase the tail of a longer previous line
            self.stream.write("\r" + line + pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def close(self) -> None:
        """End the in-place line on a TTY so later output starts on a fresh line."""
        if self._is_tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
