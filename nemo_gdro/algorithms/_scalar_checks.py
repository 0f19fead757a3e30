"""Scalar type checks shared by the configs and the algorithm modules (no torch: the CLI
validates a config before it imports torch)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """A real number that is not a bool (inf and nan allowed: range checks follow)."""
    return isinstance(x, Real) and not isinstance(x, bool)


def is_finite_real(x: Any) -> bool:
    """A finite real number that is not a bool."""
    return is_real(x) and math.isfinite(float(x))
