"""Hostile micro-batch sizes: the loss pass refuses, in one line naming the settings, before it allocates.

Rows: (tokens of the largest micro-batch, vocabulary per TP rank, parameter bytes, fused path,
free bytes) -> refused or not, and what the line must say. The real Qwen3 vocabulary is used
throughout; the issue's case (tiny model, micro_batch_size=32 rows of ~600 tokens, OOM at
19.9 GiB with no warning) is the first row.
"""

from __future__ import annotations

import pytest
import torch

from nemo_gdro.trainer.config import load
from nemo_gdro.trainer.loss_memory import loss_pass_problem
from nemo_gdro.typed_config import ConfigError

GiB = 2**30
V = 151_936

CASES = [
    # tokens, vocab, bytes, fused, free, refused, must contain
    (32 * 600, V, 4, False, 19.9 * GiB, True, ["19200 tokens", "fused_linear_token_stats=true"]),
    (32 * 600, V, 4, True, 19.9 * GiB, False, []),  # the same micro-batch on the default fused path
    (16_384, V, 2, False, 8 * GiB, True, ["16384 tokens", "2 x 151936 vocabulary x 2 bytes"]),
    (16_384, V, 2, True, 8 * GiB, False, []),
    (16_384, V // 8, 2, False, 8 * GiB, False, []),  # TP = 8 shards the vocabulary
    (10**7, V, 4, True, 1 * GiB, True, ["10000000 tokens", "its fused loss pass"]),  # even fused has a limit
    (512, V, 4, True, 10 * 2**20, True, ["512 tokens"]),  # a nearly full host
]


@pytest.mark.parametrize("tokens, vocab, nbytes, fused, free, refused, expected", CASES)
def test_micro_batch_memory_table(tokens, vocab, nbytes, fused, free, refused, expected):
    msg = loss_pass_problem(
        tokens, vocab_local=vocab, hidden=512, param_bytes=nbytes, fused=fused, device=torch.device("cpu"),
        available_bytes=int(free),
    )
    assert (msg is not None) is refused, msg
    if refused:
        assert "\n" not in msg
        for text in ["trainer.micro_batch_size", "trainer.max_tokens_per_microbatch", *expected]:
            assert text in msg, msg


@pytest.mark.parametrize("value", ["maybe", "2", "null"])
def test_fused_switch_takes_a_boolean(value):
    with pytest.raises(ConfigError, match="megatron.fused_linear_token_stats"):
        load(overrides=[f"megatron.fused_linear_token_stats={value}"])
