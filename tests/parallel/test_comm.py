"""Every collective of the trainer and the controllers puts its tensor on the backend's device.

A CPU machine cannot run NCCL, so these tests make the backend's device
something a CPU tensor is not: ``backend_device`` is pointed at the ``meta``
device and ``torch.distributed``'s collectives are replaced by recorders that
check every tensor they receive and fill the buffer back. A call site that
builds its buffer on the CPU and calls ``torch.distributed`` directly (the
bug under NCCL: "No backend type associated with device type cpu") fails
here; so does any new direct collective call in the trainer, stages or
algorithms (source scan).
"""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nemo_gdro
from nemo_gdro.algorithms.dynamo_modulation import ModulationStats
from nemo_gdro.algorithms.losses import ratio_variance
from nemo_gdro.parallel import comm
from nemo_gdro.parallel.rows import DataParallel, StepRows

ACCELERATOR = torch.device("meta")


class Recorder:
    """Stands in for a 2-rank NCCL world: checks devices, and sums as if the other rank sent zeros."""

    def __init__(self):
        self.calls = []

    def check(self, name, tensor):
        self.calls.append((name, tensor.device.type))
        assert tensor.device == ACCELERATOR, f"{name} got a tensor on {tensor.device}, backend needs {ACCELERATOR}"

    def all_reduce(self, tensor, op=None, group=None):
        self.check("all_reduce", tensor)

    def broadcast(self, tensor, src, group=None):
        self.check("broadcast", tensor)

    def all_gather(self, out, tensor, group=None):
        self.check("all_gather", tensor)
        for o in out:
            self.check("all_gather(out)", o)


@pytest.fixture
def fake_accelerator_world(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm, "group_size", lambda group=None: 2)
    monkeypatch.setattr(comm, "backend_device", lambda group=None: ACCELERATOR)
    # Coming back from the (data-less) meta device, hand the caller zeros of the right shape.
    monkeypatch.setattr(comm, "_to", lambda t, device: t if t.device == device else (
        torch.empty_like(t, device=device) if device == ACCELERATOR else torch.zeros_like(t, device=device)))
    for name in ("all_reduce", "broadcast", "all_gather"):
        monkeypatch.setattr(dist, name, getattr(rec, name))
    return rec


def test_comm_helpers_move_buffers_to_the_backend_device(fake_accelerator_world):
    x = torch.ones(3, dtype=torch.float64)
    assert comm.all_reduce(x).device.type == "cpu"
    assert comm.broadcast(x, src=0).device.type == "cpu"
    assert [t.device.type for t in comm.all_gather(x)] == ["cpu", "cpu"]
    assert [c[0] for c in fake_accelerator_world.calls] == ["all_reduce", "broadcast", "all_gather", "all_gather(out)", "all_gather(out)"]


def test_row_reductions_and_controller_reductions_use_the_backend_device(fake_accelerator_world):
    dp = DataParallel(rank=0, size=2, group=object(), pipeline_size=2, pipeline_group=object())
    counts = torch.tensor([2, 1, 2])
    rows = StepRows.build(counts, torch.tensor([0, 0, 1, 1]), dp)
    rows.scatter(torch.ones(4))
    rows.scatter_prompts(torch.ones(2))
    dp.total(1.0, 2.0)
    dp.sum_over_stages(torch.ones(2))
    ModulationStats(0.0, 1.0, 0.5).reduce(group=object())
    ratio_variance(torch.tensor(1.0), torch.tensor(4.0), group=object())
    kinds = {c[1] for c in fake_accelerator_world.calls}
    assert kinds == {"meta"} and len(fake_accelerator_world.calls) == 6


def test_backend_device_follows_the_backend():
    assert comm.backend_device() == torch.device("cpu")  # no process group: host
    assert comm.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]  # one process: identity


# Modules that may call torch.distributed collectives directly: comm itself,
# the large on-device tensors of the vocabulary-parallel pass and the weight
# export, Megatron's own embedding all-reduce patch, and the sharded store /
# checksum, which place their buffers with comm.backend_device.
DIRECT_CALLS_ALLOWED = {
    "parallel/comm.py", "parallel/vocab_parallel.py", "parallel/megatron_compat.py", "parallel/sharded_stats.py",
    "models/hf_mapping.py", "models/hf_export.py", "models/hf_weights.py", "trainer/actor.py", "trainer/checkpoint.py", "parallel/distributed.py",
}
COLLECTIVE = re.compile(r"\bdist\.(all_reduce|all_gather|broadcast|reduce_scatter|all_gather_into_tensor|reduce)\(")


def test_no_other_module_calls_collectives_directly():
    root = Path(nemo_gdro.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel in DIRECT_CALLS_ALLOWED:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVE.search(line):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "collectives outside nemo_gdro.parallel.comm:\n" + "\n".join(offenders)


def test_actor_reduces_its_report_on_the_backend_device(fake_accelerator_world):
    """The actor's one channel out of the loss: scalars all-reduced over DP, rows broadcast over PP."""
    from nemo_gdro.trainer.actor import MegatronActor

    actor = MegatronActor.__new__(MegatronActor)  # only the reduction is exercised: no model needed
    actor._is_last_stage, actor._dp_group, actor._pp_size = True, object(), 1
    reported = [{"loss": torch.tensor(1.0, dtype=torch.float64), "row/signal": torch.ones(2, dtype=torch.float64)}]
    report = actor._reduce_reported(reported, torch.arange(2))
    assert set(report) == {"loss"} and report.rows["signal"].shape == (2,)
    assert [c for c in fake_accelerator_world.calls] == [("all_reduce", "meta")]
