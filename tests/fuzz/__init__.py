"""Fuzz targets (hypothesis): short in ``make test``, long with ``SHOPFLOOR_FUZZ=long``.

``SHOPFLOOR_FUZZ_EXAMPLES=N`` sets the examples per target directly. Every crash a fuzz run
finds is kept as an ``@example`` on its target (a regression test that always runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

_F = TypeVar("_F", bound=Callable[..., Any])

#: Examples per target: a few seconds for the whole set in ``make test``.
SHORT = 60
#: ``make fuzz``: minutes per run.
LONG = 5000


def examples(short: int = SHORT) -> int:
    """How many examples a target runs in this mode."""
    explicit = os.environ.get("SHOPFLOOR_FUZZ_EXAMPLES")
    if explicit:
        return max(1, int(explicit))
    if os.environ.get("SHOPFLOOR_FUZZ") == "long":
        return max(LONG, short * 50)
    return short


def fuzz(short: int = SHORT) -> Callable[[_F], _F]:
    """Hypothesis settings for a fuzz target: no deadline (CI machines are noisy)."""
    return settings(
        max_examples=examples(short),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=os.environ.get("SHOPFLOOR_FUZZ") != "long",
    )
