"""One rank of the external-launcher test (run by test_vllm_engine.py under torchrun, nproc=2).

The order is the colocated trainer's: torch.distributed (gloo) and Megatron's
parallel state first, then the vLLM engine, then the Megatron actor; weights go
actor -> HF names -> engine; the actor recomputes the engine's samples' log-probs.
Writes every rank's findings into the JSON file given as argv[1] (from rank 0).
"""

import json
import sys

import torch
import torch.distributed as dist

from nemo_gdro.algorithms.mismatch import logprob_mismatch
from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.data.tokenizer import CharTokenizer
from nemo_gdro.models.gpt import spec_from_overrides
from nemo_gdro.models.hf_mapping import hf_config
from nemo_gdro.parallel.distributed import init_distributed
from nemo_gdro.rollout.sampling import SamplingConfig
from nemo_gdro.rollout.seeds import prompt_seeds
from nemo_gdro.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine, check_identical_over_group
from nemo_gdro.trainer.actor import MegatronActor, OptimConfig


def main(out_path: str) -> None:
    info = init_distributed(tensor_parallel=1, pipeline_parallel=1, seed=0)  # gloo, world 2, DP 2
    rank = info.rank
    tok = CharTokenizer()
    spec = spec_from_overrides("tiny", vocab_size=tok.padded_vocab_size(), head_dim=32, max_position_embeddings=256)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.8)
    engine = VLLMRolloutEngine(hf_config(spec), tok, sampling, VLLMOptions(kv_cache_memory_bytes=16 << 20))
    actor = MegatronActor(spec, OptimConfig(), seed=0, temperature=0.8)  # same seed: same weights on both ranks
    engine.load_weights(actor.export_hf_state_dict(), version=0)

    # The step's prompt list is replicated; seeds come from the whole list, then each rank
    # takes its strided slice (positions rank, rank + 2) plus the shared prompt 99.
    step_ids = [10, 11, 12, 13]
    seeds = prompt_seeds(0, 1, step_ids)
    texts = {10: "Q:1+1=A:", 11: "Q:2+5=A:", 12: "Q:13+4=A:", 13: "Q:9-3=A:", 99: "Q:40+2=A:"}
    mine = [step_ids[i] for i in range(rank, 4, 2)] + [99]
    records = [PromptRecord(i, texts[i], "0") for i in mine]
    my_seeds = torch.cat([seeds[rank::2], torch.tensor([777])])
    b = engine.generate(records, [2, 3, 4], my_seeds)
    stats = actor.compute_token_stats(b.tokens)
    mm = logprob_mismatch(stats["logp"], b.engine_logp, b.response_mask)

    def rows(pos: int) -> list[list[int]]:
        return [b.tokens[r, : int(b.sequence_lengths[r])].tolist() for r in range(b.num_rows) if int(b.group_index[r]) == pos]

    world = dist.group.WORLD
    check_identical_over_group(b"same digest on every rank", world, "inputs")
    try:
        check_identical_over_group(f"rank {rank}".encode(), world, "inputs")
        diff = "no error"
    except RuntimeError as exc:
        diff = str(exc)
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)  # the trainer's group still works after vLLM's initialisation
    result = {
        "world": dist.get_world_size(),
        "own_prompt_ids": mine[:2],
        "own_tokens": rows(0) + rows(1),
        "shared_tokens": rows(2),
        "group_sizes": b.group_sizes().tolist(),
        "max_abs_logp_diff": mm.max_abs_logp_diff,
        "token_mult_prob_error": mm.token_mult_prob_error,
        "tp_check_same": "ok",
        "tp_check_diff": diff,
        "allreduce_after_vllm": float(x),
    }
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({str(i): g for i, g in enumerate(gathered)}, f)
    dist.barrier()
    engine.close()  # last: vLLM's shutdown destroys the default process group


if __name__ == "__main__":
    main(sys.argv[1])
