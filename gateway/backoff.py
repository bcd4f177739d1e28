"""Exponential backoff with full jitter (pure: the random source is passed in)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays for retry attempt ``n`` (0-based): uniform in ``[0, min(cap, base * 2**n)]``.

    Full jitter spreads reconnect storms: a hundred devices behind one switch that came
    back do not all reconnect in the same millisecond. ``floor`` keeps a minimum pause
    so a tight failure never becomes a busy loop.
    """

    base: float = 0.5
    cap: float = 30.0
    floor: float = 0.05

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay for this attempt."""
        # 2**60 already dwarfs any cap; clamping keeps the float finite for huge attempts.
        return min(self.cap, self.base * float(2 ** min(attempt, 60)))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A jittered delay for this attempt, never below ``floor``."""
        r = rng.random() if rng is not None else random.random()
        return max(self.floor, r * self.ceiling(attempt))
