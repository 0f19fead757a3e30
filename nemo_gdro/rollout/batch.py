"""The ragged rollout batch (grpo_base.md §2).

A step samples ``P`` prompts; prompt position ``i`` gets ``n_i >= 1`` rollouts,
``R = sum(n_i)`` rows in all. Each row carries its own prompt position
(``group_index``), dataset id (``prompt_ids``) and ground truth (``answers``);
nothing infers a row's prompt from its position. Every reordering goes through
``permute``/``select``, which move all per-row fields together.

Token layout (per row ``r``, ``pl = prompt_lengths[r]``, ``rl = response_lengths[r]``)::

    tokens[r]        = prompt (pl) | response (rl) | pad ...          [S]
    response_mask[r, t] = pl - 1 <= t < pl + rl - 1                   [S - 1]

so ``response_mask`` is aligned with next-token log-probs
``logp[:, t] = log p(tokens[:, t + 1] | tokens[:, :t + 1])``: it is True exactly
where the predicted token is a response token (including a final ``<eos>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

# Optional per-row tensors, with the value used to pad their sequence dimension
# (None: per-row scalars, not padded).
_OPTIONAL_ROW_FIELDS: dict[str, float | None] = {
    "rewards": None,
    "advantages": None,
    "truncated": None,
    "row_policy_version": None,
    "behaviour_logp": 0.0,
    "engine_logp": 0.0,
}


def response_mask_from_lengths(
    prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """``[R, seq_len - 1]`` bool: True where position ``t`` predicts a response token ``t + 1``."""
    t = torch.arange(max(seq_len - 1, 0), device=prompt_lengths.device)
    start = (prompt_lengths - 1).unsqueeze(1)
    end = (prompt_lengths + response_lengths - 1).unsqueeze(1)
    return (t >= start) & (t < end)


def _index_rows(x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[idx]


@dataclass
class RolloutBatch:
    """Rollouts of one step; every per-row field has leading dimension ``R``.

    tokens: int64 ``[R, S]`` right-padded prompt + response (+ ``pad_id``).
    prompt_lengths / response_lengths: int64 ``[R]``, in tokens (the prompt
        includes ``<bos>`` when the engine adds one; the response includes its
        final ``<eos>`` when the row stopped on one).
    response_mask: bool ``[R, S-1]``, see module docstring.
    group_index: int64 ``[R]`` row -> prompt position in ``[0, P)``.
    prompt_ids: int64 ``[R]`` dataset ``prompt_id`` of each row.
    step_prompt_ids: int64 ``[P]`` dataset ``prompt_id`` of each prompt position.
    answers: ground truth of each row (``R`` strings).
    responses: decoded response text of each row (``R`` strings).
    policy_version: version of the weights that generated the batch.
    pad_id: the padding token id used in ``tokens``.
    rewards: optional float ``[R]``.
    behaviour_logp: optional float ``[R, S-1]`` next-token log-probs of the
        behaviour policy (filled by the actor, not the engine).
    advantages: optional float ``[R]`` (broadcast over response tokens).
    truncated: optional bool ``[R]``: the response hit ``max_new_tokens`` without ``<eos>``.
    row_policy_version: optional int64 ``[R]``: the weights version that generated
        each row; set by ``concat`` (which may mix versions, e.g. replayed groups),
        otherwise every row is ``policy_version`` (see ``row_versions()``).
    engine_logp: optional float32 ``[R, S-1]`` the rollout engine's log-probs of the
        sampled response tokens, aligned like ``behaviour_logp`` (0 outside
        ``response_mask``); for measuring the engine-vs-actor mismatch
        (``algorithms/mismatch.py``), never used as the behaviour policy itself.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    response_mask: torch.Tensor
    group_index: torch.Tensor
    prompt_ids: torch.Tensor
    step_prompt_ids: torch.Tensor
    answers: list[str]
    responses: list[str]
    policy_version: int
    pad_id: int = 0
    rewards: torch.Tensor | None = None
    behaviour_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    truncated: torch.Tensor | None = None
    row_policy_version: torch.Tensor | None = None
    engine_logp: torch.Tensor | None = None

    # ------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        prompt_tokens: Sequence[Sequence[int]],
        response_tokens: Sequence[Sequence[int]],
        group_index: torch.Tensor | Sequence[int],
        step_prompt_ids: torch.Tensor | Sequence[int],
        answers: Sequence[str],
        responses: Sequence[str],
        policy_version: int,
        pad_id: int = 0,
        truncated: torch.Tensor | Sequence[bool] | None = None,
    ) -> RolloutBatch:
        """Lay out per-row prompt and response token lists as a validated batch.

        ``prompt_ids`` are derived from ``step_prompt_ids[group_index]``.
        """
        if len(prompt_tokens) != len(response_tokens):
            raise ValueError(f"{len(prompt_tokens)} prompt token lists but {len(response_tokens)} response lists")
        gi = torch.as_tensor(group_index, dtype=torch.int64)
        spi = torch.as_tensor(step_prompt_ids, dtype=torch.int64)
        pl = torch.tensor([len(p) for p in prompt_tokens], dtype=torch.int64)
        rl = torch.tensor([len(r) for r in response_tokens], dtype=torch.int64)
        seq_len = int((pl + rl).max()) if len(pl) else 1
        tokens = torch.full((len(pl), seq_len), pad_id, dtype=torch.int64)
        for r, (p, resp) in enumerate(zip(prompt_tokens, response_tokens, strict=True)):
            row = list(p) + list(resp)
            tokens[r, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
        if gi.numel() != len(pl):
            raise ValueError(f"group_index has {gi.numel()} rows, token lists have {len(pl)}")
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= spi.numel()):
            raise ValueError(f"group_index values must be in [0, {spi.numel()})")
        batch = cls(
            tokens=tokens,
            prompt_lengths=pl,
            response_lengths=rl,
            response_mask=response_mask_from_lengths(pl, rl, seq_len),
            group_index=gi,
            prompt_ids=spi[gi],
            step_prompt_ids=spi,
            answers=list(answers),
            responses=list(responses),
            policy_version=int(policy_version),
            pad_id=int(pad_id),
            truncated=None if truncated is None else torch.as_tensor(truncated, dtype=torch.bool),
        )
        batch.validate()
        return batch

    # -------------------------------------------------------------- sizes
    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(self.step_prompt_ids.numel())

    @property
    def num_response_tokens(self) -> int:
        """Total response tokens of the batch (the token-mean loss denominator on one rank)."""
        return int(self.response_lengths.sum())

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """``[R]`` prompt + response tokens."""
        return self.prompt_lengths + self.response_lengths

    def attention_mask(self) -> torch.Tensor:
        """``[R, S]`` bool: True on real (non-padding) tokens."""
        return torch.arange(self.seq_len).unsqueeze(0) < self.sequence_lengths.unsqueeze(1)

    def row_versions(self) -> torch.Tensor:
        """``[R]`` int64 policy version of each row."""
        if self.row_policy_version is not None:
            return self.row_policy_version
        return torch.full((self.num_rows,), self.policy_version, dtype=torch.int64)

    def group_sizes(self) -> torch.Tensor:
        """``[P]`` int64: number of rows of each prompt position (``n_i``)."""
        return torch.bincount(self.group_index, minlength=self.num_prompts)

    # ---------------------------------------------------------- reordering
    def _row_fields(self) -> list[str]:
        names = ["tokens", "prompt_lengths", "response_lengths", "response_mask", "group_index", "prompt_ids"]
        return names + list(_OPTIONAL_ROW_FIELDS)

    def _take(self, idx: torch.Tensor) -> dict[str, object]:
        out: dict[str, object] = {name: _index_rows(getattr(self, name), idx) for name in self._row_fields()}
        rows = idx.tolist()
        out["answers"] = [self.answers[r] for r in rows]
        out["responses"] = [self.responses[r] for r in rows]
        return out

    def permute(self, perm: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """New batch whose row ``k`` is this batch's row ``perm[k]``.

        Every per-row field moves together; ``group_index`` values and
        ``step_prompt_ids`` are unchanged, so a row stays attached to its prompt.
        Map row statistics back with ``inverse = torch.argsort(perm)``.
        """
        p = torch.as_tensor(perm, dtype=torch.int64)
        if p.shape != (self.num_rows,) or not torch.equal(torch.sort(p).values, torch.arange(self.num_rows)):
            raise ValueError(f"permute needs a permutation of range({self.num_rows}), got {p.tolist()}")
        return replace(self, **self._take(p))  # type: ignore[arg-type]

    def select(self, rows: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """New batch of the given rows (in that order; a bool mask ``[R]`` also works).

        Prompt positions left without rows are dropped and ``group_index`` is
        re-indexed densely, keeping the relative order of the remaining prompts,
        so the result still satisfies ``validate()``.
        """
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            if idx.shape != (self.num_rows,):
                raise ValueError(f"select mask must have shape [{self.num_rows}], got {list(idx.shape)}")
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_rows):
            raise IndexError(f"select rows must be in [0, {self.num_rows}), got {idx.tolist()}")
        taken = self._take(idx)
        kept = torch.unique(self.group_index[idx])  # sorted
        taken["group_index"] = torch.searchsorted(kept, self.group_index[idx])
        return replace(self, step_prompt_ids=self.step_prompt_ids[kept], **taken)  # type: ignore[arg-type]

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Stack batches: prompts of batch ``b`` get positions offset by the prompts before it.

        Tokens are right-padded to the longest ``S``. All batches must share
        ``pad_id`` and have the same optional fields set. Batches of different
        policy versions may be mixed (e.g. a fresh batch plus replayed groups):
        the result's ``policy_version`` is the newest one and
        ``row_policy_version`` records each row's own version.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        first = batches[0]
        for k, b in enumerate(batches):
            if b.pad_id != first.pad_id:
                raise ValueError(f"concat: batch {k} has pad_id {b.pad_id}, batch 0 has {first.pad_id}")
            for name in _OPTIONAL_ROW_FIELDS:
                if name == "row_policy_version":
                    continue  # always filled below
                if (getattr(b, name) is None) != (getattr(first, name) is None):
                    raise ValueError(f"concat: optional field {name!r} is set on some batches but not on batch {k}")
        seq_len = max(b.seq_len for b in batches)

        def pad_seq(x: torch.Tensor, width: int, value: float | bool) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        offsets = torch.tensor([0] + [b.num_prompts for b in batches[:-1]]).cumsum(0).tolist()
        out: dict[str, object] = {
            "tokens": torch.cat([pad_seq(b.tokens, seq_len, b.pad_id) for b in batches]),
            "response_mask": torch.cat([pad_seq(b.response_mask, seq_len - 1, False) for b in batches]),
            "prompt_lengths": torch.cat([b.prompt_lengths for b in batches]),
            "response_lengths": torch.cat([b.response_lengths for b in batches]),
            "group_index": torch.cat([b.group_index + off for b, off in zip(batches, offsets, strict=True)]),
            "prompt_ids": torch.cat([b.prompt_ids for b in batches]),
            "step_prompt_ids": torch.cat([b.step_prompt_ids for b in batches]),
            "answers": [a for b in batches for a in b.answers],
            "responses": [t for b in batches for t in b.responses],
            "row_policy_version": torch.cat([b.row_versions() for b in batches]),
            "policy_version": max(b.policy_version for b in batches),
        }
        for name, pad_value in _OPTIONAL_ROW_FIELDS.items():
            if name == "row_policy_version" or getattr(first, name) is None:
                continue
            parts = [getattr(b, name) for b in batches]
            if pad_value is not None:
                parts = [pad_seq(x, seq_len - 1, pad_value) for x in parts]
            out[name] = torch.cat(parts)
        return replace(first, **out)  # type: ignore[arg-type]

    # ---------------------------------------------------------- validation
    def validate(self) -> RolloutBatch:
        """Check internal consistency; raises ``ValueError`` naming the first problem. Returns ``self``."""
        R, S = (int(d) for d in self.tokens.shape) if self.tokens.dim() == 2 else (-1, -1)
        if R < 0:
            raise ValueError(f"tokens must be 2-D [R, S], got shape {list(self.tokens.shape)}")
        if self.tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64, got {self.tokens.dtype}")
        P = self.num_prompts
        for name in ("prompt_lengths", "response_lengths", "group_index", "prompt_ids"):
            x = getattr(self, name)
            if x.shape != (R,) or x.dtype != torch.int64:
                raise ValueError(f"{name} must be int64 [{R}], got {x.dtype} {list(x.shape)}")
        if self.step_prompt_ids.dim() != 1 or self.step_prompt_ids.dtype != torch.int64:
            spi = self.step_prompt_ids
            raise ValueError(f"step_prompt_ids must be int64 [P], got {spi.dtype} {list(spi.shape)}")
        for name in ("answers", "responses"):
            if len(getattr(self, name)) != R:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {R} rows")
        gi = self.group_index
        if R and (int(gi.min()) < 0 or int(gi.max()) >= P):
            raise ValueError(f"group_index values must be in [0, {P}), got range [{int(gi.min())}, {int(gi.max())}]")
        empty = (torch.bincount(gi, minlength=P) == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"group_index does not cover prompt positions {empty.tolist()} (every prompt needs >= 1 row)"
            )
        mismatch = (self.prompt_ids != self.step_prompt_ids[gi]).nonzero().flatten()
        if mismatch.numel():
            r = int(mismatch[0])
            raise ValueError(
                f"prompt_ids[{r}] = {int(self.prompt_ids[r])} but step_prompt_ids[group_index[{r}] = {int(gi[r])}]"
                f" = {int(self.step_prompt_ids[gi[r]])} ({mismatch.numel()} rows misaligned)"
            )
        if R and int(self.prompt_lengths.min()) < 1:
            raise ValueError("every row needs a prompt of >= 1 token")
        if R and int(self.response_lengths.min()) < 0:
            raise ValueError("response_lengths must be >= 0")
        too_long = (self.sequence_lengths > S).nonzero().flatten()
        if too_long.numel():
            raise ValueError(f"rows {too_long.tolist()} have prompt + response longer than S = {S}")
        if self.response_mask.shape != (R, max(S - 1, 0)) or self.response_mask.dtype != torch.bool:
            raise ValueError(
                f"response_mask must be bool [{R}, {S - 1}], "
                f"got {self.response_mask.dtype} {list(self.response_mask.shape)}"
            )
        bad = (self.response_mask != response_mask_from_lengths(self.prompt_lengths, self.response_lengths, S)).any(1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"response_mask does not match prompt/response lengths on rows {rows}")
        stray = ((self.tokens != self.pad_id) & ~self.attention_mask()).any(1)
        if stray.any():
            raise ValueError(f"rows {stray.nonzero().flatten().tolist()} have non-pad tokens after their sequence end")
        for name in ("rewards", "advantages", "truncated", "row_policy_version"):
            x = getattr(self, name)
            if x is not None and x.shape != (R,):
                raise ValueError(f"{name} must have shape [{R}], got {list(x.shape)}")
        for name in ("behaviour_logp", "engine_logp"):
            x = getattr(self, name)
            if x is not None and x.shape != (R, max(S - 1, 0)):
                raise ValueError(f"{name} must have shape [{R}, {S - 1}], got {list(x.shape)}")
        return self

    def __repr__(self) -> str:
        set_fields = [
            f.name for f in fields(self) if f.name in _OPTIONAL_ROW_FIELDS and getattr(self, f.name) is not None
        ]
        return (
            f"RolloutBatch(rows={self.num_rows}, prompts={self.num_prompts}, seq_len={self.seq_len}, "
            f"response_tokens={self.num_response_tokens}, policy_version={self.policy_version}, set={set_fields})"
        )
