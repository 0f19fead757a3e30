"""Lazy import of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_optional(module: str, extra: str, purpose: str, hint: str = "") -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming ``pip install 'nemo_gdro[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        extra_hint = f" ({hint})" if hint else ""
        raise ImportError(
            f"{purpose} needs the optional dependency {module}; install it with "
            f"`pip install 'nemo_gdro[{extra}]'`{extra_hint}"
        ) from exc
