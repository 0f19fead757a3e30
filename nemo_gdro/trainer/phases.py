"""The phases around the RL steps: the SFT warm start and held-out evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nemo_gdro.algorithms.advantages import pass_at_k
from nemo_gdro.algorithms.segments import segment_sum
from nemo_gdro.data.dataset import PromptRecord
from nemo_gdro.rollout.seeds import prompt_seeds
from nemo_gdro.typed_config import ConfigError

#: Eval draws use their own (seed, step) stream, far from the training steps'.
EVAL_STEP_OFFSET = 1_000_000_000


def run_sft(components, steps: int, batch_size: int, seed: int) -> dict[str, float]:
    """Next-token training on the task's worked examples (prompt tokens masked out).

    Every rank builds the same batch; each trains its DP slice, normalised by
    the whole batch's token count (DDP sums the gradients).
    """
    c = components
    dataset = c.task.sft
    if dataset is None:
        raise ValueError(f"sft.steps={steps} but task {c.task.name!r} has no worked examples; set sft.steps=0")
    gen = torch.Generator().manual_seed(seed + 17)
    last: dict[str, float] = {}
    for _ in range(steps):
        ids = torch.randint(0, len(dataset), (batch_size,), generator=gen).tolist()
        tokens, mask = sft_batch(dataset.get_many(ids), c.tokenizer)
        count = float(mask.sum())
        tokens, mask = tokens[c.dp.rank :: c.dp.size], mask[c.dp.rank :: c.dp.size]

        def loss_fn(stats, extras, count=count):
            m = extras["response_mask"]
            return -(stats["logp"] * m).sum() / count, {}

        # Row length = through its last target token (rows are right-padded).
        lengths = (mask * torch.arange(2, mask.shape[1] + 2)).amax(1).clamp(min=2)
        last = c.actor.train_step(tokens, {"response_mask": mask.to(torch.float32)}, loss_fn, lengths=lengths)
    return {"sft/loss": float(last.get("loss", math.nan)), "sft/steps": float(steps)}


def sft_batch(records: Sequence[PromptRecord], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, S], target mask [B, S-1])``: prompt + worked answer, the answer's positions masked in."""
    seqs, prompt_lens = [], []
    for rec in records:
        prompt = tokenizer.encode_prompt(rec.prompt)
        target = tokenizer.encode_target(rec.meta["sft_target"])
        seqs.append(prompt + target)
        prompt_lens.append(len(prompt))
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), tokenizer.pad_id, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width - 1, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, p - 1 : len(s) - 1] = True  # positions predicting the target tokens
    return tokens, mask


def no_eval_suites(cfg) -> str:
    """Why a run has no held-out evaluation, and the key that gives it one."""
    if hasattr(cfg.data, "eval_files"):
        return (f"data.task={cfg.data.task} has no eval suites (data.eval_files is empty); add one with "
                "+data.eval_files.<benchmark>=[FILE] (e.g. +data.eval_files.math500=[/data/math500.jsonl])")
    return f"data.task={cfg.data.task} has no eval suites"


def evaluate(components, step: int, k: int, seed: int) -> dict[str, float]:
    """Held-out mean@k, unbiased pass@1 / pass@k: pooled over the task's suites, per suite
    when there are several, and per difficulty band where records carry ``meta["difficulty"]``.

    Raises :class:`ConfigError` when the task has no eval suites (``nemo-gdro eval`` of such a
    run; training skips evaluation instead, see :class:`~nemo_gdro.trainer.loop.Trainer`)."""
    c = components
    if not c.task.eval_suites:
        raise ConfigError(f"nothing to evaluate: {no_eval_suites(c.cfg)}")
    seed = seed + 1  # eval samples use their own seed stream
    # Always evaluate the policy as it is now, never a stale copy.
    c.eval_engine.load_weights(c.actor.export_hf_state_dict(), version=max(step, 0))
    pooled_p1, pooled_pk, out = [], [], {}
    for name, suite in c.task.eval_suites.items():
        records = list(suite.dataset)
        n = torch.full((len(records),), k, dtype=torch.int64)
        seeds = prompt_seeds(seed, EVAL_STEP_OFFSET + step, [r.prompt_id for r in records])
        batch = c.eval_engine.generate(records, n, seeds)
        verdicts = suite.verifier.verify_batch(batch.responses, batch.answers).correct  # correctness, not rewards
        correct = segment_sum(verdicts.to(torch.int64), batch.group_index, len(records))
        p1, pk = pass_at_k(n, correct, 1), pass_at_k(n, correct, k)
        pooled_p1.append(p1)
        pooled_pk.append(pk)
        prefix = f"eval/{name}/" if len(c.task.eval_suites) > 1 else "eval/"
        if len(c.task.eval_suites) > 1:
            out.update({f"{prefix}mean@k": float(p1.mean()), f"{prefix}pass@{k}": float(pk.mean())})
        levels = torch.tensor([int(r.meta.get("difficulty", 0)) for r in records])
        for level in sorted(set(levels.tolist())):
            sel = levels == level
            out[f"{prefix}pass@1/band_{level}"] = float(p1[sel].mean())
            out[f"{prefix}pass@{k}/band_{level}"] = float(pk[sel].mean())
    p1, pk = torch.cat(pooled_p1), torch.cat(pooled_pk)
    pooled = {"eval/mean@k": float(p1.mean()), "eval/pass@1": float(p1.mean()), f"eval/pass@{k}": float(pk.mean())}
    return {**pooled, **out}
