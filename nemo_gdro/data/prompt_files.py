"""Prompt datasets from training / eval files (``data.train_files``, ``data.eval_files``).

``load_prompt_files(files, ...)`` reads every file (JSONL, Parquet or CSV, layout
auto-detected per file or forced, see ``files.py``) and:

1. **deduplicates** rows by normalised prompt text (``text.normalize_prompt``:
   DAPO instruction removed, NFC, whitespace runs -> one space; case is kept).
   DAPO-Math-17k holds ~17k prompts repeated ~100x (1.79M rows). Rows of one
   prompt whose answers differ (after stripping surrounding whitespace) are an
   error naming both rows. Exact copies are folded while reading (one dict
   lookup per row), so only the distinct texts are normalised and kept;
2. drops non-English prompts when asked (``english_only``: any CJK character);
3. gives each prompt a **uid**, a stable 63-bit hash of its normalised text
   (``meta["uid"]``), and **dense prompt ids in sorted uid order**: the ids do not
   depend on row order, on how rows are split over files, or on which file
   (or layout) a copy came from;
4. formats the prompt (``prompt_format.render_prompts``) and, with
   ``max_prompt_tokens``, drops (``overlong_prompts="drop"``, counted) or rejects
   (``"error"``, naming the row) prompts whose *final* token count exceeds it.

The text kept for a prompt whose copies differ only in normalisation is its
most frequent spelling (ties: the smallest string), a choice that does not
depend on row order; its other columns come from that spelling's first row. ``meta`` holds ``uid``, ``problem``
(the text without the DAPO instruction), ``source`` (file), ``row`` (``line n``
1-based for JSONL, ``row n`` 0-based for Parquet), ``layout``, ``num_rows``
(copies folded into it) and the layout's other columns (``data_source``,
``ability``, ``extra_info``...).

On resume, the trainer compares ``dataset.fingerprint()`` with the stored one
(``fingerprint.py``); any change of prompts, answers or formatting shows there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_gdro.data.dataset import DEFAULT_MAX_PROMPT_CHARS, DatasetError, PromptDataset, PromptRecord, _list
from nemo_gdro.data.files import (
    TRAIN_LAYOUTS, Chunk, Layout, detect_layout, file_format, file_problem, read_chunks, row_label,
)
from nemo_gdro.data.prompt_format import PromptFormat, render_prompts, strip_dapo
from nemo_gdro.data.text import has_cjk, normalize_prompt, prompt_uid

OVERLONG_POLICIES = ("drop", "error")
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class LoadReport:
    """What loading did. Rows: ``rows_read = unique_prompts + duplicate_rows``.
    Prompts: ``num_prompts = unique_prompts - non_english_dropped - excluded - too_long_dropped``."""

    name: str
    files: tuple[str, ...]
    layouts: tuple[str, ...]
    rows_read: int
    unique_prompts: int  # after dedup, before filters
    duplicate_rows: int  # rows_read - unique_prompts
    non_english_dropped: int  # prompts
    excluded: int  # prompts (exclude_uids)
    too_long_dropped: int  # prompts
    num_prompts: int  # kept

    def summary(self) -> str:
        return (
            f"{self.name}: {self.rows_read} rows from {len(self.files)} file(s) ({', '.join(sorted(set(self.layouts)))}), "
            f"{self.duplicate_rows} duplicate rows -> {self.unique_prompts} prompts; dropped "
            f"{self.non_english_dropped} non-English, {self.excluded} excluded, {self.too_long_dropped} too long; "
            f"kept {self.num_prompts}"
        )


@dataclass
class _Text:
    """One exact prompt text: its answer, first row, row count and other columns."""

    answer: str
    file: int
    row: int
    count: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prompt:
    """One deduplicated prompt before formatting (internal to the loaders, also used by ``benchmarks.py``)."""

    uid: int
    text: str
    answer: str
    file: int
    row: int
    num_rows: int
    meta: dict[str, Any]


class Collector:
    """Folds rows of many files into distinct prompts (exact text first, then normalised)."""

    def __init__(self, max_prompt_chars: int | None) -> None:
        self.max_prompt_chars = max_prompt_chars
        self.files: list[Path] = []
        self.formats: list[str] = []
        self.layouts: list[str] = []
        self.texts: dict[str, _Text] = {}
        self.rows_read = 0
        self._conflicts: list[str] = []
        self._n_conflicts = 0

    def where(self, file: int, row: int) -> str:
        return f"{self.files[file]} {row_label(self.formats[file], row)}"

    def add_file(self, path: PathLike, layout: Layout) -> None:
        p = Path(path)
        fi = len(self.files)
        self.files.append(p)
        self.formats.append(file_format(p))
        self.layouts.append(layout.name)
        for chunk in read_chunks(p, layout):
            self._add_chunk(fi, chunk)
        self._raise_conflicts()

    def _conflict(self, a: tuple[int, int, str], b: tuple[int, int, str]) -> None:
        self._n_conflicts += 1
        if len(self._conflicts) < 10:
            self._conflicts.append(f"{self.where(a[0], a[1])} answer {a[2]!r} vs {self.where(b[0], b[1])} answer {b[2]!r}")

    def _raise_conflicts(self) -> None:
        if self._n_conflicts:
            more = self._n_conflicts - len(self._conflicts)
            raise DatasetError(
                f"{self._n_conflicts} prompt(s) appear with conflicting answers (same prompt after normalising "
                "whitespace, Unicode composition and the DAPO instruction): "
                + "; ".join(self._conflicts)
                + (f" (and {more} more)" if more > 0 else "")
            )

    def _add_chunk(self, fi: int, chunk: Chunk) -> None:
        texts = self.texts
        new_pos: list[int] = []
        fmt = self.formats[fi]
        bad: list[str] = []
        limit = self.max_prompt_chars
        for ra, aa, rb, ab in chunk.conflicts:
            self._conflict((fi, ra, aa), (fi, rb, ab))
        for pos, (row, text, answer, count) in enumerate(
            zip(chunk.rows, chunk.texts, chunk.answers, chunk.counts, strict=True)
        ):
            seen = texts.get(text)
            if seen is None:
                # Checks run once per distinct text: an exact copy of a checked text is fine.
                if not text.strip():
                    bad.append(f"{row_label(fmt, row)}: empty or whitespace-only prompt")
                    continue
                if limit is not None and len(text) > limit:
                    bad.append(f"{row_label(fmt, row)}: prompt of {len(text)} chars > max_prompt_chars={limit}")
                    continue
                if not answer:
                    bad.append(f"{row_label(fmt, row)}: empty or whitespace-only answer")
                    continue
                texts[text] = _Text(answer, fi, row, count)
                new_pos.append(pos)
            else:
                seen.count += count
                if answer != seen.answer:
                    self._conflict((seen.file, seen.row, seen.answer), (fi, row, answer))
        self.rows_read += chunk.num_rows
        if bad:
            raise DatasetError(f"{self.files[fi]}: {_list(bad)}")
        if new_pos:
            for pos, meta in zip(new_pos, chunk.meta(new_pos), strict=True):
                texts[chunk.texts[pos]].meta = meta

    def prompts(self) -> list[Prompt]:
        """Distinct prompts by normalised text (conflicting answers raise), in uid order."""
        groups: dict[str, list[str]] = {}
        for text in self.texts:
            groups.setdefault(normalize_prompt(text), []).append(text)
        out: list[Prompt] = []
        by_uid: dict[int, str] = {}
        for key, variants in groups.items():
            answers = {self.texts[t].answer for t in variants}
            if len(answers) > 1:
                first = {}
                for t in variants:
                    first.setdefault(self.texts[t].answer, self.texts[t])
                a, b = list(first.items())[:2]
                self._conflict((a[1].file, a[1].row, a[0]), (b[1].file, b[1].row, b[0]))
                continue
            # The most frequent spelling (ties: the smallest), so the choice does not depend on row order.
            text = min(variants, key=lambda t: (-self.texts[t].count, t))
            info = self.texts[text]
            uid = prompt_uid(key)
            if uid in by_uid:
                raise DatasetError(f"uid collision between two different prompts: {by_uid[uid]!r} and {key!r}")
            by_uid[uid] = key
            count = sum(self.texts[t].count for t in variants)
            out.append(Prompt(uid, text, info.answer, info.file, info.row, count, info.meta))
        self._raise_conflicts()
        out.sort(key=lambda p: p.uid)
        return out


def as_paths(files: PathLike | Sequence[PathLike], key: str) -> list[Path]:
    """One path or a list of them; an empty list is an error naming ``key``."""
    items = [files] if isinstance(files, str | os.PathLike) else list(files)
    if not items:
        raise DatasetError(f"{key} is empty: give at least one data file")
    return [Path(p) for p in items]


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Prompt lengths in tokens, batched when the tokenizer can (``HFTokenizer.encode_prompts``)."""
    batch = getattr(tokenizer, "encode_prompts", None)
    if batch is not None:
        return [len(ids) for ids in batch(texts)]
    return [len(tokenizer.encode_prompt(t)) for t in texts]


def build_dataset(
    collector: Collector,
    prompts: list[Prompt],
    texts: list[str],
    *,
    tokenizer: Any | None,
    max_prompt_tokens: int | None,
    overlong_prompts: str,
    extra_meta: Callable[[Prompt], dict[str, Any]] | None = None,
) -> tuple[PromptDataset, int]:
    """Records in uid order from ``prompts`` and their final ``texts``; returns the dataset and
    the number of prompts dropped for length."""
    if overlong_prompts not in OVERLONG_POLICIES:
        raise ValueError(f"data.overlong_prompts must be one of {list(OVERLONG_POLICIES)}, got {overlong_prompts!r}")
    keep = list(range(len(prompts)))
    dropped = 0
    if max_prompt_tokens is not None:
        if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be a positive integer or null, got {max_prompt_tokens!r}")
        if tokenizer is None:
            raise ValueError("data.max_prompt_tokens needs a tokenizer to count prompt tokens")
        try:
            lengths = token_lengths(tokenizer, texts)
        except Exception:  # a tokenizer's own error type (ValueError, a Rust exception...): find the row
            for k, t in enumerate(texts):
                try:
                    tokenizer.encode_prompt(t)
                except Exception as e:  # noqa: BLE001 - re-raised with the row
                    where = collector.where(prompts[k].file, prompts[k].row)
                    raise DatasetError(f"{where}: the tokenizer cannot encode the prompt ({e})") from None
            raise
        over = [k for k, n in enumerate(lengths) if n > max_prompt_tokens]
        if over and overlong_prompts == "error":
            where = [f"{collector.where(prompts[k].file, prompts[k].row)} ({lengths[k]} tokens)" for k in over]
            raise DatasetError(
                f"{len(over)} prompt(s) longer than data.max_prompt_tokens={max_prompt_tokens} after formatting "
                f"(data.overlong_prompts=error): {_list(where)}"
            )
        over_set = set(over)
        keep = [k for k in keep if k not in over_set]
        dropped = len(over)
    records = []
    for dense, k in enumerate(keep):
        p = prompts[k]
        meta = dict(p.meta)
        meta.update(
            uid=p.uid,
            problem=strip_dapo(p.text),
            source=str(collector.files[p.file]),
            row=row_label(collector.formats[p.file], p.row),
            layout=collector.layouts[p.file],
            num_rows=p.num_rows,
        )
        if extra_meta is not None:
            meta.update(extra_meta(p))
        records.append(PromptRecord(dense, texts[k], p.answer, meta))
    # Raw texts were bounded while reading; the final (formatted) texts are not bounded again.
    return PromptDataset(records, max_prompt_chars=None), dropped


def load_prompt_files(
    files: PathLike | Sequence[PathLike],
    *,
    layout: str = "auto",
    prompt_format: PromptFormat | None = None,
    tokenizer: Any | None = None,
    english_only: bool = False,
    max_prompt_tokens: int | None = None,
    overlong_prompts: str = "drop",
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
    exclude_uids: Iterable[int] = (),
    name: str = "data.train_files",
    log: Callable[[str], None] | None = print,
) -> tuple[PromptDataset, LoadReport]:
    """Read, deduplicate, filter, format and number the prompts of ``files`` (see the module docstring).

    Args:
        files: one path or a list (``data.train_files`` / ``data.eval_files``).
        layout: ``auto`` (per file) or one of ``dapo``, ``dapo_processed``, ``plain`` (``data.layout``).
        prompt_format: instruction + raw / chat template (``data.prompt_format`` etc.).
        tokenizer: needed for ``chat_template`` and ``max_prompt_tokens`` (``Tokenizer`` contract).
        english_only: drop prompts with CJK characters (``data.english_only``).
        max_prompt_tokens: longest final prompt in tokens, ``None`` = no limit.
        overlong_prompts: ``drop`` (counted in the report) or ``error``.
        max_prompt_chars: bound on a raw prompt's length in characters (``None``: none).
        exclude_uids: prompts to leave out (e.g. the eval set's uids), counted.
        name: the config key, used in messages and the report.
        log: where the one-line report goes (``None``: silent).

    Returns the dataset and its ``LoadReport``.
    """
    fmt = prompt_format or PromptFormat()
    paths = as_paths(files, name)
    if layout != "auto" and layout not in TRAIN_LAYOUTS:
        raise ValueError(f"data.layout must be 'auto' or one of {list(TRAIN_LAYOUTS)}, got {layout!r}")
    collector = Collector(max_prompt_chars)
    for p in paths:
        problem = file_problem(p)
        if problem is not None:
            raise DatasetError(f"{name}: data file {problem}")
        collector.add_file(p, detect_layout(p) if layout == "auto" else TRAIN_LAYOUTS[layout])
    prompts = collector.prompts()
    unique = len(prompts)
    non_english = 0
    if english_only:
        kept = [p for p in prompts if not has_cjk(p.text)]
        non_english = len(prompts) - len(kept)
        prompts = kept
    excluded_set = {int(u) for u in exclude_uids}
    excluded = 0
    if excluded_set:
        kept = [p for p in prompts if p.uid not in excluded_set]
        excluded = len(prompts) - len(kept)
        prompts = kept
    texts = render_prompts([p.text for p in prompts], fmt, tokenizer)
    dataset, too_long = build_dataset(
        collector,
        prompts,
        texts,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        overlong_prompts=overlong_prompts,
    )
    if len(dataset) == 0:
        raise DatasetError(f"{name}: no prompts left after filtering ({unique} distinct prompts read)")
    report = LoadReport(
        name=name,
        files=tuple(str(p) for p in paths),
        layouts=tuple(collector.layouts),
        rows_read=collector.rows_read,
        unique_prompts=unique,
        duplicate_rows=collector.rows_read - unique,
        non_english_dropped=non_english,
        excluded=excluded,
        too_long_dropped=too_long,
        num_prompts=len(dataset),
    )
    if log is not None:
        log(report.summary())
    return dataset, report
