"""Prompt datasets with stable integer prompt ids (grpo_base.md §1).

Every prompt has a ``prompt_id`` in ``[0, N)`` that keys all per-prompt
statistics. It is the dataset's explicit ``uid``/``index`` column when there is
one, otherwise the row index. Explicit ids that are not already ``0..N-1``
(arbitrary unique ints, or strings) are remapped to dense ids in *sorted* order
of the original ids -- so the mapping does not depend on the file's row order --
and the original id is kept in ``meta["orig_id"]``.

A dataset with missing or duplicated ids, or without a string prompt and a
string answer on every row, is rejected at load time with a ``DatasetError``
naming the offending rows (``row i`` for in-memory rows, 0-based; ``line n``
for JSONL files, 1-based). Silently falling back to a shared or random id
breaks every per-prompt statistic.

Prompt and answer text is bounded too: an empty or whitespace-only prompt or
answer, or a prompt longer than ``max_prompt_chars`` characters (default
``DEFAULT_MAX_PROMPT_CHARS`` = 64 KiB; ``None`` = no bound), is rejected naming
the rows. The bound is a guard against a wrong column or a corrupted file;
the token limit of training (``data.max_prompt_tokens``) is applied by the
file loaders.

``fingerprint()`` identifies the content (``data/fingerprint.py``): the trainer
stores it in checkpoints and compares it on resume.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_gdro.data.arithmetic import ArithmeticConfig, ArithmeticProblem, make_problems
from nemo_gdro.data.errors import DatasetError
from nemo_gdro.data.fingerprint import DatasetFingerprint

DEFAULT_MAX_PROMPT_CHARS = 64 * 1024


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its dense id, text, ground-truth answer and any other fields."""

    prompt_id: int
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


_MAX_LISTED = 10


def _list(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:_MAX_LISTED])
    more = len(labels) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _as_index(i: object) -> int:
    """An integer index from int / numpy int / 0-d tensor; rejects bools and floats."""
    if isinstance(i, bool):
        raise TypeError(f"prompt id must be an integer, got bool {i!r}")
    return operator.index(i)  # type: ignore[arg-type]


def text_errors(
    prompts: Sequence[Any], answers: Sequence[Any], labels: Sequence[str], max_prompt_chars: int | None
) -> list[str]:
    """Messages for empty / whitespace-only / over-long prompts and empty answers
    (string values only; type errors are reported by the callers)."""
    empty_p = [lab for p, lab in zip(prompts, labels, strict=True) if isinstance(p, str) and not p.strip()]
    empty_a = [lab for a, lab in zip(answers, labels, strict=True) if isinstance(a, str) and not a.strip()]
    errors = []
    if empty_p:
        errors.append(f"empty or whitespace-only prompt on {_list(empty_p)}")
    if empty_a:
        errors.append(f"empty or whitespace-only answer on {_list(empty_a)}")
    if max_prompt_chars is not None:
        long_p = [
            f"{lab} ({len(p)} chars)"
            for p, lab in zip(prompts, labels, strict=True)
            if isinstance(p, str) and len(p) > max_prompt_chars
        ]
        if long_p:
            errors.append(f"prompt longer than max_prompt_chars={max_prompt_chars} on {_list(long_p)}")
    return errors


class PromptDataset:
    """Records indexed by dense ``prompt_id`` in ``[0, len)``.

    ``PromptDataset(records)`` accepts records in any order but requires their
    ids to be exactly ``0..N-1``, a non-empty prompt and answer on every record
    and prompts of at most ``max_prompt_chars`` characters (``None``: no bound).
    """

    def __init__(
        self, records: Iterable[PromptRecord], *, max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS
    ) -> None:
        recs = sorted(records, key=lambda r: r.prompt_id)
        bad = [f"position {k} has prompt_id {r.prompt_id}" for k, r in enumerate(recs) if r.prompt_id != k]
        if bad:
            raise DatasetError(f"PromptDataset ids must be exactly 0..{len(recs) - 1}: {_list(bad)}")
        bounded = max_prompt_chars is None or (type(max_prompt_chars) is int and max_prompt_chars >= 1)
        if not bounded:
            raise ValueError(f"max_prompt_chars must be a positive integer or None, got {max_prompt_chars!r}")
        errors = []
        for what in ("prompt", "answer"):
            wrong = [
                f"prompt_id {r.prompt_id} ({type(getattr(r, what)).__name__})"
                for r in recs
                if not isinstance(getattr(r, what), str)
            ]
            if wrong:
                errors.append(f"{what} must be a string, not on {_list(wrong)}")
        errors += text_errors(
            [r.prompt for r in recs], [r.answer for r in recs], [f"prompt_id {r.prompt_id}" for r in recs], max_prompt_chars
        )
        if errors:
            raise DatasetError("; ".join(errors))
        self._records: list[PromptRecord] = recs

    # ------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, prompt_id: int) -> PromptRecord:
        i = _as_index(prompt_id)
        if not 0 <= i < len(self._records):
            raise IndexError(f"prompt_id {i} out of range [0, {len(self._records)})")
        return self._records[i]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self._records)

    def get_many(self, ids: Iterable[int] | torch.Tensor) -> list[PromptRecord]:
        """Records for ``ids`` (a list or an int tensor ``[P]``), in the given order."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return [self[i] for i in seq]

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self._records]

    @property
    def answers(self) -> list[str]:
        return [r.answer for r in self._records]

    def __repr__(self) -> str:
        return f"PromptDataset(num_prompts={len(self)})"

    def fingerprint(self) -> DatasetFingerprint:
        """Identity of the content (uid per dense id when records carry ``meta["uid"]``, hashes)."""
        return DatasetFingerprint.of(self._records)

    # ------------------------------------------------------- constructors
    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        id_field: str | None = "auto",
        *,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
    ) -> PromptDataset:
        """Build from dict rows.

        Args:
            id_field: ``"auto"`` uses ``uid`` if any row has it, else ``index`` if
                any row has it, else the row index; a column name forces that
                column; ``None`` forces the row index.
            prompt_field / answer_field: names of the string prompt and answer columns.
            max_prompt_chars: longest accepted prompt in characters (``None``: no bound).

        Every other column goes to ``meta``; the original explicit id is kept as
        ``meta["orig_id"]``.
        """
        labels = [f"row {i}" for i in range(len(rows))]
        return cls._build(rows, labels, id_field, prompt_field, answer_field, max_prompt_chars)

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike[str],
        id_field: str | None = "auto",
        *,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
    ) -> PromptDataset:
        """Build from a JSON-lines file (one object per line; blank lines are skipped).

        Errors name 1-based line numbers of ``path``.
        """
        from contextlib import closing

        from nemo_gdro.data.files import text_lines  # UTF-8 errors name the line

        rows: list[Any] = []
        labels: list[str] = []
        bad: list[str] = []
        with closing(text_lines(path)) as lines:
            for lineno, line in lines:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    bad.append(f"line {lineno} ({e.msg})")
                    continue
                labels.append(f"line {lineno}")
        if bad:
            raise DatasetError(f"{path}: invalid JSON on {_list(bad)}")
        try:
            return cls._build(rows, labels, id_field, prompt_field, answer_field, max_prompt_chars)
        except DatasetError as e:
            raise DatasetError(f"{path}: {e}") from None

    def to_rows(self) -> list[dict[str, Any]]:
        """Rows with explicit ``uid`` = prompt_id (round-trips through ``from_rows``)."""
        return [{**r.meta, "uid": r.prompt_id, "prompt": r.prompt, "answer": r.answer} for r in self._records]

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for row in self.to_rows():
                f.write(json.dumps(row) + "\n")

    @classmethod
    def _build(
        cls,
        rows: Sequence[Any],
        labels: Sequence[str],
        id_field: str | None,
        prompt_field: str,
        answer_field: str,
        max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
    ) -> PromptDataset:
        not_dict = [lab for row, lab in zip(rows, labels, strict=True) if not isinstance(row, Mapping)]
        if not_dict:
            raise DatasetError(f"rows must be JSON objects / dicts: {_list(not_dict)}")

        errors: list[str] = []
        for fname in (prompt_field, answer_field):
            missing = [lab for row, lab in zip(rows, labels, strict=True) if fname not in row]
            if missing:
                errors.append(f"missing field {fname!r} on {_list(missing)}")
            wrong = [
                f"{lab} ({type(row[fname]).__name__})"
                for row, lab in zip(rows, labels, strict=True)
                if fname in row and not isinstance(row[fname], str)
            ]
            if wrong:
                errors.append(f"field {fname!r} must be a string, not on {_list(wrong)}")
        errors += text_errors(
            [row.get(prompt_field) for row in rows], [row.get(answer_field) for row in rows], labels, max_prompt_chars
        )

        if id_field == "auto":
            id_field = next((c for c in ("uid", "index") if any(c in row for row in rows)), None)

        orig_ids: list[Any] | None = None
        if id_field is not None:
            orig_ids = [row.get(id_field) for row in rows]
            missing = [lab for v, lab in zip(orig_ids, labels, strict=True) if v is None]
            if missing:
                errors.append(f"missing id {id_field!r} on {_list(missing)}")
            bad_type = [
                f"{lab} ({v!r})"
                for v, lab in zip(orig_ids, labels, strict=True)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | str))
            ]
            if bad_type:
                errors.append(f"id {id_field!r} must be an int or a string, not on {_list(bad_type)}")
            kinds = {type(v) for v in orig_ids if isinstance(v, int | str) and not isinstance(v, bool)}
            if len(kinds) > 1:
                errors.append(f"id {id_field!r} mixes ints and strings")
            where: dict[Any, list[str]] = {}
            for v, lab in zip(orig_ids, labels, strict=True):
                if v is not None:
                    where.setdefault(v, []).append(lab)
            dups = [f"{v!r} on {', '.join(labs)}" for v, labs in where.items() if len(labs) > 1]
            if dups:
                errors.append(f"duplicate id {id_field!r}: {_list(dups)}")
        if errors:
            raise DatasetError("; ".join(errors))

        n = len(rows)
        if orig_ids is None:
            dense = list(range(n))
        elif all(isinstance(v, int) for v in orig_ids) and set(orig_ids) == set(range(n)):
            dense = list(orig_ids)
        else:
            # Sorted order, not row order: the same ids give the same dense ids
            # however the file is shuffled.
            rank = {v: k for k, v in enumerate(sorted(orig_ids))}
            dense = [rank[v] for v in orig_ids]

        records = []
        for k, row in enumerate(rows):
            meta = {c: v for c, v in row.items() if c not in (prompt_field, answer_field, id_field)}
            if orig_ids is not None:
                meta["orig_id"] = orig_ids[k]
            records.append(PromptRecord(dense[k], row[prompt_field], row[answer_field], meta))
        return cls(records, max_prompt_chars=max_prompt_chars)


def _problem_rows(problems: Sequence[ArithmeticProblem], split_name: str) -> list[dict[str, Any]]:
    return [
        {
            "prompt": p.text,
            "answer": p.answer,
            "difficulty": p.difficulty,
            "op": p.op,
            "a": p.a,
            "b": p.b,
            "sft_target": p.sft_target,
            "split": split_name,
        }
        for p in problems
    ]


def _flip_signs(
    problems: Sequence[ArithmeticProblem], fraction: float, rng: np.random.Generator
) -> list[ArithmeticProblem]:
    """``problems`` with the sign of ``sft_target`` flipped on a random ``fraction`` of them (zero answers kept)."""
    draws = rng.random(len(problems))
    return [
        dataclasses.replace(p, sft_target=p.answer[1:] if p.answer.startswith("-") else "-" + p.answer)
        if u < fraction and p.answer != "0"
        else p
        for p, u in zip(problems, draws)
    ]


@dataclass(frozen=True)
class ArithmeticSplits:
    """The arithmetic task's splits, pairwise disjoint by prompt text.

    train: the RL prompt pool. eval: held-out problems (report on these only).
    validation: a second held-out set from the same distribution, for choosing
        settings (None when not requested). sft: the warm-start pool, disjoint
        from every other split (None: the warm start uses ``train``).
    """

    train: PromptDataset
    eval: PromptDataset
    validation: PromptDataset | None = None
    sft: PromptDataset | None = None

    @property
    def sft_pool(self) -> PromptDataset:
        """What the SFT warm start trains on: ``sft`` if drawn, else ``train``."""
        return self.sft if self.sft is not None else self.train


def arithmetic_splits(
    num_train: int,
    num_eval: int,
    seed: int,
    config: ArithmeticConfig | None = None,
    *,
    num_validation: int = 0,
    num_sft: int = 0,
    unique_train: bool = False,
    sft_config: ArithmeticConfig | None = None,
    sft_sign_flip: float = 0.0,
) -> ArithmeticSplits:
    """All splits of the arithmetic task, drawn deterministically from ``seed``.

    Draw order (each split excludes the prompt texts of the ones before it):
    eval (unique, sub-stream 1), validation (unique, sub-stream 2), train
    (sub-stream 0; unique if ``unique_train``), sft (sub-stream 3, repeats
    allowed, from ``sft_config`` or ``config``). With ``num_validation=0`` and
    ``num_sft=0`` the train and eval sets are exactly those of
    :func:`arithmetic_dataset` (the default run's data).

    ``sft_sign_flip``: the fraction (in [0, 1]) of SFT-pool problems whose target
    carries the wrong sign (``"82"`` -> ``"-82"``, ``"-42"`` -> ``"42"``; a zero
    answer is left alone), chosen by sub-stream 4. The warm start then learns a
    wrong habit that applies to every problem, as a base model mixes good and
    bad habits; the verifier scores the true answer, so RL can gain on held-out
    problems by unlearning it. Only the SFT pool changes (``meta["sft_flipped"]``).

    ``meta`` holds ``difficulty``, ``op``, ``a``, ``b``, ``sft_target``, ``split``.
    Raises ``ValueError`` (naming the split) when a unique split cannot be drawn.
    """
    for name, value in (("num_validation", num_validation), ("num_sft", num_sft)):
        if value < 0:
            raise ValueError(f"arithmetic_splits {name} must be >= 0, got {value}")
    if not 0.0 <= sft_sign_flip <= 1.0:
        raise ValueError(f"arithmetic_splits sft_sign_flip must be in [0, 1], got {sft_sign_flip}")
    banned: set[str] = set()

    def draw(name: str, num: int, stream: int, unique: bool, cfg: ArithmeticConfig | None) -> list[ArithmeticProblem]:
        try:
            problems = make_problems(num, seed, config=cfg, exclude=banned, unique=unique, stream=stream)
        except ValueError as err:
            raise ValueError(f"arithmetic split {name!r} ({num} problems): {err}") from None
        banned.update(p.text for p in problems)
        return problems

    held = draw("eval", num_eval, 1, True, config)
    val = draw("validation", num_validation, 2, True, config) if num_validation else None
    train = draw("train", num_train, 0, unique_train, config)
    sft = draw("sft", num_sft, 3, False, sft_config or config) if num_sft else None
    if sft is not None and sft_sign_flip > 0:
        sft = _flip_signs(sft, sft_sign_flip, np.random.default_rng([seed, 4]))

    def ds(problems: Sequence[ArithmeticProblem] | None, name: str) -> PromptDataset | None:
        if problems is None:
            return None
        rows = _problem_rows(problems, name)
        if name == "sft" and sft_sign_flip > 0:
            for row in rows:
                row["sft_flipped"] = row["sft_target"] != row["answer"]
        return PromptDataset.from_rows(rows, id_field=None)

    return ArithmeticSplits(
        train=ds(train, "train"), eval=ds(held, "eval"), validation=ds(val, "validation"), sft=ds(sft, "sft")
    )


def arithmetic_dataset(
    num_train: int, num_eval: int, seed: int, config: ArithmeticConfig | None = None
) -> tuple[PromptDataset, PromptDataset]:
    """Train and held-out eval datasets of arithmetic problems.

    Eval problems are unique and drawn first (sub-stream 1); train problems are
    drawn from sub-stream 0 excluding every eval prompt text, so no held-out
    problem appears in train. Train may repeat a problem (the 1-digit space is
    small and the heavy-tailed mix is kept); repeats are distinct prompt ids.
    ``meta`` holds ``difficulty``, ``op``, ``a``, ``b``, ``sft_target``, ``split``.
    :func:`arithmetic_splits` adds a validation split and a disjoint SFT pool.
    """
    splits = arithmetic_splits(num_train, num_eval, seed, config)
    return splits.train, splits.eval
