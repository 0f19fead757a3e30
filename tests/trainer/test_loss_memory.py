"""The loss pass's memory model (bytes per token) and the guard that refuses a micro-batch before the pass."""

from __future__ import annotations

import pytest
import torch

from nemo_gdro.trainer.errors import RunError
from nemo_gdro.trainer.loss_memory import check_loss_pass_memory, free_memory_bytes, loss_pass_bytes, loss_pass_problem

CPU = torch.device("cpu")
V, H = 151_936, 512


def _bytes(tokens: int, fused: bool, param_bytes: int = 4, v: int = V) -> int:
    return loss_pass_bytes(tokens, vocab_local=v, hidden=H, param_bytes=param_bytes, fused=fused, device=CPU)


def test_logits_path_grows_with_tokens_times_vocabulary():
    fixed = _bytes(0, fused=False)
    assert fixed == 8 * 2**20  # two 4 MiB tile workspaces
    assert _bytes(1000, fused=False) - fixed == 1000 * 2 * V * 4
    assert _bytes(1000, fused=False, param_bytes=2) - fixed == 1000 * 2 * V * 2


def test_fused_path_does_not_grow_with_tokens_times_vocabulary():
    # Past one chunk, each further token costs its hidden-state gradient and six scalars only.
    assert _bytes(20_000, fused=True) - _bytes(10_000, fused=True) == 10_000 * (H * 4 + 24)
    # ... whatever the vocabulary: a larger vocabulary moves only the fixed part.
    grow_small = _bytes(20_000, True, v=32_000) - _bytes(10_000, True, v=32_000)
    assert grow_small == _bytes(20_000, True) - _bytes(10_000, True)
    # The 0.6B recipe's 16,384-token budget at the real vocabulary (bf16): under 1 GiB fused, ~10 GB via logits.
    assert _bytes(16_384, fused=True, param_bytes=2) < 2**30 < 9e9 < _bytes(16_384, fused=False, param_bytes=2)


def test_problem_line_names_the_settings_and_what_fits():
    need = _bytes(8192, fused=False)
    assert loss_pass_problem(8192, vocab_local=V, hidden=H, param_bytes=4, fused=False, device=CPU,
                             available_bytes=need) is None
    msg = loss_pass_problem(8192, vocab_local=V, hidden=H, param_bytes=4, fused=False, device=CPU,
                            available_bytes=need // 2)
    assert msg is not None and "\n" not in msg
    assert "8192 tokens" in msg and "trainer.micro_batch_size" in msg and "trainer.max_tokens_per_microbatch" in msg
    assert "megatron.fused_linear_token_stats=true" in msg
    fit = int(msg.split("about ")[1].split(" tokens")[0])
    assert 4000 <= fit <= 4096  # half the memory: about half the tokens
    with pytest.raises(RunError, match="trainer.micro_batch_size"):
        check_loss_pass_memory(8192, vocab_local=V, hidden=H, param_bytes=4, fused=True, device=CPU,
                               available_bytes=2**20)


def test_unknown_free_memory_checks_nothing():
    assert loss_pass_problem(10**9, vocab_local=V, hidden=H, param_bytes=4, fused=False,
                             device=torch.device("meta")) is None
    free = free_memory_bytes(CPU)
    assert free is None or free > 0
