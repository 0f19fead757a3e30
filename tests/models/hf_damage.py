"""Ways to damage a real tiny HF checkpoint directory (one per case), and what the error must then name.

Each damage function takes a copy of a ``save_pretrained`` directory (two
shards + ``model.safetensors.index.json`` + the Qwen3 tokenizer files, see
:func:`nemo_gdro.testing.tiny_hf.build_tiny_hf`), damages it in place and
returns the texts the one-line error must contain (a file name, a tensor
name, the kind of damage). Shared by the unit tests of
:mod:`nemo_gdro.models.hf_preflight` and the CLI table in
``tests/reliability/test_weight_files.py``.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

INDEX = "model.safetensors.index.json"
EMBED = "model.embed_tokens.weight"
NORM = "model.layers.0.input_layernorm.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX).read_text())["weight_map"]


def shard_of(directory: Path, tensor: str) -> Path:
    return directory / weight_map(directory)[tensor]


def read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a shard's JSON header in place (same length, padded with spaces as safetensors pads it)."""
    n, header = read_header(path)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "the edit must not lengthen the header"
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def resave_shard(directory: Path, shard: str, change: Callable[[dict], None]) -> None:
    """Load one shard's tensors, ``change`` the dict, save it back and make the index match."""
    from safetensors.torch import load_file, save_file

    path = directory / shard
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or k in tensors}
    index["weight_map"].update({k: shard for k in tensors})
    (directory / INDEX).write_text(json.dumps(index))


# ---------------------------------------------------------------------------- the cases
def truncated_shard(d: Path) -> list[str]:
    shard = shard_of(d, DOWN)
    size = shard.stat().st_size - 1000
    n, header = read_header(shard)
    # The first tensor (in file order) whose data the cut reaches: what the error must name.
    cut = min((k for k in header if k != "__metadata__" and 8 + n + header[k]["data_offsets"][1] > size),
              key=lambda k: header[k]["data_offsets"][0])
    with open(shard, "r+b") as f:
        f.truncate(size)
    return [str(shard), "truncated", repr(cut)]


def trailing_bytes(d: Path) -> list[str]:
    shard = shard_of(d, DOWN)
    with open(shard, "ab") as f:
        f.write(b"\0" * 16)
    return [str(shard), "16 unexpected bytes", "tensor '"]


def missing_shard(d: Path) -> list[str]:
    shard = shard_of(d, DOWN)
    shard.unlink()
    return [str(d / INDEX), repr(shard.name), "does not exist", "tensor '"]


def index_not_json(d: Path) -> list[str]:
    (d / INDEX).write_text('{"weight_map": {')
    return [str(d / INDEX), "not valid JSON"]


def index_without_weight_map(d: Path) -> list[str]:
    (d / INDEX).write_text(json.dumps({"metadata": {}}))
    return [str(d / INDEX), "'weight_map'"]


def index_lists_absent_tensor(d: Path) -> list[str]:
    index = json.loads((d / INDEX).read_text())
    shard = index["weight_map"].pop(DOWN)
    index["weight_map"]["model.layers.1.mlp.down_proj.weights"] = shard  # a typo'd name
    (d / INDEX).write_text(json.dumps(index))
    return [str(d / shard), "'model.layers.1.mlp.down_proj.weights'", "is not in the file"]


def damaged_header(d: Path) -> list[str]:
    shard = shard_of(d, NORM)
    edit_header(shard, lambda h: h[NORM].update(shape=[16]))  # 32 floats of data, a shape of 16
    return [str(shard), repr(NORM), "the header is damaged"]


def wrong_shape(d: Path) -> list[str]:
    shard = shard_of(d, EMBED)
    edit_header(shard, lambda h: h[EMBED].update(shape=h[EMBED]["shape"][::-1]))  # same bytes, transposed
    return [str(shard), repr(EMBED), "has shape (32, 151936), expected (151936, 32)"]


def missing_tensor(d: Path) -> list[str]:
    resave_shard(d, weight_map(d)[DOWN], lambda t: t.pop(DOWN))
    return [str(d / INDEX), "missing tensor", repr(DOWN)]


def extra_tensor(d: Path) -> list[str]:
    import torch

    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    resave_shard(d, weight_map(d)[DOWN], lambda t: t.update({name: torch.zeros(4, 4)}))
    return [str(shard_of(d, DOWN)), "unexpected tensor", repr(name)]


def wrong_dtype(d: Path) -> list[str]:
    shard = shard_of(d, DOWN)
    edit_header(shard, lambda h: h[DOWN].update(dtype="I32"))  # same width: only the dtype is wrong
    return [str(shard), repr(DOWN), "dtype I32"]


def no_config(d: Path) -> list[str]:
    (d / "config.json").unlink()
    return [f"model.path={d}", "no config.json"]


def config_not_json(d: Path) -> list[str]:
    (d / "config.json").write_text("{'architectures': ")
    return [str(d / "config.json"), "not valid JSON"]


def no_weights(d: Path) -> list[str]:
    for p in [*d.glob("*.safetensors"), d / INDEX]:
        p.unlink()
    return [str(d), "no weights", "model.safetensors"]


def pytorch_bin_only(d: Path) -> list[str]:
    for p in [*d.glob("*.safetensors"), d / INDEX]:
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\0" * 64)
    return [str(d), "pytorch_model.bin", "only safetensors"]


def no_tokenizer_files(d: Path) -> list[str]:
    for name in TOKENIZER_FILES:
        (d / name).unlink()
    return [f"model.path={d}", "tokenizer files are missing", "tokenizer.json"]


def not_a_directory(d: Path) -> list[str]:
    shutil.rmtree(d)
    return [f"model.path={d}", "no such directory"]


#: case name -> damage (each returns the texts the error must contain).
CASES: dict[str, Callable[[Path], list[str]]] = {
    f.__name__: f
    for f in (
        truncated_shard, trailing_bytes, missing_shard, index_not_json, index_without_weight_map,
        index_lists_absent_tensor, damaged_header, wrong_shape, missing_tensor, extra_tensor, wrong_dtype,
        no_config, config_not_json, no_weights, pytorch_bin_only, no_tokenizer_files, not_a_directory,
    )
}
#: the cases of the tokenizer (checked only with tokenizer.name=hf).
TOKENIZER_CASES = {"no_tokenizer_files"}


def damaged_copy(src: Path, dest: Path, case: str) -> tuple[Path, list[str]]:
    """A copy of ``src`` at ``dest`` with damage ``case``; returns it and the texts its error must contain."""
    shutil.copytree(src, dest)
    return dest, CASES[case](dest)
