"""Pure counter arithmetic: device counter readings to piece deltas.

Device counters are unreliable in known ways: the operator resets them, 16- and 32-bit
registers wrap, the same value is read twice, a reconnecting OPC UA client replays values
older than ones already seen. The functions here turn a stream of readings into piece
deltas that are never negative. The rules (see ``docs/tracker.md`` for worked examples):

* same value as before: delta 0 (duplicate read);
* higher value: delta = new - old (includes pieces made while the device was offline);
* lower value, and a wrap modulus is set and the drop is more than half the modulus:
  the counter wrapped, delta = new + modulus - old;
* any other drop: the counter was reset, delta = new (the pieces made since the reset);
* a reading whose source time is older than the last applied one: ignored (late).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

#: Largest counter value accepted from a device; anything above is a decoding error.
MAX_COUNT = 2**53


def parse_count(value: object, wrap: int | None = None) -> int:
    """Validate a device counter value; return it as an int or raise ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"counter value must be a number, got bool {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"counter value must be a whole number, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"counter value must be an integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"counter value must not be negative, got {value}")
    if value > MAX_COUNT:
        raise ValueError(f"counter value {value} is implausibly large")
    if wrap is not None and value >= wrap:
        raise ValueError(f"counter value {value} is outside the wrap modulus {wrap}")
    return value


def counter_delta(previous: int, current: int, wrap: int | None = None) -> int:
    """Pieces counted between two readings of one counter; never negative."""
    if current >= previous:
        return current - previous
    drop = previous - current
    if wrap is not None and drop > wrap // 2:
        # A drop by more than half the modulus is far more likely a wrap than a reset.
        return current + wrap - previous
    # Reset by the operator or a new job: everything on the counter now is new.
    return current


@dataclass(frozen=True, slots=True)
class CounterState:
    """The last applied reading of one device counter (``None`` before the first)."""

    value: int | None = None
    source_time: float | None = None


class Step(NamedTuple):
    """Result of applying one reading: new state, pieces counted, whether it was applied."""

    state: CounterState
    delta: int
    applied: bool


def advance(state: CounterState, value: int, source_time: float, wrap: int | None = None) -> Step:
    """Apply one counter reading to ``state`` (late readings are ignored)."""
    if state.source_time is not None and source_time < state.source_time:
        return Step(state, 0, False)
    new = CounterState(value, source_time)
    if state.value is None:
        # The first reading is the baseline: nothing is known about what came before it.
        return Step(new, 0, True)
    return Step(new, counter_delta(state.value, value, wrap), True)
