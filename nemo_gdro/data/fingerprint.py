"""Dataset fingerprints: what a checkpoint stores to tell whether the prompts
behind its per-prompt statistics are still the same on resume.

A fingerprint holds, per dense ``prompt_id``: the prompt's uid
(``meta["uid"]``, when every record has one; the file loaders set it) and a
64-bit hash of its content (prompt text and answer), plus one SHA-256 over all
of it. ``diff`` says what changed in words; ``remap_prompt_ids`` maps the old
dense ids to the new ones by uid (``-1``: the prompt is gone), for a trainer that
chooses to carry statistics over a deliberate dataset change.

It is JSON-friendly (``to_dict`` / ``from_dict``): about 40 bytes per prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nemo_gdro.data.dataset import PromptRecord

FORMAT = "nemo_gdro.dataset_fingerprint/v1"


def _item_hash(prompt: str, answer: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(prompt.encode("utf-8"))
    h.update(b"\x00")
    h.update(answer.encode("utf-8"))
    return int.from_bytes(h.digest(), "big")


def _total(uids: Sequence[int] | None, items: Sequence[int]) -> str:
    total = hashlib.sha256()
    for k, h in enumerate(items):
        total.update(f"{k}:{-1 if uids is None else uids[k]}:{h:016x};".encode())
    return total.hexdigest()


@dataclass(frozen=True)
class DatasetFingerprint:
    """``uids[i]`` / ``item_hashes[i]`` belong to ``prompt_id`` ``i``; ``uids`` is
    ``None`` when the records carry no ``meta["uid"]`` (e.g. the arithmetic task)."""

    num_prompts: int
    uids: tuple[int, ...] | None
    item_hashes: tuple[int, ...]
    sha256: str

    @classmethod
    def of(cls, records: Sequence[PromptRecord]) -> DatasetFingerprint:
        """Fingerprint of records sorted by ``prompt_id`` (as ``PromptDataset`` holds them)."""
        uids_list = [r.meta.get("uid") for r in records]
        uids = tuple(int(u) for u in uids_list) if uids_list and all(isinstance(u, int) for u in uids_list) else None
        items = tuple(_item_hash(r.prompt, r.answer) for r in records)
        return cls(len(records), uids, items, _total(uids, items))

    # ------------------------------------------------------------- compare
    def diff(self, current: DatasetFingerprint, *, max_listed: int = 5) -> list[str]:
        """Human-readable differences from ``self`` (stored) to ``current``; ``[]`` when identical."""
        if self.sha256 == current.sha256:
            return []
        out: list[str] = []
        if self.num_prompts != current.num_prompts:
            out.append(f"number of prompts {self.num_prompts} -> {current.num_prompts}")
        if self.uids is not None and current.uids is not None:
            old, new = set(self.uids), set(current.uids)
            if old != new:
                out.append(f"{len(old - new)} prompts removed, {len(new - old)} added (by uid)")
            else:
                where_new = {u: k for k, u in enumerate(current.uids)}
                moved = [k for k, u in enumerate(self.uids) if where_new[u] != k]
                if moved:
                    out.append(f"{len(moved)} prompts changed dense id")
            where_new = {u: k for k, u in enumerate(current.uids)}
            changed = [
                k
                for k, u in enumerate(self.uids)
                if u in where_new and self.item_hashes[k] != current.item_hashes[where_new[u]]
            ]
            if changed:
                shown = ", ".join(str(k) for k in changed[:max_listed])
                out.append(f"{len(changed)} prompts changed text or answer (stored prompt_id {shown}...)")
        else:
            n = min(self.num_prompts, current.num_prompts)
            changed = [k for k in range(n) if self.item_hashes[k] != current.item_hashes[k]]
            if changed:
                shown = ", ".join(str(k) for k in changed[:max_listed])
                out.append(f"{len(changed)} prompt ids now hold a different prompt or answer (prompt_id {shown}...)")
            if (self.uids is None) != (current.uids is None):
                out.append("one dataset has uids and the other does not")
        return out or ["content hash differs"]

    # --------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "num_prompts": self.num_prompts,
            "uids": None if self.uids is None else list(self.uids),
            "item_hashes": [f"{h:016x}" for h in self.item_hashes],
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetFingerprint:
        """Inverse of ``to_dict``; a damaged or edited payload (wrong types, lengths or
        a ``sha256`` that does not match the lists) is a ``ValueError`` saying what is wrong."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a dataset fingerprint (format={got!r}, expected {FORMAT!r})")
        try:
            uids = d["uids"]
            fp = cls(
                int(d["num_prompts"]),
                None if uids is None else tuple(int(u) for u in uids),
                tuple(int(h, 16) for h in d["item_hashes"]),
                str(d["sha256"]),
            )
        except KeyError as e:
            raise ValueError(f"dataset fingerprint: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"dataset fingerprint: malformed value ({e})") from None
        if len(fp.item_hashes) != fp.num_prompts or (fp.uids is not None and len(fp.uids) != fp.num_prompts):
            raise ValueError(f"dataset fingerprint lists do not have num_prompts={fp.num_prompts} entries")
        if _total(fp.uids, fp.item_hashes) != fp.sha256:
            raise ValueError("dataset fingerprint: sha256 does not match its uid / hash lists (damaged or edited)")
        return fp


def remap_prompt_ids(stored: DatasetFingerprint, current: DatasetFingerprint) -> torch.Tensor:
    """``[N_stored]`` int64: the current dense id of each stored prompt (by uid), ``-1`` if gone.

    A prompt whose text or answer changed under the same uid counts as gone.
    Needs uids on both sides.
    """
    if stored.uids is None or current.uids is None:
        raise ValueError("remap_prompt_ids needs uids in both fingerprints (datasets loaded from files)")
    where = {u: k for k, u in enumerate(current.uids)}
    out = []
    for k, u in enumerate(stored.uids):
        j = where.get(u, -1)
        out.append(j if j >= 0 and current.item_hashes[j] == stored.item_hashes[k] else -1)
    return torch.tensor(out, dtype=torch.int64)
