"""Per-prompt sampling seeds that do not depend on the data-parallel layout.

Every prompt position of a step gets one seed from
``(base_seed, step, round, prompt_id, occurrence)``, where ``occurrence`` counts
the earlier positions of the same step with the same ``prompt_id`` (a resampler
may draw a prompt twice; the two draws must not get the same samples) and
``round`` is the generation round of the step (dynamic sampling generates more
prompts after the first round; round 0's seeds are those of a step without
rounds, so the default behaviour is unchanged). The seed of
one position does not depend on the other prompts, on where the list is cut
into DP shards, or on which rank generates it -- as long as the caller computes
the seeds over the step's *whole* prompt list (every rank can: the list is
replicated) and then hands each rank its slice.

Rollout ``j`` of a prompt with seed ``s`` is sampled with seed ``s + j``
(vLLM gives child ``j`` of an ``n > 1`` request seed ``s + j``; the HF engine
does the same with one ``torch.Generator`` per row), so adding rollouts to a
prompt does not change its first ones (up to floating-point effects of the
different batch shape on the logits).

Range: seeds are in ``[0, 2**62)``, so ``s + j`` stays a non-negative int64
for any realistic ``n``; ``torch.Generator.manual_seed`` takes
``[-2**63, 2**64)`` and vLLM's ``SamplingParams.seed`` any int that its
generator accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["SEED_BITS", "occurrence_index", "prompt_seeds"]

SEED_BITS = 62
_MAX_INPUT = 2**63  # inputs are mixed as unsigned 64-bit words

# splitmix64 (Steele, Lea, Flood 2014) increment and finaliser multipliers.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Domain tag so these seeds never coincide with another use of the same words.
_TAG = np.uint64(0x6E656D6F5F676472)  # "nemo_gdr"


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 step on a uint64 array (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def occurrence_index(prompt_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """int64 ``[P]``: how many earlier positions hold the same id (``[5, 3, 5, 5] -> [0, 0, 1, 2]``)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64).flatten()
    P = ids.numel()
    if P == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(ids, stable=True)  # equal ids keep their list order
    s = ids[order]
    pos = torch.arange(P)
    new_run = torch.ones(P, dtype=torch.bool)
    new_run[1:] = s[1:] != s[:-1]
    run_start = torch.cummax(torch.where(new_run, pos, torch.zeros_like(pos)), 0).values
    occ = torch.empty(P, dtype=torch.int64)
    occ[order] = pos - run_start
    return occ


def prompt_seeds(
    base_seed: int, step: int, prompt_ids: torch.Tensor | Sequence[int], round: int = 0
) -> torch.Tensor:
    """int64 ``[P]`` seeds in ``[0, 2**62)``, one per prompt position of a step's round.

    ``seed[i] = splitmix64-chain(tag, base_seed, step, [round,] prompt_ids[i], occurrence[i]) >> 2``
    (``round`` enters the chain only when it is > 0, so round 0 keeps the seeds of
    a step without rounds).

    Args:
        base_seed: the run's seed (use a different one for evaluation), ``>= 0``.
        step: training step (or an offset step for evaluation), ``>= 0``.
        prompt_ids: int ``[P]`` dataset ids of the round's prompts, in order
            (the whole round, before any DP split), each ``>= 0``.
        round: the step's generation round (``algorithm.group_filter=dynamic_sampling``), ``>= 0``.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64).flatten()
    for name, value in (("base_seed", base_seed), ("step", step), ("round", round)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= int(value) < _MAX_INPUT:
            raise ValueError(f"prompt_seeds: {name} must be an int in [0, 2**63), got {value!r}")
    if ids.numel() and int(ids.min()) < 0:
        bad = int((ids < 0).nonzero()[0])
        raise ValueError(f"prompt_seeds: prompt_ids must be >= 0, got {int(ids[bad])} at position {bad}")
    occ = occurrence_index(ids)
    with np.errstate(over="ignore"):
        h = _mix(np.full(ids.numel(), _TAG, dtype=np.uint64) ^ np.uint64(int(base_seed)))
        h = _mix(h ^ np.uint64(int(step)))
        if round:
            h = _mix(h ^ np.uint64(int(round)))
        h = _mix(h ^ ids.numpy().astype(np.uint64))
        h = _mix(h ^ occ.numpy().astype(np.uint64))
    return torch.from_numpy((h >> np.uint64(64 - SEED_BITS)).astype(np.int64))
