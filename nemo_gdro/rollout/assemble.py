"""Shared by the engines: check ``generate`` arguments, encode prompts, lay out rows.

Both engines produce rows grouped by prompt in order (rollout ``j`` of prompt
``i`` is row ``sum(n[:i]) + j``), so the same inputs give the same batch layout
whichever engine sampled it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.rollout.batch import RolloutBatch
from nemo_gdro.rollout.tokenizer import EngineTokenizer

__all__ = ["check_generate_args", "encode_prompts", "build_batch"]


def check_generate_args(
    records: Sequence[PromptRecord],
    n_per_prompt: torch.Tensor | Sequence[int],
    seeds: torch.Tensor | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, seeds)`` as int64 ``[P]``; raises ``ValueError`` naming the bad argument."""
    P = len(records)
    if P == 0:
        raise ValueError("generate needs at least one prompt")
    n = torch.as_tensor(n_per_prompt, dtype=torch.int64).flatten()
    if n.numel() != P:
        raise ValueError(f"n_per_prompt has {n.numel()} entries for {P} prompts")
    if int(n.min()) < 1:
        raise ValueError(f"every n_per_prompt must be >= 1, got {n.tolist()}")
    s = torch.as_tensor(seeds, dtype=torch.int64).flatten()
    if s.numel() != P:
        raise ValueError(f"seeds has {s.numel()} entries for {P} prompts")
    if int(s.min()) < 0:
        raise ValueError(f"seeds must be >= 0 (see rollout/seeds.py), got {s.tolist()}")
    return n, s


def encode_prompts(records: Sequence[PromptRecord], tokenizer: EngineTokenizer) -> list[list[int]]:
    """Token ids of each record's prompt; raises naming the prompt id on failure or an empty prompt."""
    out = []
    for rec in records:
        try:
            ids = [int(i) for i in tokenizer.encode_prompt(rec.prompt)]
        except ValueError as exc:
            raise ValueError(f"prompt {rec.prompt_id}: {exc}") from exc
        if not ids:
            raise ValueError(f"prompt {rec.prompt_id} encodes to no tokens")
        out.append(ids)
    return out


def build_batch(
    records: Sequence[PromptRecord],
    prompt_tokens: Sequence[Sequence[int]],
    n: torch.Tensor,
    response_tokens: Sequence[Sequence[int]],
    response_logp: Sequence[Sequence[float]] | None,
    truncated: Sequence[bool],
    tokenizer: EngineTokenizer,
    policy_version: int,
) -> RolloutBatch:
    """A validated ``RolloutBatch`` from per-row responses, grouped by prompt in order.

    Args:
        prompt_tokens: ``P`` lists, the encoded prompt of each record.
        n: int64 ``[P]`` rows per prompt.
        response_tokens: ``R = sum(n)`` lists, each ending with its stop token
            unless the row was truncated.
        response_logp: ``R`` lists of the engine's log-probs of those tokens
            (stored as ``engine_logp``), or None.
        truncated: ``R`` flags: the row hit the length cap without a stop token.
    """
    group_index = torch.repeat_interleave(torch.arange(len(records)), n)
    R = int(group_index.numel())
    if len(response_tokens) != R or len(truncated) != R:
        raise ValueError(f"engine returned {len(response_tokens)} responses for {R} requested rows")
    gi = group_index.tolist()
    stop = tokenizer.stop_ids
    texts = []
    for r in range(R):
        resp = list(response_tokens[r])
        if not truncated[r] and resp and resp[-1] in stop:
            resp = resp[:-1]
        texts.append(tokenizer.decode(resp))
    batch = RolloutBatch.build(
        prompt_tokens=[prompt_tokens[g] for g in gi],
        response_tokens=response_tokens,
        group_index=group_index,
        step_prompt_ids=[rec.prompt_id for rec in records],
        answers=[records[g].answer for g in gi],
        responses=texts,
        policy_version=policy_version,
        pad_id=tokenizer.pad_id,
        truncated=list(truncated),
    )
    if response_logp is not None:
        logp = torch.zeros(R, max(batch.seq_len - 1, 0), dtype=torch.float32)
        for r in range(R):
            lp = response_logp[r]
            if len(lp) != len(response_tokens[r]):
                raise ValueError(f"row {r}: {len(lp)} log-probs for {len(response_tokens[r])} response tokens")
            start = int(batch.prompt_lengths[r]) - 1
            logp[r, start : start + len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
        batch.engine_logp = logp
    return batch.validate()
