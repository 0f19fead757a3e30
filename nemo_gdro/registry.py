"""Explicit name -> component registries (the plugin's shape as it appears in YAML).

A :class:`Registry` maps the names a config may use to ``"module:attribute"``
paths that are imported only when chosen, so a run that never asks for vLLM
never imports it. An unknown name is a :class:`UnknownNameError` that lists
the known names and the config key; an entry whose module is missing (an
optional extra) surfaces as that module's own ``ImportError``.

Every registry of the project is declared in :mod:`nemo_gdro.registries`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any


class UnknownNameError(ValueError):
    """A config names a component that its registry does not know."""


class Registry:
    """Names -> lazily imported factories for one kind of component.

    Args:
        kind: what the entries are (``"rollout scheduler"``), for messages.
        key: the config key that selects an entry (``"algorithm.rollout_scheduler"``).
        entries: ``name -> "package.module:attribute"``.
    """

    def __init__(self, kind: str, key: str, entries: dict[str, str]) -> None:
        for name, target in entries.items():
            if ":" not in target:
                raise ValueError(f"registry {key}: entry {name!r} must be 'module:attribute', got {target!r}")
        self.kind = kind
        self.key = key
        self._entries = dict(entries)

    def names(self) -> list[str]:
        """The valid names, in declaration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else :class:`UnknownNameError` listing the valid names."""
        if not isinstance(name, str) or name not in self._entries:
            raise UnknownNameError(
                f"{self.key}={name!r} is not a known {self.kind}; valid names: {', '.join(self.names())}"
            )
        return name

    def get(self, name: Any) -> Any:
        """Import and return the entry registered as ``name``."""
        module_name, attr = self._entries[self.check(name)].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def __repr__(self) -> str:
        return f"Registry({self.key}: {', '.join(self.names())})"
