"""Load Hugging Face weights straight into each rank's TP/PP shard of a Megatron ``GPTModel``.

The source is a checkpoint directory (``model.safetensors``, or shards listed
by ``model.safetensors.index.json``) or an in-memory HF state dict. Every
rank reads the safetensors headers (names, shapes), validates them against
the spec, then reads only what its parameters need: its pipeline stage's
layers and, for TP-split tensors, its row/column range through
``safe_open(...).get_slice`` -- the full model is never materialised on one
rank. Values are cast to each parameter's dtype (bf16 or fp32) and device.

Errors name the file and the tensor: a missing shard file, a tensor the
spec expects but the checkpoint lacks, an unexpected tensor, a shape that
does not match ``config.json`` (expected vs got). Under TP/PP the load is
collective over the model-parallel group at the end: if any rank failed,
every rank raises (so that no rank walks on into a collective alone).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import torch
import torch.distributed as dist

from nemo_gdro._optional import import_optional
from nemo_gdro.models.gpt import GPTSpec
from nemo_gdro.models.hf_mapping import (
    EMBEDDING,
    OUTPUT_LAYER,
    check_architecture,
    fuse_shard,
    hf_shapes,
    shard_bounds,
    tensor_maps,
)
from nemo_gdro.models.hf_preflight import IGNORED_TENSORS, SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from nemo_gdro.models.model_layout import (
    ModelLayout,
    check_partition,
    global_param_names,
    model_layout,
    unwrap,
)

__all__ = [
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "TensorSource",
    "SafetensorsDir",
    "StateDictSource",
    "open_source",
    "validate_source",
    "load_hf_weights",
]

LM_HEAD = "lm_head.weight"
_IGNORED = IGNORED_TENSORS

Bounds = tuple[int, int, int] | None  # (dim, start, stop) of a slice read, None = whole tensor


class TensorSource(Protocol):
    """Named tensors readable whole or by a slice along one dimension."""

    where: str  # what to name in errors about the source as a whole (a directory, an index file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape (from headers; nothing is read)."""
        ...

    def file_of(self, name: str) -> str:
        """The file holding ``name`` (for error messages)."""
        ...

    def read(self, name: str, bounds: Bounds = None) -> torch.Tensor:
        """Tensor ``name``, or its slice ``[start:stop]`` along ``dim`` (CPU, stored dtype)."""
        ...


class StateDictSource:
    """A full HF state dict in memory."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(state_dict)
        self.where = "HF state dict"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def file_of(self, name: str) -> str:
        return self.where

    def read(self, name: str, bounds: Bounds = None) -> torch.Tensor:
        tensor = self._tensors[name]
        if bounds is None:
            return tensor
        dim, start, stop = bounds
        return tensor.narrow(dim, start, stop - start)


class SafetensorsDir:
    """The safetensors weights of an HF checkpoint directory (open handles; use as a context manager).

    ``model.safetensors.index.json`` (its ``weight_map`` is authoritative,
    as for transformers) or a single ``*.safetensors`` file. Raises
    ``FileNotFoundError`` naming the directory or the missing shard file,
    ``KeyError`` naming a file and a tensor the index lists but the file
    lacks, ``ValueError`` naming a malformed index or shard file.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        safe_open = import_optional("safetensors", "hf", "reading HF checkpoints").safe_open
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.directory} does not exist")
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        index = self.directory / SAFETENSORS_INDEX
        try:
            if index.is_file():
                self.where = str(index)
                weight_map = self._read_index(index)
                files = {f: [n for n, g in weight_map.items() if g == f] for f in dict.fromkeys(weight_map.values())}
            else:
                self.where = str(self.directory)
                found = sorted(p.name for p in self.directory.glob("*.safetensors"))
                if not found:
                    others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                        p.name for p in self.directory.glob("*.pt")
                    )
                    hint = f" (found {others}: only safetensors checkpoints are supported)" if others else ""
                    raise FileNotFoundError(
                        f"{self.directory}: no {SAFETENSORS_SINGLE} and no {SAFETENSORS_INDEX}{hint}"
                    )
                if len(found) > 1:
                    raise FileNotFoundError(
                        f"{self.directory}: {len(found)} *.safetensors files ({found}) but no {SAFETENSORS_INDEX} "
                        "saying which tensors each holds"
                    )
                files = {found[0]: None}
            for fname, listed in files.items():
                path = self.directory / fname
                if not path.is_file():
                    first = listed[0] if listed else "?"
                    raise FileNotFoundError(
                        f"{index}: weight_map lists shard {fname!r} (e.g. for tensor {first!r}), "
                        f"but {path} does not exist"
                    )
                try:
                    handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
                    raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
                self._handles[fname] = handle
                keys = set(handle.keys())
                names = listed if listed is not None else sorted(keys)
                for name in names:
                    if name not in keys:
                        raise KeyError(f"{path}: tensor {name!r} is listed in {index.name} but not in the file")
                    self._file_of[name] = fname
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())
        except BaseException:
            self._stack.close()
            raise

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{index}: not valid JSON ({exc})") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f"{index}: key 'weight_map' must map tensor names to shard file names")
        return weight_map

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def file_of(self, name: str) -> str:
        return str(self.directory / self._file_of[name])

    def read(self, name: str, bounds: Bounds = None) -> torch.Tensor:
        handle = self._handles[self._file_of[name]]
        try:
            if bounds is None:
                return handle.get_tensor(name)
            dim, start, stop = bounds
            return handle.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
        except Exception as exc:  # truncated file, I/O error
            raise ValueError(f"{self.file_of(name)}: cannot read tensor {name!r} ({exc})") from exc

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def open_source(source: str | os.PathLike | Mapping[str, torch.Tensor] | TensorSource) -> Iterator[TensorSource]:
    """A :class:`TensorSource` for a directory, a state dict or an existing source (closed on exit)."""
    if isinstance(source, (str, os.PathLike)):
        with SafetensorsDir(source) as src:
            yield src
    elif isinstance(source, Mapping):
        yield StateDictSource(source)
    else:
        yield source


def _names_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_source(spec: GPTSpec, source: TensorSource) -> None:
    """Check that ``source`` holds exactly the tensors of ``spec`` with the right shapes.

    A tied spec accepts an ``lm_head.weight`` of the embedding's shape (HF
    state dicts of tied models often carry it; its values are checked when
    loading). Raises ``KeyError`` (missing / unexpected tensors) or
    ``ValueError`` (shape, expected vs got), naming the file and the tensor.
    """
    expected = hf_shapes(spec)
    if spec.tie_word_embeddings:
        expected_optional = {LM_HEAD: expected["model.embed_tokens.weight"]}
    else:
        expected_optional = {}
    given = {k: v for k, v in source.shapes().items() if not _IGNORED.search(k)}
    missing = [k for k in expected if k not in given]
    if missing:
        raise KeyError(
            f"{source.where}: missing tensor(s) {_names_list(missing)} (e.g. {missing[0]!r} of shape "
            f"{expected[missing[0]]}) required by the {spec.hf_architecture} model of config.json"
        )
    unexpected = [k for k in given if k not in expected and k not in expected_optional]
    if unexpected:
        first = unexpected[0]
        raise KeyError(
            f"{source.file_of(first)}: unexpected tensor(s) {_names_list(unexpected)} (e.g. {first!r} of shape "
            f"{given[first]}) not in the {spec.hf_architecture} model of config.json"
        )
    for name, got in given.items():
        want = expected.get(name, expected_optional.get(name))
        if tuple(got) != tuple(want):
            raise ValueError(
                f"{source.file_of(name)}: tensor {name!r} has shape {tuple(got)}, expected {tuple(want)} "
                "from config.json"
            )


def _raise_if_any_failed(error: BaseException | None, layout: ModelLayout) -> None:
    """Raise on every model-parallel rank if any of them failed (a rank that failed re-raises its own)."""
    if layout.distributed and dist.is_initialized():
        messages: list[Any] = [None] * len(layout.mp_ranks)
        dist.all_gather_object(
            messages, None if error is None else f"{type(error).__name__}: {error}", group=layout.mp_group
        )
        if error is None:
            for rank, message in zip(layout.mp_ranks, messages, strict=True):
                if message is not None:
                    raise RuntimeError(f"loading HF weights failed on rank {rank}: {message}")
    if error is not None:
        raise error


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module,
    spec: GPTSpec,
    source: str | os.PathLike | Mapping[str, torch.Tensor] | TensorSource,
) -> None:
    """Copy HF weights into this rank's shard of ``model`` in place (any TP/PP layout).

    Args:
        model: a Megatron ``GPTModel`` (possibly DDP-wrapped) built for ``spec``
            on the current parallel state.
        spec: the architecture (e.g. from :func:`nemo_gdro.models.hf_config.spec_from_hf_config`).
        source: an HF checkpoint directory, a full HF state dict, or a :class:`TensorSource`.

    Every rank of the model-parallel group calls this; each reads only its
    slices (its layers, its TP range). With tied embeddings an
    ``lm_head.weight`` in the source must equal ``model.embed_tokens.weight``
    (each embedding-holding rank compares its vocabulary slice), and a last
    pipeline stage's copy of the embedding is loaded from the embedding.
    Optimizer state (e.g. fp32 master copies of bf16 weights) is not touched.
    """
    module = unwrap(model)
    layout = model_layout(module)
    error: BaseException | None = None
    try:
        check_architecture(spec)
        with open_source(source) as src:
            validate_source(spec, src)
            _load_shard(module, spec, src, layout)
    except Exception as exc:  # re-raised below, on every rank
        error = exc
    _raise_if_any_failed(error, layout)


def _load_shard(module: torch.nn.Module, spec: GPTSpec, src: TensorSource, layout: ModelLayout) -> None:
    maps = {tm.megatron: tm for tm in tensor_maps(spec)}
    names = global_param_names(module)
    tied_head = spec.tie_word_embeddings and LM_HEAD in src.shapes()
    for name, param in module.named_parameters():
        global_name = names[name]
        if spec.tie_word_embeddings and global_name == OUTPUT_LAYER:
            global_name = EMBEDDING  # the last stage's copy of the tied embedding
        tm = maps.get(global_name)
        if tm is None:
            raise KeyError(f"Megatron parameter {name!r} ({global_name!r}) has no HF counterpart")
        check_partition(name, param, tm.tp_dim, layout.tp_size)
        bounds = shard_bounds(tm, spec, layout.tp_rank, layout.tp_size)
        parts = [src.read(hf_name, b) for hf_name, b in zip(tm.hf, bounds, strict=True)]
        value = fuse_shard(tm, parts, spec, layout.tp_size)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"Megatron parameter {name!r} has shape {tuple(param.shape)}, but {list(tm.hf)} give "
                f"{tuple(value.shape)}"
            )
        if tied_head and name == EMBEDDING:
            head = src.read(LM_HEAD, bounds[0])
            if not torch.equal(head.to(value.dtype), value):
                raise ValueError(
                    f"{src.file_of(LM_HEAD)}: tensor {LM_HEAD!r} differs from 'model.embed_tokens.weight' "
                    "but config.json has tie_word_embeddings=true"
                )
        param.copy_(value.to(dtype=param.dtype, device=param.device))
