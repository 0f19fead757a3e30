"""The data error type, in a module without heavy imports (the launch checks use it before torch)."""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset violates the prompt-identity or schema rules; the message names the file and the rows."""
