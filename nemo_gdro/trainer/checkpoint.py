"""Atomic, verifiable training checkpoints and RNG capture.

Layout of one checkpoint (``root/step_{step:08d}/``)::

    model.pt  optimizer.pt  controllers.pt  sampler.pt  rng.pt  ...  (one torch.save per component)
    trainer.json  ...                                              (plain data: one JSON file per component)
    config.yaml                                                    (optional, the resolved config)
    hf_assets/tokenizer.json  ...                                  (optional attachments: files kept as they are)
    manifest.json                                                  (written last: size + sha256 of every file)

Safe loading (the trust model): ``.pt`` files are read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers (dict, list, tuple, str, numbers, None) and refuses any other
pickled object, and plain data is JSON; so a checkpoint file, even a crafted
one with a re-hashed manifest, cannot run code when it is loaded. Components
must therefore be tensors and plain containers (numpy arrays, dataclasses and
custom objects are converted by their owners). The sha256 manifest detects
damage, not tampering: anyone who can write the directory can change the
weights the run continues from.

Write protocol (``CheckpointManager.save``): every file goes to a private temp
dir ``root/.tmp_step_{step:08d}_{pid}``, each file is fsynced, the manifest is
written last, the temp dir is fsynced, then ``os.replace`` publishes it under
its final name and the root dir is fsynced. A crash at any point therefore
leaves either the previous state or a complete new checkpoint; a half-written
temp dir is never mistaken for a checkpoint, and ``latest()`` re-hashes the
files so that a damaged final dir (truncated file, flipped byte, missing
manifest) is skipped with a warning instead of crashing the resume.

Distributed: every rank calls ``save`` collectively. Components that every
rank holds identically (replicated controllers, the model under plain DP,
the config) are passed as ``components`` and written once by rank 0;
per-rank shards (each rank's slice of the per-prompt store, its replay
buffer, its RNG, its TP/PP model slice) are passed as ``per_rank``, gathered to
rank 0 and written as ``name.rankRRRRR-of-WWWWW.pt`` (:func:`shard_file_name`),
so the world size at save time is visible in the file name; rank 0 alone
publishes the directory with the protocol above, then all ranks meet at a
barrier. :mod:`nemo_gdro.trainer.run_state` decides what goes where.

One writer per ``root`` is assumed (:mod:`nemo_gdro.trainer.run_lock` holds an
exclusive lock on the run's output directory): ``save`` removes any leftover
temp dir it finds.

A full disk (or quota) raises :class:`DiskFullError` ("no space left on device
at <dir>") after removing the temp dir: the previous checkpoints are untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch

from nemo_gdro.trainer.errors import CheckpointError  # re-exported: its home is torch-free
from nemo_gdro.typed_config import ConfigError

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.yaml"
MANIFEST_FORMAT_VERSION = 1

_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_step_"
# A final dir displaced by a re-save of the same step lives here until the new
# one is published; if we crash in between, it is the only copy of that step.
_OLD_PREFIX = ".old_step_"
_SIDE_DIR_RE = re.compile(r"^\.(?:tmp|old)_step_(\d{8,})_(\d+)$")
_COMPONENT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = frozenset({"manifest", "config"})
_ATTACHMENT_NAME_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 1 << 22  # 4 MiB reads when re-hashing files


class ResumePathError(CheckpointError, ConfigError):
    """``run.resume`` names a path that is not a usable checkpoint (a configuration error too)."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be written for lack of space; the previous ones are kept."""


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is ENOSPC / EDQUOT.

    ``torch.save`` reports a failed write of a file object as
    ``RuntimeError: ... unexpected pos`` with the ``OSError`` as its context.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes for unprivileged users on the filesystem holding ``path`` (None if unknown)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def shard_file_name(component: str, rank: int, world_size: int) -> str:
    """File name of ``component``'s per-rank shard, e.g. ``stats.rank00003-of-00008.pt``.

    With ``world_size == 1`` this is the plain ``{component}.pt``.
    """
    if world_size == 1:
        return f"{component}.pt"
    return f"{component}.rank{rank:05d}-of-{world_size:05d}.pt"


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (zero padded so names sort by step)."""
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- #
# Low-level file helpers
# --------------------------------------------------------------------------- #


class _HashingWriter:
    """File wrapper that hashes and counts bytes as ``torch.save`` writes them.

    Hashing on the way out avoids reading multi-GB files back just to build the
    manifest.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that renames/creations inside it survive a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on dirs
        pass
    finally:
        os.close(fd)


def _write_bytes_synced(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _torch_save_synced(obj: Any, path: Path) -> dict[str, Any]:
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


def _json_save_synced(obj: Any, path: Path) -> dict[str, Any]:
    # allow_nan: evaluations may hold NaN; Python's json reads the tokens back exactly.
    return _write_bytes_synced(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=True).encode("utf-8"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parse and structurally validate ``path/manifest.json``; raises CheckpointError."""
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise CheckpointError(f"{path}: missing {MANIFEST_NAME} (save was interrupted or the dir is not a checkpoint)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: manifest must be a JSON object")
    for key in ("format_version", "step", "files", "components"):
        if key not in manifest:
            raise CheckpointError(f"{mpath}: manifest lacks key {key!r}")
    if manifest["format_version"] != MANIFEST_FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: manifest format_version {manifest['format_version']!r} is not supported "
            f"(this code reads version {MANIFEST_FORMAT_VERSION})"
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and "size" in v and "sha256" in v for v in files.values()
    ):
        raise CheckpointError(f"{mpath}: 'files' must map file name -> {{size, sha256}}")
    listed = dict(manifest["components"])
    listed.update(manifest.get("plain", {}))
    for name, fname in listed.items():
        if fname not in files:
            raise CheckpointError(f"{mpath}: component {name!r} points at {fname!r}, which is not listed in 'files'")
    for name, fnames in manifest.get("sharded", {}).items():
        for fname in fnames:
            if fname not in files:
                raise CheckpointError(f"{mpath}: shard of {name!r} {fname!r} is not listed in 'files'")
    return manifest


def verify_checkpoint(path: Path | str, *, check_hashes: bool = True) -> dict[str, Any]:
    """Check ``path`` against its manifest and return the manifest.

    Args:
        path: a ``step_XXXXXXXX`` directory.
        check_hashes: re-hash every file (reads the whole checkpoint; seconds per
            10 GB). With False only presence and sizes are checked (stat only).

    Raises:
        CheckpointError: naming the directory/file and what is wrong.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    manifest = _read_manifest(path)
    for fname, meta in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: listed in the manifest but missing")
        size = fpath.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{fpath}: size {size} B does not match the manifest ({meta['size']} B); truncated?")
        if check_hashes:
            digest = _sha256_file(fpath)
            if digest != meta["sha256"]:
                raise CheckpointError(
                    f"{fpath}: sha256 {digest[:16]}... does not match the manifest ({meta['sha256'][:16]}...); "
                    "the file is corrupted"
                )
    return manifest


# --------------------------------------------------------------------------- #
# Checkpoint manager
# --------------------------------------------------------------------------- #


class CheckpointManager:
    """Writes, finds, verifies, rotates and loads checkpoints under ``root``.

    Args:
        root: directory holding the ``step_XXXXXXXX`` checkpoints (created on save).
        keep_last: how many newest complete checkpoints rotation keeps (>= 1).
        rank, world_size: this process's rank and the world size (every rank
            saves collectively; rank 0 writes, see the module docstring).
    """

    def __init__(self, root: Path | str, keep_last: int = 3, rank: int = 0, world_size: int = 1) -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be an int >= 1, got {keep_last!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"checkpoint world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"checkpoint rank must be in [0, {world_size}), got {rank!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ----------------------------------------------------------------- paths
    def step_dir(self, step: int) -> Path:
        """Final directory of the checkpoint of ``step``."""
        return self.root / step_dir_name(step)

    @staticmethod
    def step_of(path: Path | str) -> int:
        """Training step of a checkpoint dir, read from its name (``step_00000120`` -> 120)."""
        m = _STEP_DIR_RE.match(Path(path).name)
        if m is None:
            raise CheckpointError(f"{path}: not a checkpoint directory name (expected step_XXXXXXXX)")
        return int(m.group(1))

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """Final checkpoint dirs (complete or not), newest step first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        out.sort(key=lambda t: t[0], reverse=True)
        return out

    def _side_dirs(self, prefix: str) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _SIDE_DIR_RE.match(p.name)
            if m and p.name.startswith(prefix) and p.is_dir():
                out.append((int(m.group(1)), p))
        return out

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        components: dict[str, Any],
        config_yaml: str | None = None,
        *,
        per_rank: dict[str, Any] | None = None,
        plain: dict[str, Any] | None = None,
        group: Any = None,
        attachments: dict[str, Path | bytes] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` atomically and rotate old ones.

        Args:
            step: training step the state belongs to (>= 0); resuming from it
                continues with step ``step + 1``.
            components: name -> object; each goes to ``{name}.pt`` via
                ``torch.save`` (e.g. ``model``, ``optimizer``, ``controllers``,
                ``sampler``, ``rng``). Names: letters, digits, ``_ . -``; not
                ``manifest``/``config``.
            config_yaml: the resolved run config, stored as ``config.yaml``.
            plain: name -> JSON-serialisable data (replicated, rank 0's copy),
                stored as ``{name}.json`` and loaded with ``json``.
            attachments: checkpoint-relative file name (``dir/file`` at most one
                level deep) -> source file to copy or bytes to write (rank 0's);
                listed in the manifest like every file, never loaded by :meth:`load`
                (e.g. the tokenizer files, :mod:`nemo_gdro.trainer.hf_assets`).

        Returns:
            The final checkpoint directory.

        Distributed (``world_size > 1``): every rank calls ``save`` collectively.
        ``components`` must be identical on every rank (replicated state); rank
        0's copy is written. ``per_rank`` holds this rank's own shards (for
        example its slice of the per-prompt store); they are gathered to rank 0,
        which alone writes the directory (``{name}.rankRRRRR-of-WWWWW.pt`` per
        rank) with the same atomic protocol, then all ranks pass a barrier.

        Checkpoints with a larger step than ``step`` belong to an abandoned
        timeline (the run was resumed from an older checkpoint); they are moved
        to ``root/abandoned/`` with a warning, so that ``latest()`` keeps
        following this run. Nothing is deleted except by rotation.
        """
        per_rank = dict(per_rank or {})
        plain = dict(plain or {})
        overlap = sorted((set(per_rank) & set(components)) | (set(plain) & (set(components) | set(per_rank))))
        if overlap:
            raise ValueError(f"checkpoint components {overlap} are given both as shared and per-rank")
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError(
                    f"CheckpointManager(world_size={self.world_size}).save needs an initialised torch.distributed"
                )
            gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(per_rank, gathered, dst=0, group=group)
            final = self.step_dir(step)
            if self.rank == 0:
                assert gathered is not None
                error = None
                try:
                    final = self._save_files(step, components, config_yaml, gathered, plain, attachments)
                except BaseException as err:  # noqa: BLE001 - shared with every rank below
                    error = err
            else:
                error = None
            # Every rank learns whether rank 0 published the checkpoint, so that
            # none waits in a barrier for a writer that failed (e.g. a full disk).
            box: list[Any] = [None if error is None else (type(error).__name__, str(error), is_disk_full(error))]
            dist.broadcast_object_list(box, src=0, group=group)
            if self.rank == 0 and error is not None:
                raise error
            if box[0] is not None:
                kind, message, full = box[0]
                raise (DiskFullError if full or kind == "DiskFullError" else CheckpointError)(
                    f"rank 0 could not write the checkpoint: {message}"
                )
            return final
        return self._save_files(step, components, config_yaml, [per_rank], plain, attachments)

    def _save_files(
        self,
        step: int,
        components: dict[str, Any],
        config_yaml: str | None,
        shards: list[dict[str, Any]],
        plain: dict[str, Any] | None = None,
        attachments: dict[str, Path | bytes] | None = None,
    ) -> Path:
        """Single writer: publish ``components`` and every rank's ``shards`` atomically."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
        plain = dict(plain or {})
        if not isinstance(components, dict) or not (components or plain):
            raise ValueError("checkpoint components must be a non-empty dict name -> object")
        for name in list(components) + list(shards[0]) + list(plain):
            if not isinstance(name, str) or not _COMPONENT_NAME_RE.match(name) or name in _RESERVED_NAMES:
                raise ValueError(
                    f"checkpoint component name {name!r} is invalid: use letters, digits, '_', '.', '-' "
                    f"and not one of {sorted(_RESERVED_NAMES)}"
                )
        if config_yaml is not None and not isinstance(config_yaml, str):
            raise TypeError(f"config_yaml must be a str or None, got {type(config_yaml).__name__}")
        attachments = dict(attachments or {})
        for name in attachments:
            if not isinstance(name, str) or not _ATTACHMENT_NAME_RE.match(name):
                raise ValueError(f"checkpoint attachment name {name!r} is invalid: use 'file' or 'dir/file' "
                                 "(letters, digits, '_', '.', '-')")

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._write_error(err, step, None) from None
        self._cleanup_side_dirs()

        tmp = self.root / f"{_TMP_PREFIX}{step:08d}_{os.getpid()}"
        if tmp.exists():  # pragma: no cover - a previous save of this process crashed mid-way
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            files: dict[str, dict[str, Any]] = {}
            comp_files: dict[str, str] = {}
            plain_files: dict[str, str] = {}
            for name, obj in components.items():
                fname = f"{name}.pt"
                files[fname] = _torch_save_synced(obj, tmp / fname)
                comp_files[name] = fname
            for name, obj in plain.items():
                fname = f"{name}.json"
                files[fname] = _json_save_synced(obj, tmp / fname)
                plain_files[name] = fname
            sharded: dict[str, list[str]] = {}
            world = len(shards)
            for rank, rank_shards in enumerate(shards):
                if set(rank_shards) != set(shards[0]):
                    raise ValueError(
                        f"rank {rank} passed per-rank components {sorted(rank_shards)}, rank 0 {sorted(shards[0])}"
                    )
                for name, obj in rank_shards.items():
                    fname = shard_file_name(name, rank, world) if world > 1 else f"{name}.shard.pt"
                    files[fname] = _torch_save_synced(obj, tmp / fname)
                    sharded.setdefault(name, []).append(fname)
            if config_yaml is not None:
                files[CONFIG_NAME] = _write_bytes_synced(tmp / CONFIG_NAME, config_yaml.encode("utf-8"))
            for name, source in sorted(attachments.items()):
                if name in files:
                    raise ValueError(f"checkpoint attachment {name!r} collides with a component file")
                (tmp / name).parent.mkdir(exist_ok=True)
                data = source if isinstance(source, bytes) else Path(source).read_bytes()
                files[name] = _write_bytes_synced(tmp / name, data)
            for sub in {(tmp / name).parent for name in attachments} - {tmp}:
                _fsync_dir(sub)
            manifest = {
                "format_version": MANIFEST_FORMAT_VERSION,
                "step": step,
                "world_size": self.world_size,
                "created_unix_s": time.time(),
                "components": comp_files,
                "plain": plain_files,
                "sharded": sharded,
                "attachments": sorted(attachments),
                "files": files,
            }
            # The manifest is the commit record of the dir's content: written
            # last, so its presence implies every file above is complete.
            _write_bytes_synced(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
            _fsync_dir(tmp)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and (is_disk_full(err) or isinstance(err, PermissionError)):
                raise self._write_error(err, step, tmp) from None
            raise

        self._move_abandoned(step)
        final = self.step_dir(step)
        if final.exists():
            # POSIX cannot rename a dir over a non-empty dir; move the old copy
            # aside first. If we die between the two renames, latest() still
            # finds the old copy (see _OLD_PREFIX) and the next save restores it.
            old = self.root / f"{_OLD_PREFIX}{step:08d}_{os.getpid()}"
            if old.exists():  # pragma: no cover - leftover of a crash of this very pid
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_dir(self.root)
        self._rotate(just_written=final)
        return final

    def _write_error(self, err: BaseException, step: int, tmp: Path | None) -> CheckpointError:
        """The one-line error for a checkpoint that could not be written (nothing was published)."""
        kept = [p for _, p in self._step_dirs()]
        keep = f"the previous checkpoint {kept[0]} is kept" if kept else "no earlier checkpoint exists"
        if is_disk_full(err):
            return DiskFullError(
                f"no space left on device at {self.root} while writing checkpoint step {step} "
                f"({_fmt_bytes(free_bytes(self.root))} free); {keep}. Free space (or lower "
                "trainer.keep_last_checkpoints) and run again with run.resume=auto"
            )
        return CheckpointError(f"cannot write checkpoint step {step} under {self.root}: {err}; {keep}")

    def _cleanup_side_dirs(self) -> None:
        """Remove leftover temp dirs; restore or drop dirs displaced by an interrupted re-save."""
        for _, p in self._side_dirs(_TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        for step, p in self._side_dirs(_OLD_PREFIX):
            final = self.step_dir(step)
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)
        _fsync_dir(self.root)

    def _move_abandoned(self, step: int) -> None:
        newer = [(s, p) for s, p in self._step_dirs() if s > step]
        if not newer:
            return
        dest_root = self.root / "abandoned"
        dest_root.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for s, p in newer:
            dest = dest_root / f"{p.name}.{stamp}_{os.getpid()}"
            warnings.warn(
                f"checkpoint {p} has a larger step ({s}) than the one being saved ({step}); it belongs to an "
                f"abandoned timeline and is moved to {dest} so that resume='auto' follows this run",
                stacklevel=3,
            )
            os.replace(p, dest)
        _fsync_dir(self.root)

    def _rotate(self, just_written: Path) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; delete older dirs.

        "Complete" here is a stat-only check (manifest present, every file with
        its recorded size): re-hashing every kept checkpoint on each save would
        read hundreds of GB for large models.
        """
        kept: list[Path] = [just_written]
        for _, p in self._step_dirs():
            if len(kept) >= self.keep_last:
                break
            if p == just_written:
                continue
            try:
                verify_checkpoint(p, check_hashes=False)
            except CheckpointError:
                continue
            kept.append(p)
        oldest_kept = min(self.step_of(p) for p in kept)
        for s, p in self._step_dirs():
            if s < oldest_kept and p not in kept:
                shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- lookup
    def list_checkpoints(self) -> list[Path]:
        """All final checkpoint dirs (not verified), oldest step first."""
        return [p for _, p in reversed(self._step_dirs())]

    def latest(self) -> Path | None:
        """Newest checkpoint whose files all match the manifest (size and sha256), or None.

        Corrupt or partial dirs are skipped with a ``warnings.warn`` naming the
        dir and the reason; leftover temp dirs are reported and ignored. Cost:
        re-hashes the files of the checkpoints it inspects.
        """
        return next(self.candidates(), None)

    def candidates(self) -> Iterator[Path]:
        """Verified checkpoints, newest step first (lazily: each is re-hashed when reached).

        What :meth:`latest` returns first; a caller that finds the newest one
        unusable (it does not load) moves on to the next.
        """
        for _, p in self._side_dirs(_TMP_PREFIX):
            warnings.warn(f"ignoring {p}: leftover temp dir of an interrupted checkpoint save", stacklevel=2)
        candidates = self._step_dirs()
        finals = {s for s, _ in candidates}
        for s, p in self._side_dirs(_OLD_PREFIX):
            if s not in finals:
                candidates.append((s, p))
        candidates.sort(key=lambda t: (t[0], not t[1].name.startswith(_OLD_PREFIX)), reverse=True)
        for _, p in candidates:
            try:
                verify_checkpoint(p)
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint {p}: {e}", stacklevel=2)
                continue
            if p.name.startswith(_OLD_PREFIX):
                warnings.warn(
                    f"using {p}: the only copy of its step after an interrupted re-save "
                    "(the next save moves it back into place)",
                    stacklevel=2,
                )
            yield p

    def resolve_resume(self, resume: str | Path | None) -> Path | None:
        """Turn the ``resume`` config value into a checkpoint dir.

        ``None``/``"none"`` -> None (fresh run); ``"auto"`` -> :meth:`latest`
        (None when nothing valid exists); anything else is a path that must be
        a valid checkpoint dir, else :class:`CheckpointError` explaining why.
        """
        if resume is None:
            return None
        if isinstance(resume, str):
            key = resume.strip()
            if key.lower() in ("none", "null", ""):
                return None
            if key.lower() == "auto":
                return self.latest()
        path = Path(resume).expanduser()
        if not path.exists():
            raise ResumePathError(
                f"run.resume={str(resume)!r}: no such checkpoint directory (allowed: auto, null, or a "
                "checkpoints/step_XXXXXXXX directory)"
            )
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            hint = ""
            if path.is_dir() and any(_STEP_DIR_RE.match(c.name) for c in path.iterdir()):
                hint = f" ({path} holds step_XXXXXXXX checkpoints: pass one of them, or resume='auto')"
            raise ResumePathError(f"run.resume={str(resume)!r} is not a valid checkpoint: {e}{hint}") from e
        return path

    # ------------------------------------------------------------------ load
    def load(self, path: Path | str, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
        """Verify ``path`` against its manifest, then load every component.

        Returns:
            name -> object as passed to :meth:`save` (tensors on
            ``map_location``); a per-rank component comes back as the list of
            every rank's shard, in rank order, whatever the world size of the
            saving run was (the caller reshards).

        Raises:
            CheckpointError: naming the file that is missing or does not match.
        """
        path = Path(path)
        manifest = verify_checkpoint(path)
        out: dict[str, Any] = {}
        for name, fnames in manifest.get("sharded", {}).items():
            out[name] = [self._load_file(path, fname, map_location) for fname in fnames]
        for name, fname in manifest["components"].items():
            out[name] = self._load_file(path, fname, map_location)
        for name, fname in manifest.get("plain", {}).items():
            out[name] = self._load_file(path, fname, map_location)
        return out

    @staticmethod
    def _load_file(path: Path, fname: str, map_location: Any) -> Any:
        """One file: JSON for plain data, ``torch.load(weights_only=True)`` for tensors (never unpickles objects)."""
        fpath = path / fname
        if fname.endswith(".json"):
            try:
                return json.loads(fpath.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{fpath}: cannot be loaded ({type(e).__name__}: {e})") from e
        try:
            return torch.load(fpath, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            reason = next((ln.strip() for ln in first if "Unsupported" in ln or "GLOBAL" in ln), first[0] if first else "")
            raise CheckpointError(
                f"{fpath}: refused: the file holds pickled objects other than tensors and plain containers "
                f"({reason[:200]}); checkpoints are loaded with torch.load(weights_only=True) so that a file "
                "cannot run code"
            ) from None
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"{fpath}: cannot be loaded ({type(e).__name__}: {e})") from e

    @staticmethod
    def read_config(path: Path | str) -> str | None:
        """The ``config.yaml`` text stored with a checkpoint, or None if it has none."""
        cpath = Path(path) / CONFIG_NAME
        return cpath.read_text(encoding="utf-8") if cpath.is_file() else None


# --------------------------------------------------------------------------- #
# RNG state
# --------------------------------------------------------------------------- #


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global RNGs: Python ``random``, numpy's global, torch CPU and (if available) CUDA.

    Explicit ``torch.Generator`` objects owned by controllers are *not* covered:
    they are part of those controllers' ``state_dict``.
    """
    np_state = np.random.get_state(legacy=False)
    # Tensors and plain values only, so that the state loads with weights_only=True.
    numpy = {
        "bit_generator": str(np_state["bit_generator"]),
        "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
        "pos": int(np_state["state"]["pos"]),
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy,
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`capture_rng_state` snapshot so the next draws repeat.

    Raises:
        KeyError: a required entry is missing (names it).
    """
    missing = [k for k in ("python", "numpy", "torch_cpu") if k not in state]
    if missing:
        raise KeyError(f"restore_rng_state: missing entries {missing} (have {sorted(state)})")
    py = state["python"]
    # torch.save/load round-trips the tuple but a JSON/YAML detour turns it into lists.
    if isinstance(py, list):
        py = (py[0], tuple(py[1]), py[2])
    random.setstate(py)
    np_state = state["numpy"]
    if "key" in np_state:  # the tensor form written by capture_rng_state
        np_state = {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.asarray(torch.as_tensor(np_state["key"]).numpy(), dtype=np.uint32),
                      "pos": int(np_state["pos"])},
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    np.random.set_state(np_state)
    torch.set_rng_state(torch.as_tensor(state["torch_cpu"], dtype=torch.uint8).cpu())
    cuda = state.get("torch_cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn("restore_rng_state: checkpoint has CUDA RNG state but CUDA is unavailable; skipped",
                          stacklevel=2)
        elif len(cuda) != torch.cuda.device_count():
            warnings.warn(
                f"restore_rng_state: checkpoint has {len(cuda)} CUDA RNG states but {torch.cuda.device_count()} "
                "devices are visible; CUDA RNG not restored",
                stacklevel=2,
            )
        else:
            torch.cuda.set_rng_state_all(cuda)
