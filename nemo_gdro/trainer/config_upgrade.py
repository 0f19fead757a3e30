"""Read a checkpoint's saved ``config.yaml`` written before keys were renamed or added.

:func:`upgrade_saved_config` brings such a config to today's keys, for reading
the checkpoint (``nemo-gdro eval``, the benchmark tools), never for continuing
its training (``run.resume`` refuses the difference unless it is allowed):

- keys MOVED since (:data:`~nemo_gdro.stages.setup.MOVED_KEYS`, the retired keys
  that are pure renames) take their saved values under the new name;
- keys ADDED since, in the sections where an absent key means "the feature did
  not exist yet" (:data:`UPGRADABLE`: ``algorithm.*``, ``trainer.epochs_per_batch``),
  take today's default (every added feature is off by default, as it was in
  that run). Elsewhere an absent key can mean something (``model.overrides``
  of an HF model), so nothing is filled there.

Torch-free.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nemo_gdro.stages.setup import MOVED_KEYS

__all__ = ["UPGRADABLE", "upgrade_saved_config", "upgraded_keys", "describe"]

#: Sections / keys filled with today's defaults when a saved config lacks them (dotted paths).
UPGRADABLE: tuple[str, ...] = ("algorithm", "trainer.epochs_per_batch")

_ARROW = " -> "


def _fill(saved: DictConfig, default: object, path: str, notes: list[str]) -> None:
    """Copy into ``saved`` what ``default`` (the subtree at ``path``) has and ``saved`` lacks; note each top-most key."""
    parent_path, _, leaf = path.rpartition(".")
    parent = OmegaConf.select(saved, parent_path) if parent_path else saved
    if not isinstance(parent, DictConfig):
        return  # the enclosing section is absent or not a mapping: not ours to invent
    if leaf not in parent:
        parent[leaf] = default
        notes.append(path)
    elif isinstance(default, DictConfig) and isinstance(parent[leaf], DictConfig):
        for key in default.keys():
            _fill(saved, default[key], f"{path}.{key}", notes)


def upgrade_saved_config(saved: DictConfig, defaults: DictConfig | None = None) -> tuple[DictConfig, list[str]]:
    """A copy of ``saved`` with today's keys, and what was done.

    Args:
        saved: a checkpoint's ``config.yaml`` (not modified).
        defaults: today's composed config (default: ``compose("train")``).

    Returns:
        ``(upgraded, notes)``: ``notes`` has one entry per change, ``"old -> new"``
        for a moved key, the dotted key (or section) for one filled with its
        default; empty when the config already has today's keys.
    """
    out = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    OmegaConf.set_struct(out, False)
    notes: list[str] = []
    for old, new in MOVED_KEYS.items():
        section, _, leaf = old.rpartition(".")
        holder = OmegaConf.select(out, section)
        if not isinstance(holder, DictConfig) or leaf not in holder:
            continue
        value = holder.pop(leaf)
        # A config that already has the new key keeps it (the old one is stale).
        if OmegaConf.select(out, new) is None:
            OmegaConf.update(out, new, value, force_add=True)
        notes.append(f"{old}{_ARROW}{new}")
    if defaults is None:
        from nemo_gdro.trainer.config import compose

        defaults = compose("train")
    for path in UPGRADABLE:
        default = OmegaConf.select(defaults, path)
        if default is not None:
            _fill(out, default, path, notes)
    return out, notes


def upgraded_keys(notes: list[str]) -> list[str]:
    """Every key an upgrade touched (both names of a moved key): what ``run.allow_config_change`` must list
    for the restore's config comparison to accept them."""
    return [key for note in notes for key in note.split(_ARROW)]


def describe(notes: list[str], where: str) -> str:
    """One line for the user: what the upgrade of ``where``'s config did."""
    moved = [n for n in notes if _ARROW in n]
    filled = [n for n in notes if _ARROW not in n]
    parts = []
    if moved:
        parts.append(f"renamed {', '.join(moved)}")
    if filled:
        parts.append(f"filled with today's defaults {', '.join(filled)}")
    return f"note: {where} was written before keys changed; its config is read with today's keys ({'; '.join(parts)})"
