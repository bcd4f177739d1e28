"""Signals derived from others, for machines that do not report them (pure).

The cheapest shop-floor device is a counter box: it reports pieces, nothing else. Without a
``state`` signal such a machine would stay ``offline`` in every snapshot after it connects,
since the tracker never invents a state. :class:`StateFromCounts` derives one: ``running``
while the counters move, ``idle`` once they have stood still for ``idle_after`` seconds.
It is used only for machines whose config maps no ``state`` signal (docs/tracker.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.core.model import Quality, Sample
from gateway.core.vocabulary import COUNTER_SIGNALS

#: Seconds without a new piece after which a counting machine is taken as idle.
IDLE_AFTER = 120.0


@dataclass(slots=True)
class StateFromCounts:
    """``running`` while any counter moves, ``idle`` after ``idle_after`` s without a piece."""

    machine: str
    idle_after: float = IDLE_AFTER
    _last: dict[str, int] = field(default_factory=dict)
    _moved_at: float | None = None

    def observe(self, batch: Sequence[Sample], now: float) -> Sample:
        """The derived ``state`` sample for one acquisition batch."""
        for s in batch:
            if s.signal not in COUNTER_SIGNALS or s.quality is not Quality.GOOD:
                continue
            if not isinstance(s.value, int) or isinstance(s.value, bool):
                continue
            before = self._last.get(s.signal)
            self._last[s.signal] = s.value
            # Any change counts as activity, a reset too (someone is at the machine); the
            # first reading only sets the baseline.
            if before is not None and s.value != before:
                self._moved_at = now
        running = self._moved_at is not None and now - self._moved_at < self.idle_after
        return Sample(self.machine, "state", "running" if running else "idle", now)
