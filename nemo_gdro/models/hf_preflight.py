"""A Hugging Face checkpoint directory checked before anything is built: no torch, headers only.

What ``model=hf model.path=DIR`` (and ``tokenizer.name=hf``) needs of ``DIR``,
checked in well under a second, so that a damaged or incomplete download is
one :class:`~nemo_gdro.typed_config.ConfigError` naming the file and the
tensor instead of a loader traceback after the data and the model are built:

* ``config.json`` describing a supported architecture
  (:func:`~nemo_gdro.models.hf_config.spec_from_hf_config`);
* the weights: ``model.safetensors.index.json`` (valid JSON, a ``weight_map``
  of tensor name -> shard file in ``DIR``) and every shard it names, or one
  ``*.safetensors`` file;
* each shard's header (8-byte little-endian length, then a JSON object of
  ``name -> {dtype, shape, data_offsets}``): known dtypes, offsets that tile
  the data exactly with ``numel * itemsize`` bytes per tensor, and a file size
  of exactly ``8 + header length + last offset`` (a truncated copy fails
  here); the tensors the index puts in a shard must be in its header;
* the tensor names and shapes against the architecture's table
  (:func:`~nemo_gdro.models.hf_table.hf_shapes`, the loader's table), and
  floating-point dtypes (the loader casts them to ``model.dtype``);
* with ``tokenizer.name=hf``, the tokenizer files (``tokenizer.json``, or
  ``vocab.json`` + ``merges.txt``, or ``tokenizer.model``).

Only the headers are read: no tensor data, whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_gdro.models.hf_config import CONFIG_NAME, HFConfigError, spec_from_hf_config
from nemo_gdro.models.hf_table import hf_shapes
from nemo_gdro.models.spec import GPTSpec
from nemo_gdro.typed_config import ConfigError

__all__ = [
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "IGNORED_TENSORS",
    "WEIGHT_DTYPES",
    "TOKENIZER_FILE_SETS",
    "TensorHeader",
    "read_safetensors_header",
    "check_hf_checkpoint",
    "tokenizer_files_problem",
    "check_tokenizer_files",
    "check_hf_inputs",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
#: Derived RoPE buffers some older transformers versions saved; never weights.
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
#: safetensors dtype -> bytes per element (the format's fixed-size dtypes).
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
#: Stored dtypes the loader takes (cast to ``model.dtype``); quantized and integer tensors are not weights it can use.
WEIGHT_DTYPES = ("BF16", "F16", "F32", "F64")
#: Any one of these sets of files makes a tokenizer ``transformers`` can load offline.
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
# safetensors' own bound on the header (a larger length field is garbage, not a header to read).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header (``data_offsets`` relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _listing(directory: Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return "?"
    return "[" + ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "") + "]"


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _tensors(names: list[str], first_shape: tuple[int, ...]) -> str:
    """``tensor 'a' of shape (..)`` or ``tensors 'a', 'b' and 3 more (e.g. 'a' of shape (..))``."""
    if len(names) == 1:
        return f"tensor {names[0]!r} of shape {tuple(first_shape)}"
    return f"tensors {_names(names)} (e.g. {names[0]!r} of shape {tuple(first_shape)})"


def _holding(listed: list[str] | None) -> str:
    """`` (holds 'x' ...)``: what the index says a broken shard holds, so the error names a tensor."""
    return f" (holds tensor {_names(listed, 2)} per {SAFETENSORS_INDEX})" if listed else ""


def _entry(path: Path, name: str, value: Any) -> TensorHeader:
    """One header entry, checked: a known dtype, a shape of ints >= 0, offsets matching its byte size."""
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= value.keys():
        raise ConfigError(f"{path}: tensor {name!r} has a malformed header entry {value!r} "
                          "(expected dtype, shape, data_offsets)")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ConfigError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (safetensors dtypes: "
                          f"{', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ConfigError(f"{path}: tensor {name!r} has a malformed shape {shape!r} in its header")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        raise ConfigError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r} in its header")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        raise ConfigError(
            f"{path}: tensor {name!r} is {dtype} of shape {tuple(shape)} ({numel * DTYPE_BYTES[dtype]} bytes) but "
            f"its data_offsets {offsets} span {offsets[1] - offsets[0]} bytes: the header is damaged"
        )
    return TensorHeader(dtype, tuple(shape), offsets[0], offsets[1])


def read_safetensors_header(path: str | os.PathLike, listed: list[str] | None = None) -> dict[str, TensorHeader]:
    """Tensor name -> :class:`TensorHeader` of a safetensors file, checked against the file's size.

    Reads the 8-byte length and the JSON header only. Args: ``listed``, the
    tensors an index puts in this file (named in errors about the file as a
    whole). Raises :class:`ConfigError` naming the file and, where there is
    one, the tensor: a file shorter than its header says (truncated), longer
    (trailing bytes), a damaged header, data offsets that overlap or leave gaps.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                  f"length){_holding(listed)}")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ConfigError(
                    f"{path}: truncated or not a safetensors file: its header length field says {header_len} bytes "
                    f"but the file has {size - 8} after it{_holding(listed)}"
                )
            raw = f.read(header_len)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err}){_holding(listed)}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: the safetensors header is not valid JSON ({err}){_holding(listed)}") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    tensors = {name: _entry(path, name, value) for name, value in header.items() if name != "__metadata__"}
    # The data section is tiled exactly, in offset order (what safetensors itself requires).
    ordered = sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    end = 0
    for name, t in ordered:
        if t.begin != end:
            what = "overlaps the previous tensor" if t.begin < end else f"leaves a gap of {t.begin - end} bytes"
            raise ConfigError(f"{path}: tensor {name!r} data_offsets [{t.begin}, {t.end}] {what}: the header is damaged")
        end = t.end
    expected = 8 + header_len + end
    if size < expected:
        cut = next(name for name, t in ordered if 8 + header_len + t.end > size)
        raise ConfigError(
            f"{path}: truncated: the file has {size} bytes but its header describes {expected}; tensor {cut!r} "
            "(and any after it) is cut off: copy or download the file again"
        )
    if size > expected:
        raise ConfigError(
            f"{path}: {size - expected} unexpected bytes after the last tensor (the header describes {expected} "
            f"bytes, the file has {size}): not a valid safetensors file{_holding(listed)}"
        )
    return tensors


def _read_index(index: Path, directory: Path) -> dict[str, str]:
    """``weight_map`` of the index: tensor name -> shard file name in ``directory``."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{index}: cannot read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{index}: not valid JSON ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index}: key 'weight_map' must be a non-empty object mapping tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise ConfigError(
                f"{index}: weight_map maps tensor {name!r} to {shard!r}, which is not a file name in {directory}"
            )
    return weight_map


def _weight_files(directory: Path, where: str) -> tuple[Path | None, dict[str, list[str] | None]]:
    """The index (or ``None``) and shard file -> the tensors the index puts there (``None``: no index).

    ``where``: what to call the directory (``model.path=DIR``)."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_index(index, directory)
        files: dict[str, list[str] | None] = {}
        for name, shard in weight_map.items():
            files.setdefault(shard, []).append(name)  # type: ignore[union-attr]
        for shard, listed in files.items():
            if not (directory / shard).is_file():
                raise ConfigError(
                    f"{index}: weight_map lists shard {shard!r} (e.g. for tensor {listed[0]!r}), "  # type: ignore[index]
                    f"but {directory / shard} does not exist: the download is incomplete"
                )
        return index, files
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if not found:
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = (f" (found {others}: only safetensors checkpoints are supported)" if others
                else f" (found {_listing(directory)})")
        raise ConfigError(f"{where}: no weights: no {SAFETENSORS_SINGLE} and no {SAFETENSORS_INDEX}{hint}")
    if len(found) > 1:
        raise ConfigError(
            f"{where}: {len(found)} *.safetensors files ({found}) but no {SAFETENSORS_INDEX} saying which "
            "tensors each holds"
        )
    return None, {found[0]: None}


def _check_tensors(spec: GPTSpec, directory: Path, names_file: Path,
                   tensors: dict[str, tuple[str, TensorHeader]], unlisted: dict[str, str]) -> None:
    """Names, shapes and dtypes against the table of ``spec`` (what the loader would check, and more).

    ``tensors``: name -> (shard file name, header entry); ``names_file``: the
    index (or the single weights file) that lists them; ``unlisted``: tensors
    a shard holds but the index does not list -> that shard's path.
    """
    expected = hf_shapes(spec)
    optional = {"lm_head.weight": expected["model.embed_tokens.weight"]} if spec.tie_word_embeddings else {}
    given = {name: v for name, v in tensors.items() if not IGNORED_TENSORS.search(name)}
    arch = f"the {spec.hf_architecture} model of {directory / CONFIG_NAME}"
    missing = [name for name in expected if name not in given]
    if missing:
        first = missing[0]
        hint = (f"; {unlisted[first]} holds {first!r} but {SAFETENSORS_INDEX} does not list it" if first in unlisted
                else "")
        raise ConfigError(
            f"{names_file}: missing {_tensors(missing, expected[first])} required by {arch}{hint}"
        )
    extra = [name for name in given if name not in expected and name not in optional]
    if extra:
        first = extra[0]
        raise ConfigError(
            f"{directory / given[first][0]}: unexpected {_tensors(extra, given[first][1].shape)} not in {arch}"
        )
    for name, (shard, t) in given.items():
        want = expected.get(name, optional.get(name))
        if t.shape != tuple(want):
            raise ConfigError(
                f"{directory / shard}: tensor {name!r} has shape {t.shape}, expected {tuple(want)} from "
                f"{directory / CONFIG_NAME}"
            )
    for name, (shard, t) in given.items():
        if t.dtype not in WEIGHT_DTYPES:
            quantized = " (quantized checkpoints are not supported)" if t.dtype.startswith("F8") else ""
            raise ConfigError(
                f"{directory / shard}: tensor {name!r} has dtype {t.dtype}; weights must be one of "
                f"{', '.join(WEIGHT_DTYPES)}{quantized}"
            )


def check_hf_checkpoint(path: str | os.PathLike, key: str = "model.path", *, weights: bool = True) -> GPTSpec:
    """Check an HF checkpoint directory's config and weights (headers only); returns its spec.

    Args:
        path: the directory.
        key: the config key that named it (for the messages about the directory itself).
        weights: also check the weights (``False``: a checkpoint's ``hf_assets`` copy, config only).
    Raises:
        ConfigError: one line naming the file and, where there is one, the tensor.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ConfigError(f"{key}={path}: no such directory (expected a Hugging Face checkpoint directory)")
    if not directory.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a Hugging Face checkpoint directory")
    if not (directory / CONFIG_NAME).is_file():
        raise ConfigError(
            f"{key}={path}: no {CONFIG_NAME} there (expected a Hugging Face checkpoint directory; found "
            f"{_listing(directory)})"
        )
    try:
        spec = spec_from_hf_config(directory)
    except HFConfigError as err:
        raise ConfigError(str(err)) from None
    if not weights:
        return spec
    index, files = _weight_files(directory, f"{key}={path}")
    tensors: dict[str, tuple[str, TensorHeader]] = {}
    unlisted: dict[str, str] = {}
    for shard, listed in files.items():
        header = read_safetensors_header(directory / shard, listed)
        if listed is None:
            tensors.update((name, (shard, t)) for name, t in header.items())
            continue
        absent = [name for name in listed if name not in header]
        if absent:
            raise ConfigError(
                f"{directory / shard}: tensor {_names(absent)} listed in {SAFETENSORS_INDEX} is not in the file"
            )
        tensors.update((name, (shard, header[name])) for name in listed)
        unlisted.update((name, str(directory / shard)) for name in header.keys() - set(listed))
    names_file = index if index is not None else directory / next(iter(files))
    _check_tensors(spec, directory, names_file, tensors, unlisted)
    return spec


def tokenizer_files_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` holds no tokenizer ``transformers`` can load offline, or ``None`` when it has one
    (any of :data:`TOKENIZER_FILE_SETS`): names the directory, the files expected and those found."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return f"no such directory {directory} (expected the tokenizer files of a Hugging Face model)"
    if any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        return None
    expected = " or ".join(" + ".join(names) for names in TOKENIZER_FILE_SETS)
    return (
        f"the tokenizer files are missing in {directory}: expected {expected} (with tokenizer_config.json), "
        f"found {_listing(directory)}"
    )


def check_tokenizer_files(path: str | os.PathLike, key: str = "tokenizer.path") -> None:
    """Raise :class:`ConfigError` naming ``key`` when :func:`tokenizer_files_problem` finds one."""
    problem = tokenizer_files_problem(path)
    if problem is not None:
        raise ConfigError(f"{key}={path}: {problem}; copy them there or give tokenizer.path=DIR (tokenizer.name=hf)")


def check_hf_inputs(cfg: Any) -> None:
    """What a run reads from HF directories, before anything is built: ``model=hf``'s checkpoint
    (:func:`check_hf_checkpoint`) and ``tokenizer.name=hf``'s files (:func:`check_tokenizer_files`).

    Args:
        cfg: the typed run config (``model`` and ``tokenizer`` sections).
    """
    model, tokenizer = cfg.model, cfg.tokenizer
    if model.source == "hf" and model.path:
        check_hf_checkpoint(model.path)
    if tokenizer.name == "hf":
        if tokenizer.path:
            check_tokenizer_files(tokenizer.path)
        elif getattr(model, "path", None):
            check_tokenizer_files(model.path, key="model.path")
