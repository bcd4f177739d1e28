"""Exponential backoff with jitter (pure: the random source is passed in)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays for retry attempt ``n`` (0-based), drawn below ``min(cap, base * 2**n)``.

    Jitter spreads reconnect storms: a hundred devices behind one switch that came back do
    not all reconnect in the same millisecond. ``jitter`` is the random share of the
    ceiling: 1.0 (full jitter) draws from ``[0, ceiling]``, 0.5 (equal jitter) from
    ``[ceiling / 2, ceiling]``, which halves the attempts of a long outage at the same
    worst-case wait. ``floor`` keeps a minimum pause so a tight failure never becomes a
    busy loop.
    """

    base: float = 0.5
    cap: float = 30.0
    floor: float = 0.05
    jitter: float = 1.0

    def __post_init__(self) -> None:
        """Refuse settings that would give negative or unbounded delays."""
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within 0..1, not {self.jitter}")
        if self.base <= 0 or self.cap < self.base or self.floor < 0:
            raise ValueError(
                f"need 0 < base <= cap and floor >= 0 (base={self.base}, cap={self.cap}, "
                f"floor={self.floor})"
            )

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay for this attempt."""
        # 2**60 already dwarfs any cap; clamping keeps the float finite for huge attempts.
        return min(self.cap, self.base * float(2 ** min(attempt, 60)))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A jittered delay for this attempt, never below ``floor``."""
        r = rng.random() if rng is not None else random.random()
        return max(self.floor, (1.0 - self.jitter * r) * self.ceiling(attempt))


#: Reconnect waits at least this long are stretched to end on a whole second of the loop
#: clock (:func:`aligned`).
ALIGN_ABOVE = 2.0


def aligned(now: float, delay: float, *, grid: float = 1.0, above: float = ALIGN_ABOVE) -> float:
    """``delay``, stretched (by less than ``grid``) so the wait ends on a multiple of ``grid``.

    Waking a sleeping process is what a retry costs most on a small PC: a refused connect
    takes ~21 us of CPU when many run back to back but ~500 us when each runs alone
    (``python -m bench.wakeups``). Retries of a long outage end on the same whole
    seconds, so the devices of a floor that is switched off share the wake-ups. Short
    delays (the first retries after a cut) stay as drawn: there the wait matters more.
    """
    if delay < above:
        return delay
    # max(): when now + delay lands on the grid, rounding can make the difference a hair
    # shorter than delay (now=2.2e-16, delay=2.0 gives 1.9999999999999998).
    return max(delay, math.ceil((now + delay) / grid) * grid - now)
