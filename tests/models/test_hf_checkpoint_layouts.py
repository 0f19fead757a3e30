"""HF checkpoints in and out under TP = 2 and PP = 2 (two spawned gloo processes).

Round 0 forms a TP = 2 world and round 1 a PP = 2 world from the same two
processes (a fresh ``FileStore`` per round). In each, every rank builds its
Megatron shard, loads the tiny safetensors checkpoint (sharded, real Qwen3
tokenizer files) straight into it, and then:

* computes logits (TP: the vocab-parallel halves gathered; PP: stage 0's
  hidden states sent to stage 1 by hand),
* streams the export to every rank and to rank 0 only,
* writes an HF directory collectively (rank 0 writes),
* saves its ``state_dict()`` for the offline merge.

The parent compares: logits with transformers' (fp32, 1e-5), streamed tensors
with the checkpoint's (bit-exact: fp32 load then export is lossless), the
written directory reloaded by transformers (same logits), the offline merge of
the saved shards with the live export (bit-exact). A checkpoint whose tied
``lm_head`` disagrees with the embedding fails on the rank that sees it and,
with a message naming that rank, on the other (no rank hangs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

# round -> (tp, pp, checkpoints loaded in that round)
ROUNDS: tuple[tuple[int, int, tuple[str, ...]], ...] = (
    (2, 1, ("qwen3_untied", "qwen2")),  # vocab-parallel lm_head; qkv bias split by query groups
    (1, 2, ("qwen3", "qwen3_bad_head")),  # tied embedding with its copy on the last stage
)
TOKENS = torch.randint(0, 151_936, (2, 9), generator=torch.Generator().manual_seed(21))


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, V]`` on the rank(s) that have them, else ``None``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        b, s = tokens.shape
        if ps.is_pipeline_first_stage():
            hidden = model(tokens, positions, None)  # [s, b, h]
            dist.send(hidden.contiguous(), dst=ranks[1])
            return None
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, src=ranks[0])
        model.set_input_tensor(hidden)
        return model(tokens, positions, None)
    local = model(tokens, positions, None)  # [b, s, V / tp]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _scenario(name: str, directory: Path, work: Path, tp: int, pp: int) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_gdro.models.gpt import build_gpt
    from nemo_gdro.models.hf_config import spec_from_hf_config
    from nemo_gdro.models.hf_export import iter_hf_tensors
    from nemo_gdro.models.hf_save import HFMetadata, save_hf_checkpoint
    from nemo_gdro.models.hf_weights import load_hf_weights
    from nemo_gdro.testing.tiny_hf import QWEN3_EOS_IDS

    rank = dist.get_rank()
    spec = spec_from_hf_config(directory)
    model = build_gpt(spec, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model.eval()
    try:
        load_hf_weights(model, spec, directory)
    except Exception as exc:  # the bad checkpoint: report what this rank raised
        return {"error": (type(exc).__name__, str(exc))}
    with torch.no_grad():
        logits = _logits(model, TOKENS)
    reference = _checkpoint_tensors(directory)
    streamed = list(iter_hf_tensors(model, spec))
    to_rank0 = list(iter_hf_tensors(model, spec, dst=0))
    out_dir = work / f"export_{name}"
    save_hf_checkpoint(
        model,
        spec,
        out_dir,
        metadata=HFMetadata(eos_token_id=QWEN3_EOS_IDS),  # tokenizer copy: test_hf_save.py
        max_shard_bytes=2**20,
    )
    layout = {
        "tp": tp,
        "pp": pp,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
    }
    torch.save((layout, model.state_dict()), work / f"shard_{name}_rank{rank}.pt")
    return {
        "logits": logits,
        "streamed_names": [n for n, _ in streamed],
        "streamed_mismatch": [n for n, t in streamed if not torch.equal(t, reference[n])],
        "to_rank0_none": [n for n, t in to_rank0 if t is None],
        "to_rank0_mismatch": [n for n, t in to_rank0 if t is not None and not torch.equal(t, reference[n])],
        "exported_complete": out_dir.is_dir(),
    }


def _worker(proc: int, work_dir: str, dirs: dict[str, str]) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from nemo_gdro.parallel.distributed import destroy_distributed, init_distributed

    work = Path(work_dir)
    os.environ.update(RANK=str(proc), WORLD_SIZE="2", LOCAL_RANK="0")
    for index, (tp, pp, names) in enumerate(ROUNDS):
        init_distributed(
            tensor_parallel=tp, pipeline_parallel=pp, seed=index, init_method=f"file://{work}/store_{index}"
        )
        try:
            for name in names:
                result = _scenario(name, Path(dirs[name]), work, tp, pp)
                torch.save(result, work / f"result_{name}_rank{proc}.pt")
        finally:
            destroy_distributed()


@pytest.fixture(scope="module")
def results(tiny_dirs, tmp_path_factory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file

    work = tmp_path_factory.mktemp("hf_layouts")
    # The tied checkpoint with an lm_head that differs from the embedding in one entry.
    bad = work / "qwen3_bad_head"
    shutil.copytree(tiny_dirs["qwen3"], bad)
    shard = bad / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    head = load_file(bad / "model-00001-of-00002.safetensors")["model.embed_tokens.weight"].clone()
    head[100_000, 5] += 1.0
    tensors["lm_head.weight"] = head
    save_file(tensors, shard, metadata={"format": "pt"})
    index = bad / "model.safetensors.index.json"
    index.write_text(
        index.read_text().replace('"weight_map": {', '"weight_map": {"lm_head.weight": "' + shard.name + '", ')
    )
    dirs = {name: str(path) for name, path in tiny_dirs.items()} | {"qwen3_bad_head": str(bad)}
    mp.start_processes(_worker, args=(str(work), dirs), nprocs=2, join=True, start_method="spawn")
    names = [name for _, _, round_names in ROUNDS for name in round_names]
    return work, {n: [torch.load(work / f"result_{n}_rank{r}.pt", weights_only=False) for r in range(2)] for n in names}


def _hf_logits(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


CASES = [(name, tp, pp) for tp, pp, names in ROUNDS for name in names if name != "qwen3_bad_head"]


@pytest.mark.parametrize("name, tp, pp", CASES, ids=[f"{n}_tp{t}_pp{p}" for n, t, p in CASES])
def test_layout_import_export_round_trip(results, tiny_dirs, name, tp, pp):
    from nemo_gdro.models.hf_config import spec_from_hf_config
    from nemo_gdro.models.hf_mapping import hf_key_names
    from nemo_gdro.models.megatron_shards import hf_state_dict_from_megatron_shards

    work, by_name = results
    per_rank = by_name[name]
    spec = spec_from_hf_config(tiny_dirs[name])
    expected = _hf_logits(tiny_dirs[name])
    holders = [r for r in per_rank if r["logits"] is not None]
    assert len(holders) == (2 if tp == 2 else 1)  # TP: both ranks; PP: the last stage
    for got in holders:
        torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
    for rank, got in enumerate(per_rank):
        assert got["streamed_names"] == hf_key_names(spec), rank
        assert got["streamed_mismatch"] == [] and got["to_rank0_mismatch"] == [], rank
        assert got["to_rank0_none"] == ([] if rank == 0 else hf_key_names(spec)), rank
        assert got["exported_complete"], rank  # save_hf_checkpoint returns once the directory is in place
    exported = work / f"export_{name}"
    assert len(list(exported.glob("*.safetensors"))) >= 2
    torch.testing.assert_close(_hf_logits(exported), expected, rtol=1e-5, atol=1e-5)
    # Offline: merging the saved Megatron shards gives exactly the checkpoint's tensors.
    shards = [torch.load(work / f"shard_{name}_rank{r}.pt", weights_only=False) for r in range(2)]
    merged = hf_state_dict_from_megatron_shards(spec, shards[::-1])  # any order
    reference = _checkpoint_tensors(tiny_dirs[name])
    assert list(merged) == hf_key_names(spec) and merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_a_rank_that_fails_to_load_fails_every_rank(results):
    _, by_name = results
    stage0, stage1 = (r["error"] for r in by_name["qwen3_bad_head"])
    # Stage 0 holds the embedding and compares lm_head with it; stage 1 learns of it from stage 0.
    assert stage0[0] == "ValueError" and "'lm_head.weight' differs" in stage0[1]
    assert stage1[0] == "RuntimeError" and "failed on rank 0" in stage1[1] and "lm_head.weight" in stage1[1]
