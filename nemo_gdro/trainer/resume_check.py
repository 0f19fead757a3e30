"""May this run continue that checkpoint? The stored config and data against the current ones.

A checkpoint's state (per-prompt statistics keyed by prompt id, bins,
controllers, sampler position, optimizer) only means what it meant under the
config and the data it was written with. :func:`check_resume_config` compares
the resumed run's config with the checkpoint's ``config.yaml`` key by key:

- changes in :data:`SAFE_KEYS` (run length, evaluation / checkpoint cadence,
  logging, evaluation sampling, the finished SFT phase, memory knobs) are
  allowed and printed;
- every other change (data, model, tokenizer, algorithm stages and their
  parameters, ``rollout.n`` and sampling, optimizer, seed, layout) is
  refused with one error listing each differing key, unless the key (or a
  prefix of it, or ``*``) is listed in ``run.allow_config_change``;
- an input path spelled otherwise (relative / absolute, through a symlink)
  that names the same files is no change; other data files
  (:data:`DATA_FILE_KEYS`, e.g. the same rows converted from Parquet to JSONL)
  are judged by the training data's fingerprint (:func:`check_dataset`), not
  by their names. An algorithm stage switched on or off by an allowed
  ``algorithm.*`` change starts fresh or is ignored, with a warning naming it
  (:meth:`~nemo_gdro.trainer.run_state.RunState.load`).

:func:`dataset_fingerprint` hashes every training prompt (id -> prompt and
answer text) and :func:`check_dataset` compares it with the checkpoint's, so
a changed data file or generator seed is caught even when no key changed
(allow it with ``run.allow_config_change=[data]``).

:func:`check_same_config_across_ranks` makes every rank of a job compare its
config with rank 0's at start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_gdro.typed_config import ConfigError

__all__ = [
    "SAFE_KEYS",
    "DATA_FILE_KEYS",
    "Change",
    "config_changes",
    "check_resume_config",
    "dataset_fingerprint",
    "check_dataset",
    "check_same_config_across_ranks",
]

#: Keys (or ``prefix.``) whose change does not alter what the saved state means.
SAFE_KEYS: tuple[str, ...] = (
    "run.name",
    "run.output_dir",
    "run.resume",
    "run.allow_config_change",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.checkpoint_every",
    "trainer.keep_last_checkpoints",
    "trainer.micro_batch_size",  # the gradient does not depend on it (up to rounding)
    "trainer.on_nonfinite",
    "trainer.max_consecutive_skips",
    "parallel.timeout_s",
    "eval.",
    "logging.",
    "checkpoint.",
    "sft.",  # every checkpoint is written after the warm start
    "rollout.vllm.gpu_memory_utilization",
    "rollout.vllm.kv_cache_memory_bytes",
    "rollout.vllm.sleep_level",
)

_MISSING = "<absent>"
_MAX_SHOWN = 12


#: Keys naming the training / eval data files: what matters is the prompts they hold, which
#: :func:`check_dataset` compares (the fingerprint), not how the files are named.
DATA_FILE_KEYS: tuple[str, ...] = ("data.train_files", "data.eval_files.")


@dataclass(frozen=True)
class Change:
    """One differing leaf key; ``kind`` says why it passed (``changed``: not judged yet or refused,
    ``safe``, ``allowed``, ``same_path``: another spelling of the same files, ``data_files``:
    other data files, judged by the training data's fingerprint)."""

    key: str
    before: Any
    after: Any
    kind: str = "changed"

    def __str__(self) -> str:
        return f"{self.key}: {_short(self.before)} -> {_short(self.after)}"


def _short(value: Any) -> str:
    text = value if (isinstance(value, str) and value == _MISSING) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _leaves(tree: DictConfig | Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(tree, str):
        tree = OmegaConf.create(tree)
    data = OmegaConf.to_container(tree, resolve=True) if isinstance(tree, DictConfig) else dict(tree)
    out: dict[str, Any] = {}
    _flatten(data, "", out)
    return out


def config_changes(stored: DictConfig | Mapping[str, Any] | str, current: DictConfig | Mapping[str, Any]) -> list[Change]:
    """Every leaf key whose value differs (or exists on one side only), sorted by key."""
    a, b = _leaves(stored), _leaves(current)
    return [
        Change(k, a.get(k, _MISSING), b.get(k, _MISSING))
        for k in sorted(set(a) | set(b))
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    ]


def _matches(key: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        p = p.strip()
        if p == "*" or key == p or key.startswith(p if p.endswith(".") else p + "."):
            return True
    return False


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


def _is_data_file_key(key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in DATA_FILE_KEYS)


def _judge(change: Change, allow: list[str]) -> Change:
    """``change`` with its ``kind`` (``changed`` when it must be refused)."""
    from nemo_gdro.trainer.hf_assets import stands_for
    from nemo_gdro.trainer.paths import is_path_key, same_path_value

    key = change.key
    if _is_safe(key):
        kind = "safe"
    elif is_path_key(key) and (
        same_path_value(change.before, change.after, key) or stands_for(change.after, change.before)
    ):
        # A relative path stored by an older version and the absolute one now, or the
        # checkpoint's copy of a model folder that is gone (eval, hf_assets).
        kind = "same_path"
    elif _matches(key, allow):
        kind = "allowed"
    elif _is_data_file_key(key):
        kind = "data_files"
    else:
        kind = "changed"
    return Change(key, change.before, change.after, kind)


def check_resume_config(
    stored_yaml: str | None, current: DictConfig, allow: Iterable[str], where: str
) -> list[Change]:
    """Raise ConfigError for refused changes; return the allowed ones (to print).

    Args:
        stored_yaml: the checkpoint's ``config.yaml`` (None: an old checkpoint
            without one; nothing to compare).
        current: the resumed run's composed config.
        allow: ``run.allow_config_change``.
        where: the checkpoint path, for the message.

    Data file keys (:data:`DATA_FILE_KEYS`) are not refused here: other files (or the same
    files spelled otherwise) holding the same prompts are the same data, which
    :func:`check_dataset` decides from the fingerprint (returned with ``kind="data_files"``).
    """
    if stored_yaml is None:
        return []
    allow = list(allow)
    changes = [_judge(c, allow) for c in config_changes(stored_yaml, current)]
    refused = [c for c in changes if c.kind == "changed"]
    if refused:
        shown = "; ".join(str(c) for c in refused[:_MAX_SHOWN])
        more = f"; and {len(refused) - _MAX_SHOWN} more" if len(refused) > _MAX_SHOWN else ""
        keys = ",".join(c.key for c in refused)
        raise ConfigError(
            f"run.resume: {where} was written with another configuration ({shown}{more}). These keys change what "
            "the saved state means (prompt ids and statistics, controllers, optimizer, layout): resume with the "
            "checkpoint's values, start a new run (another run.output_dir), or accept the change deliberately "
            f"with run.allow_config_change=[{keys}]{_renamed_hint(refused)}"
        )
    return changes


def _renamed_hint(refused: list[Change]) -> str:
    """For keys renamed since the checkpoint was written (MOVED_KEYS): the new key with the saved value,
    which allowing the change alone would not carry over (the new key would take its default)."""
    from nemo_gdro.stages.setup import MOVED_KEYS

    moved = [f"{MOVED_KEYS[c.key]}={c.before!r}" for c in refused if c.key in MOVED_KEYS and c.before != _MISSING]
    if not moved:
        return ""
    return (
        f". Some keys were renamed since the checkpoint was written: to keep their saved values also give "
        f"{' '.join(moved)}"
    )


# --------------------------------------------------------------------------- data
def _digest(record: Any) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(str(record.prompt).encode("utf-8"))
    h.update(b"\0")
    h.update(str(record.answer).encode("utf-8"))
    return int.from_bytes(h.digest(), "little", signed=True)


def dataset_fingerprint(dataset: Iterable[Any]) -> torch.Tensor:
    """int64 ``[N, 2]``: ``(prompt_id, 64-bit hash of prompt and answer text)`` of every record, by id."""
    rows = sorted((int(r.prompt_id), _digest(r)) for r in dataset)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def check_dataset(
    saved: torch.Tensor | None,
    current: torch.Tensor,
    allow: Iterable[str],
    where: str,
    file_changes: Iterable[Change] = (),
) -> str | None:
    """Raise ConfigError if the training prompts differ from the checkpoint's (unless ``data`` is allowed).

    ``file_changes``: the data file keys that differ from the checkpoint's config
    (``kind="data_files"`` of :func:`check_resume_config`). Identical prompts make
    them a note; a checkpoint without a fingerprint cannot tell, so they are refused.

    Returns a warning line when the files or the prompts differ but the run may
    continue, else None.
    """
    files = list(file_changes)
    named = "; ".join(str(c) for c in files[:4]) + ("; ..." if len(files) > 4 else "")
    allowed = _matches("data", allow)
    if saved is None:
        if files and not allowed:
            raise ConfigError(
                f"run.resume: the data files differ from those {where} was trained on ({named}) and the "
                "checkpoint holds no fingerprint of its training prompts to compare them with: restore the "
                "data.* keys, start a new run, or accept it with run.allow_config_change=[data]"
            )
        return None
    saved = torch.as_tensor(saved, dtype=torch.int64).reshape(-1, 2)
    if saved.shape == current.shape and torch.equal(saved, current):
        if not files:
            return None
        return (
            f"warning: the data files differ from those in {where}'s config ({named}), but they hold the "
            f"same {current.shape[0]} training prompts (identical fingerprint): continuing"
        )
    if saved.shape != current.shape:
        detail = f"{current.shape[0]} training prompts now, {saved.shape[0]} in the checkpoint"
    else:
        differ = torch.nonzero((saved != current).any(dim=1)).flatten()
        ids = current[differ[:5], 0].tolist()
        detail = f"{differ.numel()} of {current.shape[0]} prompt ids hold a different prompt or answer (ids {ids}...)"
    if files:
        detail += f"; data files: {named}"
    message = (
        f"run.resume: the training data differ from those {where} was trained on: {detail}. The per-prompt "
        "statistics, bins and sampler position are keyed by prompt id and would be attached to other problems"
    )
    if allowed:
        return message + " (allowed by run.allow_config_change)"
    raise ConfigError(
        message + ": restore the data (data.* keys, the data files), start a new run, or accept it with "
        "run.allow_config_change=[data]"
    )


# --------------------------------------------------------------------------- ranks
def check_same_config_across_ranks(config_yaml: str) -> None:
    """Every rank compares its config with rank 0's (collective over the default group); raises ConfigError."""
    import torch.distributed as dist

    from nemo_gdro.parallel import comm

    if comm.group_size() == 1:
        return
    digest = hashlib.sha256(config_yaml.encode("utf-8")).digest()
    mine = torch.tensor(list(digest[:8]), dtype=torch.float64)
    table = torch.stack(comm.all_gather(mine))
    differ = [r for r in range(table.shape[0]) if not torch.equal(table[r], table[0])]
    if not differ:
        return
    texts: list[Any] = [None] * table.shape[0]
    dist.all_gather_object(texts, config_yaml)
    lines = []
    for r in differ[:4]:
        changes = config_changes(texts[0], OmegaConf.create(texts[r]))
        lines.append(f"rank {r}: " + "; ".join(str(c) for c in changes[:6]))
    raise ConfigError(
        "the ranks of this job were started with different configurations (each line: rank 0's value -> that "
        f"rank's): {' | '.join(lines)}. Launch every rank with the same overrides"
    )
