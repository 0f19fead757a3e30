"""init_distributed: parallel.timeout_s bounds a collective that a stalled rank never joins."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("megatron.core")


def _stall_worker(rank: int, init_file: str, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(seed=0, timeout_s=3.0, init_method=f"file://{init_file}")
    if rank == 1:
        time.sleep(8)  # the stalled rank: never joins the all-reduce in time
        results[rank] = "stalled"
        return
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        results[rank] = "completed"
    except Exception as err:  # gloo raises RuntimeError / DistError on timeout
        results[rank] = f"{type(err).__name__} after {time.monotonic() - t0:.1f}s: {str(err)[:200]}"
    finally:
        try:
            destroy_distributed()
        except Exception:
            pass


@pytest.mark.slow
def test_timeout_s_bounds_a_collective_with_a_stalled_rank(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    ctx = mp.spawn(_stall_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=False)
    ctx.join(timeout=60)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    outcome = results.get(0, "")
    assert "after" in outcome, outcome
    waited = float(outcome.split("after ")[1].split("s:")[0])
    assert waited < 7.0, outcome  # 3 s timeout, not the 30-minute default
    assert "timed out" in outcome.lower() or "timeout" in outcome.lower(), outcome
