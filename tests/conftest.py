"""Shared test settings: deterministic hypothesis runs, double precision helpers."""

import os

from hypothesis import HealthCheck, settings

# CI must be reproducible: derandomize so a failure seen once is seen every time.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
