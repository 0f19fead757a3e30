"""Checkpoint manager: atomic save, verification, rotation, resume resolution, RNG state."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_gdro.trainer.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
    shard_file_name,
    verify_checkpoint,
)


def _components(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, generator=g)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "controllers": {
            "prompt_gdro": {"scores": torch.randn(10, generator=g, dtype=torch.float64), "step": 7},
            "rollout_gdro": {"mu": 0.25, "arms": [torch.arange(3), {"nested": torch.ones(2, 2)}]},
        },
        "sampler": {"epoch": 2, "order": torch.randperm(17, generator=g), "cursor": 5},
        "rng": capture_rng_state(),
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def _quiet_latest(mgr: CheckpointManager) -> tuple[Path | None, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        p = mgr.latest()
    return p, [str(w.message) for w in rec]


def test_round_trip_nested_components_and_config(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    comps = _components()
    path = mgr.save(12, comps, config_yaml="seed: 1\nsampler: prompt_gdro\n")
    assert path == tmp_path / "ckpt" / "step_00000012"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.pt", "optimizer.pt", "controllers.pt", "sampler.pt", "rng.pt", "config.yaml", MANIFEST_NAME]
    )
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["step"] == 12
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "controllers.pt", "sampler.pt", "rng.pt",
                                      "config.yaml"}
    for fname, meta in manifest["files"].items():
        assert (path / fname).stat().st_size == meta["size"]
    loaded = mgr.load(path)
    _assert_same(comps, loaded)
    assert mgr.read_config(path) == "seed: 1\nsampler: prompt_gdro\n"
    assert mgr.step_of(path) == 12
    assert mgr.latest() == path
    assert not any(p.name.startswith(".") for p in (tmp_path / "ckpt").iterdir())


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"x": torch.zeros(3)})
    path = mgr.save(5, {"x": torch.ones(3), "y": 1})
    assert torch.equal(mgr.load(path)["x"], torch.ones(3))
    assert mgr.load(path)["y"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]


def test_interrupted_saves_are_skipped_with_warning(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=10)
    good = mgr.save(10, _components())

    # 2) a final dir whose file got truncated after publishing
    truncated = mgr.save(20, _components(1))
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    # 3) a final dir without manifest (e.g. copied by hand, copy interrupted)
    no_manifest = mgr.save(25, _components(2))
    (no_manifest / MANIFEST_NAME).unlink()
    # 4) a final dir missing one of its files
    missing = mgr.save(27, _components(3))
    (missing / "sampler.pt").unlink()
    # 1) a temp dir left by a crash while writing step 30 (partial file, no manifest);
    #    created last because every save cleans up leftover temp dirs
    tmp = tmp_path / ".tmp_step_00000030_99999"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"PK\x03\x04partial")

    latest, msgs = _quiet_latest(mgr)
    assert latest == good
    joined = "\n".join(msgs)
    assert str(tmp) in joined and "leftover temp dir" in joined
    assert str(truncated) in joined and "truncated" in joined
    assert str(no_manifest) in joined and "missing manifest.json" in joined
    assert str(missing / "sampler.pt") in joined and "missing" in joined
    # and loading a bad one names the file
    with pytest.raises(CheckpointError, match="model.pt"):
        mgr.load(truncated)


def test_next_save_cleans_temp_dirs(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"a": 1})
    leftover = tmp_path / ".tmp_step_00000002_4242"
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"junk")
    mgr.save(2, {"a": 2})
    assert not leftover.exists()


def test_corrupted_byte_is_detected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    first = mgr.save(1, {"model": {"w": torch.arange(1000.0)}})
    second = mgr.save(2, {"model": {"w": torch.arange(1000.0) * 2}})
    f = second / "model.pt"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.pt.*sha256.*corrupted"):
        verify_checkpoint(second)
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        mgr.load(second)
    latest, msgs = _quiet_latest(mgr)
    assert latest == first
    assert any(str(second) in m and "sha256" in m for m in msgs)


def test_rotation_keeps_newest_complete(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, {"s": step})
    assert [mgr.step_of(p) for p in mgr.list_checkpoints()] == [3, 4]
    # An incomplete newer dir does not count as one of the kept checkpoints.
    (tmp_path / "step_00000004" / MANIFEST_NAME).unlink()
    mgr.save(5, {"s": 5})
    assert [mgr.step_of(p) for p in mgr.list_checkpoints()] == [3, 4, 5]
    assert mgr.load(mgr.step_dir(3))["s"] == 3


def test_keep_last_one_never_deletes_the_new_checkpoint(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, {"s": 1})
    p = mgr.save(2, {"s": 2})
    assert mgr.list_checkpoints() == [p]
    assert mgr.save(2, {"s": 22}) == p
    assert mgr.load(p)["s"] == 22


def test_saving_older_step_moves_abandoned_timeline_aside(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=5)
    mgr.save(10, {"s": 10})
    mgr.save(20, {"s": 20})
    # resumed explicitly from step 10, now saving step 15
    with pytest.warns(UserWarning, match="abandoned timeline"):
        p = mgr.save(15, {"s": 15})
    assert mgr.latest() == p
    moved = list((tmp_path / "abandoned").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("step_00000020.")
    assert verify_checkpoint(moved[0])["step"] == 20  # kept intact, nothing lost


def test_interrupted_resave_falls_back_to_displaced_copy(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    p = mgr.save(3, {"s": 3})
    # Simulate a crash between "move old copy aside" and "publish new copy".
    old = tmp_path / ".old_step_00000003_777"
    p.rename(old)
    latest, msgs = _quiet_latest(mgr)
    assert latest == old and any("interrupted re-save" in m for m in msgs)
    assert mgr.load(latest)["s"] == 3
    mgr.save(4, {"s": 4})  # the next save puts it back first, then rotates normally
    assert not old.exists()


def test_resolve_resume(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.resolve_resume(None) is None
    assert mgr.resolve_resume("none") is None
    assert mgr.resolve_resume("None") is None
    assert mgr.resolve_resume("auto") is None  # root does not even exist yet
    p = mgr.save(3, {"s": 3})
    assert mgr.resolve_resume("auto") == p
    assert mgr.resolve_resume(str(p)) == p
    assert mgr.resolve_resume(p) == p
    with pytest.raises(CheckpointError, match=r"resume='.*step_00000099'.*no such checkpoint"):
        mgr.resolve_resume(str(tmp_path / "ckpt" / "step_00000099"))
    bad = tmp_path / "not_a_ckpt"
    bad.mkdir()
    with pytest.raises(CheckpointError, match=r"not a valid checkpoint.*missing manifest\.json"):
        mgr.resolve_resume(str(bad))
    with pytest.raises(CheckpointError, match=r"holds step_XXXXXXXX checkpoints.*resume='auto'"):
        mgr.resolve_resume(str(tmp_path / "ckpt"))  # the root instead of a step dir
    (p / "s.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"s\.pt.*size 0 B"):
        mgr.resolve_resume(str(p))


def test_invalid_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="rank"):
        CheckpointManager(tmp_path, rank=2, world_size=2)
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step"):
        mgr.save(-1, {"a": 1})
    with pytest.raises(ValueError, match="'manifest'"):
        mgr.save(1, {"manifest": 1})
    with pytest.raises(ValueError, match="'a/b'"):
        mgr.save(1, {"a/b": 1})
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed"):
        CheckpointManager(tmp_path, rank=1, world_size=2).save(1, {"a": 1})
    with pytest.raises(ValueError, match="both as shared and per-rank"):
        mgr.save(1, {"a": 1}, per_rank={"a": 2})
    assert shard_file_name("stats", 3, 8) == "stats.rank00003-of-00008.pt"
    assert shard_file_name("stats", 0, 1) == "stats.pt"


def test_failed_save_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    good = mgr.save(1, {"a": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mgr.save(2, {"a": 2, "b": Unpicklable()})
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert mgr.latest() == good


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randint(0, 1000, size=3).tolist(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
    )


def test_rng_capture_restore_reproduces_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # move away from the seeded start
    state = capture_rng_state()
    expected = _draws()
    _draws()  # advance further
    # Go through a real checkpoint so the state survives torch.save/load.
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"rng": state})
    _draws()
    restore_rng_state(mgr.load(mgr.latest())["rng"])
    assert _draws() == expected


def test_restore_rng_names_missing_entries() -> None:
    with pytest.raises(KeyError, match="numpy"):
        restore_rng_state({"python": random.getstate(), "torch_cpu": torch.get_rng_state()})


def test_single_process_per_rank_shards_load_as_a_list(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, {"shared": {"x": 1}}, per_rank={"stats": torch.arange(4)})
    loaded = mgr.load(path)
    assert loaded["shared"] == {"x": 1}
    assert len(loaded["stats"]) == 1 and torch.equal(loaded["stats"][0], torch.arange(4))


def _two_rank_save(rank: int, root: str, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mgr = CheckpointManager(root, rank=rank, world_size=2)
        mgr.save(5, {"shared": {"step": 5}}, per_rank={"stats": torch.full((3,), rank)})
    finally:
        dist.destroy_process_group()


def test_two_ranks_save_their_shards_atomically(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    root = tmp_path / "ckpt"
    mp.spawn(_two_rank_save, args=(str(root), str(tmp_path / "store")), nprocs=2, join=True)
    mgr = CheckpointManager(root)  # a later run of any size reads every shard
    path = mgr.latest()
    assert path is not None and path.name == "step_00000005"
    assert (path / "stats.rank00001-of-00002.pt").is_file()
    loaded = mgr.load(path)
    assert loaded["shared"] == {"step": 5}
    assert [t.tolist() for t in loaded["stats"]] == [[0, 0, 0], [1, 1, 1]]


# --------------------------------------------------------------------------- safe loading, plain data, disk full
class _Exploit:
    """Unpickling this runs a shell command (what a crafted checkpoint file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _rehash(path: Path) -> None:
    """Re-write the manifest for the files as they are now (what an attacker with write access does)."""
    import hashlib

    manifest = json.loads((path / MANIFEST_NAME).read_text())
    for fname in manifest["files"]:
        data = (path / fname).read_bytes()
        manifest["files"][fname] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_a_crafted_pickle_with_a_rehashed_manifest_is_refused_without_running_code(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt")
    path = mgr.save(1, {"controllers": {"x": torch.ones(2)}}, plain={"trainer": {"step": 1}})
    marker = tmp_path / "pwned"
    torch.save({"payload": _Exploit(marker)}, path / "controllers.pt")
    _rehash(path)
    verify_checkpoint(path)  # the manifest is consistent: only the loader stands between the file and a shell
    with pytest.raises(CheckpointError, match=r"controllers\.pt: refused: the file holds pickled objects other than "
                                              r"tensors.*weights_only=True"):
        mgr.load(path)
    assert not marker.exists()


def test_plain_components_are_json_and_every_file_loads_weights_only(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    state = {"step": 3, "sft_done": True, "last_eval": {"eval/pass@1": 0.25, "eval/nan": float("nan")}}
    path = mgr.save(3, {"rng": capture_rng_state()}, plain={"trainer": state}, per_rank={"layout": {"dp": 1}})
    assert json.loads((path / "trainer.json").read_text(), parse_constant=str)["step"] == 3
    loaded = mgr.load(path)
    assert loaded["trainer"]["last_eval"]["eval/pass@1"] == 0.25 and np.isnan(loaded["trainer"]["last_eval"]["eval/nan"])
    for f in path.glob("*.pt"):
        torch.load(f, weights_only=True)  # numpy RNG state is stored as tensors
    with pytest.raises(ValueError, match="both as shared and per-rank"):
        mgr.save(4, {"trainer": 1}, plain={"trainer": 2})


def _mount_tmpfs(path: Path, size: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_disk_full_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    import subprocess

    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        mgr = CheckpointManager(disk / "ckpt", keep_last=5)
        good = mgr.save(1, {"model": {"w": torch.zeros(50_000)}})  # 200 KB
        with pytest.raises(CheckpointError, match=rf"no space left on device at {disk / 'ckpt'} while writing "
                                                  rf"checkpoint step 2 \(.* free\); the previous checkpoint {good} is kept"):
            mgr.save(2, {"model": {"w": torch.zeros(400_000)}})  # 1.6 MB
        assert [p.name for p in (disk / "ckpt").iterdir()] == [good.name]  # no partial temp dir left
        assert mgr.latest() == good
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_attachments_are_written_in_the_atomic_save_listed_and_verified(tmp_path: Path) -> None:
    """Item 21.5: files kept with a checkpoint (the tokenizer's) are part of its manifest, not of what load returns."""
    source = tmp_path / "tokenizer.json"
    source.write_text('{"model": "bpe"}')
    mgr = CheckpointManager(tmp_path / "ckpt")
    path = mgr.save(1, {"model": torch.ones(2)}, attachments={"hf_assets/tokenizer.json": source,
                                                            "hf_assets/note.json": b"{}"})
    assert (path / "hf_assets" / "tokenizer.json").read_text() == '{"model": "bpe"}'
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["attachments"] == ["hf_assets/note.json", "hf_assets/tokenizer.json"]
    assert {"hf_assets/tokenizer.json", "hf_assets/note.json"} <= set(manifest["files"])
    assert set(mgr.load(path)) == {"model"}
    (path / "hf_assets" / "tokenizer.json").write_text('{"model": "xxx"}')  # same size, other bytes
    with pytest.raises(CheckpointError, match="hf_assets/tokenizer.json"):
        verify_checkpoint(path)
    for bad in ("../escape.json", "/abs.json", "a/b/c.json", "model.pt"):
        with pytest.raises(ValueError, match="attachment"):
            mgr.save(2, {"model": torch.ones(2)}, attachments={bad: b"x"})
    with pytest.warns(UserWarning, match="does not match the manifest"):
        assert mgr.latest() is None
    assert not list((tmp_path / "ckpt").glob(".tmp_*"))
