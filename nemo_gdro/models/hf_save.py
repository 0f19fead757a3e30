"""Write a Hugging Face checkpoint directory, atomically, from a stream of full HF tensors.

Layout written (what ``transformers.AutoModelForCausalLM.from_pretrained``
and vLLM load)::

    model-00001-of-0000N.safetensors ...   (or model.safetensors when N = 1)
    model.safetensors.index.json           (when N > 1: total_size, weight_map)
    config.json                            (from the spec, in the dtype written)
    generation_config.json                 (copied from a source, or built from eos/bos/pad ids)
    tokenizer files                        (copied from a tokenizer directory)

The shard plan is fixed up front from the spec (names, shapes, dtype), so
tensors can be written as they arrive: the writer holds at most one shard's
tensors. Everything goes to a private temp directory next to the target;
each file is fsynced, then the directory, then it is renamed into place. An
existing target is moved aside only once the new directory is complete and
removed after the rename, so a failure at any point leaves the old
directory (or, in the instant between the two renames, ``.old_<name>_<pid>``).
Only an empty directory or an HF checkpoint (nothing but its files) is ever
replaced: anything else in the way is a ``FileExistsError`` and stays untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from nemo_gdro._optional import import_optional
from nemo_gdro.models.gpt import GPTSpec
from nemo_gdro.models.hf_export import iter_hf_tensors
from nemo_gdro.models.hf_export_marker import EXPORT_MARKER, TOKENIZER_FILES, foreign_entries, replaceable_hf_dir
from nemo_gdro.models.hf_mapping import hf_config, hf_shapes
from nemo_gdro.models.hf_weights import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from nemo_gdro.models.model_layout import model_layout, unwrap

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "GENERATION_CONFIG_NAME",
    "TOKENIZER_FILES",
    "HFMetadata",
    "atomic_directory",
    "plan_shards",
    "hf_config_json",
    "check_replaceable",
    "write_hf_dir",
    "save_hf_checkpoint",
]

#: 5 GB (decimal, as the HF hub's shards): large enough for few files, small enough to stream.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass(frozen=True)
class HFMetadata:
    """What is written next to the weights.

    Attributes:
        tokenizer_dir: directory whose tokenizer files (:data:`TOKENIZER_FILES`) are copied.
        generation_config_source: ``generation_config.json`` or a directory holding one,
            copied as is; if ``None`` one is built from the token ids below
            (none is written when ``eos_token_id`` is ``None`` too).
        eos_token_id: id or ids generation stops on (Qwen3-Base: ``(151643, 151645)``).
        bos_token_id, pad_token_id: written to ``config.json`` (and a built generation config).
    """

    tokenizer_dir: str | os.PathLike | None = None
    generation_config_source: str | os.PathLike | None = None
    eos_token_id: int | Sequence[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def validate(self) -> None:
        """Fail (naming the path) before anything is written if a source is missing."""
        if self.tokenizer_dir is not None:
            tok = Path(self.tokenizer_dir)
            if not tok.is_dir():
                raise FileNotFoundError(f"tokenizer directory {tok} does not exist")
            if not any((tok / name).is_file() for name in TOKENIZER_FILES):
                raise FileNotFoundError(f"{tok}: holds none of the tokenizer files {list(TOKENIZER_FILES)}")
        if self.generation_config_source is not None:
            path = self._generation_config_path()
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (generation_config_source)")
            try:
                json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc

    def _generation_config_path(self) -> Path:
        path = Path(self.generation_config_source)  # type: ignore[arg-type]
        return path / GENERATION_CONFIG_NAME if path.is_dir() else path

    def token_ids(self) -> dict[str, Any]:
        eos = self.eos_token_id
        ids: dict[str, Any] = {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, Sequence) else eos,
            "pad_token_id": self.pad_token_id,
        }
        return {k: v for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------------------- file helpers
def _fsync_path(path: Path) -> None:
    """fsync a file or directory (directory fsync makes renames/creations inside it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    _fsync_path(dst)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory that replaces ``target`` when the block completes.

    On an exception the temp directory is removed and ``target`` (if any) is
    left as it was. One writer per target is assumed.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp_{target.name}_{os.getpid()}"
    old = parent / f".old_{target.name}_{os.getpid()}"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    moved_old = False
    try:
        yield tmp
        _fsync_path(tmp)
        if target.exists():
            os.replace(target, old)
            moved_old = True
        os.replace(tmp, target)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not target.exists():
            os.replace(old, target)  # the new directory never made it: put the old one back
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)


def plan_shards(shapes: Mapping[str, Sequence[int]], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names (in order) into shards of at most ``max_shard_bytes`` each.

    Greedy in order; a tensor larger than the limit gets a shard of its own.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def hf_config_json(spec: GPTSpec, dtype: torch.dtype, metadata: HFMetadata | None = None) -> str:
    """``config.json`` text for ``spec`` stored in ``dtype``, with the token ids of ``metadata``."""
    config = hf_config(spec, dtype)
    ids = (metadata or HFMetadata()).token_ids()
    for key in ("bos_token_id", "pad_token_id"):
        if key in ids:
            setattr(config, key, ids[key])
    if "eos_token_id" in ids:
        eos = ids["eos_token_id"]
        # config.json carries the model's own end token; the generation config lists all stop ids.
        config.eos_token_id = eos[0] if isinstance(eos, list) else eos
    return config.to_json_string(use_diff=True)


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file = import_optional("safetensors.torch", "hf", "writing HF checkpoints").save_file
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file 0600; a checkpoint on a shared filesystem should follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    _fsync_path(path)


def check_replaceable(out_dir: str | os.PathLike) -> None:
    """Refuse (``FileExistsError``, naming what is in the way) a target that is neither
    absent, an empty directory, nor an HF checkpoint holding nothing but its files."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not replaceable_hf_dir(out):
        found = foreign_entries(out) or ["no config.json"]
        raise FileExistsError(
            f"{out} is not empty and is not an HF checkpoint directory ({', '.join(found[:5])}"
            f"{', ...' if len(found) > 5 else ''}): refusing to replace it"
        )


def write_hf_dir(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    spec: GPTSpec,
    *,
    dtype: torch.dtype,
    metadata: HFMetadata | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write an HF checkpoint directory from ``(hf_name, full_tensor)`` pairs (single process).

    Args:
        out_dir: target directory; an existing one is replaced atomically if it
            is empty or an HF checkpoint and nothing else (see :func:`check_replaceable`).
        tensors: every HF tensor of ``spec`` exactly once, in any order (in
            :func:`nemo_gdro.models.hf_mapping.hf_key_names` order the writer
            holds only one shard at a time), e.g. :func:`iter_hf_tensors` or
            ``hf_state_dict.items()``.
        spec: the architecture (``config.json`` and the shard plan).
        dtype: dtype the weights are stored in (cast on the fly) and ``config.json``'s ``dtype``.
        metadata: tokenizer / generation config / token ids to write alongside.
        max_shard_bytes: shard size limit in bytes.
        provenance: written as :data:`EXPORT_MARKER` (JSON) when given: where
            the weights came from, the tokenizer and task they were trained with.
    Returns:
        ``out_dir`` as a ``Path``.
    Raises ``ValueError`` naming a tensor that is unexpected, repeated or of the
    wrong shape, ``KeyError`` naming tensors that never arrived,
    ``FileExistsError`` when ``out_dir`` holds anything but an HF checkpoint.
    """
    check_replaceable(out_dir)
    metadata = metadata or HFMetadata()
    metadata.validate()
    shapes = hf_shapes(spec)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_shards(shapes, itemsize, max_shard_bytes)
    files = _shard_names(len(plan))
    with atomic_directory(out_dir) as tmp:
        pending: dict[str, torch.Tensor] = {}
        seen: set[str] = set()
        next_shard = 0
        for name, tensor in tensors:
            if name not in shapes:
                raise ValueError(f"unexpected tensor {name!r} for the {spec.hf_architecture} spec")
            if name in seen:
                raise ValueError(f"tensor {name!r} given twice")
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
            seen.add(name)
            pending[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            while next_shard < len(plan) and all(n in pending for n in plan[next_shard]):
                _save_shard(tmp / files[next_shard], {n: pending.pop(n) for n in plan[next_shard]})
                next_shard += 1
        missing = [n for n in shapes if n not in seen]
        if missing:
            raise KeyError(f"tensor(s) {missing[:8]} never arrived ({len(missing)} missing)")
        if len(plan) > 1:
            index = {
                "metadata": {"total_size": sum(itemsize * torch.Size(s).numel() for s in shapes.values())},
                "weight_map": {n: files[i] for i, names in enumerate(plan) for n in names},
            }
            _write_text(tmp / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
        _write_text(tmp / "config.json", hf_config_json(spec, dtype, metadata))
        if metadata.generation_config_source is not None:
            _copy_file(metadata._generation_config_path(), tmp / GENERATION_CONFIG_NAME)
        elif metadata.eos_token_id is not None:
            _write_text(tmp / GENERATION_CONFIG_NAME, json.dumps(metadata.token_ids(), indent=2) + "\n")
        if metadata.tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(metadata.tokenizer_dir) / fname
                if src.is_file():
                    _copy_file(src, tmp / fname)
        if provenance is not None:
            _write_text(tmp / EXPORT_MARKER, json.dumps(dict(provenance), indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def save_hf_checkpoint(
    model: torch.nn.Module,
    spec: GPTSpec,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: HFMetadata | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    writer_rank: int = 0,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Export a live Megatron ``GPTModel`` (any TP/PP/DP layout) as an HF checkpoint directory.

    Collective over the whole job: the model-parallel group holding
    ``writer_rank`` streams the weights to it (:func:`iter_hf_tensors` with
    ``dst=writer_rank``) and that rank writes (:func:`write_hf_dir`); other
    data-parallel replicas only wait. Returns on every rank once the
    directory is complete; if writing failed anywhere, every rank raises.

    Args:
        dtype: stored dtype (default: the model's parameter dtype).
        metadata, max_shard_bytes, provenance: see :func:`write_hf_dir`.
    """
    metadata = metadata or HFMetadata()
    metadata.validate()  # every rank: the same deterministic check, so all raise together
    module = unwrap(model)
    dtype = dtype or next(module.parameters()).dtype
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        stream = ((n, t) for n, t in iter_hf_tensors(module, spec, dtype=dtype) if t is not None)
        return write_hf_dir(
            out_dir, stream, spec, dtype=dtype, metadata=metadata, max_shard_bytes=max_shard_bytes, provenance=provenance
        )
    layout = model_layout(module)
    rank = dist.get_rank()
    error: BaseException | None = None
    if writer_rank in layout.mp_ranks:
        stream = iter_hf_tensors(module, spec, dst=writer_rank, dtype=dtype)
        try:
            if rank == writer_rank:
                received = ((n, t) for n, t in stream if t is not None)
                write_hf_dir(
                    out_dir, received, spec, dtype=dtype, metadata=metadata, max_shard_bytes=max_shard_bytes,
                    provenance=provenance,
                )
            else:
                for _ in stream:
                    pass
        except Exception as exc:
            error = exc
            # Keep the other ranks' collectives matched: run the rest of the stream.
            with contextlib.suppress(Exception):
                for _ in stream:
                    pass
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for other, message in enumerate(messages):
        if message is not None:
            raise RuntimeError(f"writing the HF checkpoint {out_dir} failed on rank {other}: {message}")
    return Path(out_dir)
