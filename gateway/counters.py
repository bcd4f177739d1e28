"""Pure counter arithmetic: device counter readings to piece deltas.

Device counters are unreliable in known ways: the operator resets them, 16- and 32-bit
registers wrap, the same value is read twice, a reconnecting OPC UA client replays values
older than ones already seen, a line glitches, a 32-bit value is torn across two requests,
a box reboots. The functions here turn a stream of readings into piece deltas that are
never negative and never credit a glitch. The rules (see ``docs/tracker.md`` for worked
examples):

* same value as before: delta 0 (duplicate read);
* higher value, by at most what the machine can make in the time since the baseline
  (:meth:`CounterRule.limit`): delta = new - old (includes pieces made while offline);
* lower value, a wrap modulus is set and the drop is more than half the modulus: the
  counter wrapped, delta = new + modulus - old (if that is plausible, as above);
* a drop by at most ``glitch`` counts: a glitch, rejected, the baseline stands (unless the
  device signalled a reset with it);
* a larger drop (a reset) or a larger jump: pending until ``confirm`` consecutive readings
  agree; a reading that agrees with the baseline again rejects them all. A confirmed reset
  credits what the counter shows; a confirmed jump re-bases the counter (credits nothing
  of the jump itself);
* a reading whose source time is older than the last applied one: ignored (late).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
class CounterRule:
    """How one counter's readings are judged (compiled from the tracker settings)."""

    #: Modulus of a wrapping counter (``2**16``, ``2**32``) or ``None``.
    wrap: int | None = None
    #: Consecutive readings that must agree before a reset or a large jump is accepted.
    confirm: int = 2
    #: A drop by at most this many counts is a glitch (noise, a torn read), not a reset.
    glitch: int = 10
    #: Fastest the machine can count, pieces per second: bounds a plausible step.
    max_rate: float = 10.0
    #: Seconds between polls: the shortest time a step is judged over.
    poll_interval: float = 1.0
    #: Fixed largest step in one reading; ``None`` derives it from the rate and the time.
    max_jump: int | None = None

    #: The smallest limit: a step up to this is plausible whatever the time (computed).
    floor: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        """Compute ``floor`` once: the fast path of :func:`advance` compares with it."""
        limit = self.limit(0.0)
        assert limit is not None
        object.__setattr__(self, "floor", limit)

    def limit(self, elapsed: float | None) -> int | None:
        """Largest plausible increase after ``elapsed`` seconds (``None``: unbounded)."""
        if self.max_jump is not None:
            return self.max_jump
        if elapsed is None:
            return None
        # The slack covers a late poll and pieces finished between the reads.
        return math.ceil(self.max_rate * max(elapsed, self.poll_interval)) + self.glitch


class CounterState(NamedTuple):
    """The accepted baseline of one device counter, and readings awaiting confirmation.

    ``value`` is ``None`` before the first reading. ``anchor`` marks a baseline set to 0 by
    an order start (a per-order counter): what the counter shows is the order's; more than a
    poll's worth is held like any jump, and once confirmed credited in full, not re-based.
    ``pending`` holds ``(value, source_time)`` readings that disagree with the baseline and
    agree with each other: a reset or a re-based counter not yet confirmed. A named tuple,
    not a dataclass: one is built per counter reading, and a tuple is built fastest.
    """

    value: int | None = None
    source_time: float | None = None
    pending: tuple[tuple[int, float], ...] = ()
    anchor: bool = False


class Step(NamedTuple):
    """Result of applying one reading.

    ``delta`` pieces are credited; ``rejected`` readings were given up as glitches (this one
    or earlier pending ones); ``rebased`` is the jump not credited when a counter was
    confirmed re-based (0 otherwise); ``reset`` says the counter was taken as reset.
    """

    state: CounterState
    delta: int
    applied: bool
    rejected: int = 0
    rebased: int = 0
    reset: bool = False


_DEFAULT_RULE = CounterRule()


def _agrees(last: tuple[int, float], value: int, when: float, rule: CounterRule) -> bool:
    """Whether ``value`` plausibly follows the pending reading ``last``."""
    before, before_time = last
    limit = rule.limit(max(0.0, when - before_time))
    # A newer reading only: a replayed one confirms nothing.
    return when > before_time and before <= value and (limit is None or value - before <= limit)


def _judge(
    base: int, base_time: float | None, value: int, when: float, rule: CounterRule, anchor: bool
) -> tuple[str, int]:
    """Classify ``value`` against the baseline: (kind, pieces).

    Kinds: ``up`` (plausible increase, incl. a wrap), ``glitch`` (a small drop),
    ``reset`` (a large drop), ``jump`` (more than the plausible limit).
    """
    # An order-start anchor is judged as if just read: one poll interval of production.
    elapsed = 0.0 if anchor else None if base_time is None else max(0.0, when - base_time)
    limit = rule.limit(elapsed)
    if value >= base:
        step = value - base
        return ("up", step) if limit is None or step <= limit else ("jump", step)
    drop = base - value
    wrap = rule.wrap
    if wrap is not None and drop > wrap // 2:
        # A drop by more than half the modulus is far more likely a wrap than a reset.
        step = value + wrap - base
        return ("up", step) if limit is None or step <= limit else ("jump", step)
    if drop <= rule.glitch:
        return "glitch", 0
    return "reset", value


def advance(
    state: CounterState,
    value: int,
    source_time: float,
    rule: CounterRule = _DEFAULT_RULE,
    reset: bool = False,
) -> Step:
    """Apply one counter reading to ``state``.

    ``reset`` says the device signalled a reset with this reading (an order change, a
    changeover, a reset bit): a drop is then a reset at once, without confirmation.
    Late readings (older ``source_time``) are ignored.
    """
    if state.source_time is not None and source_time < state.source_time:
        return Step(state, 0, False)
    base = state.value
    if base is None:
        # The first reading is the baseline: nothing is known about what came before it.
        return Step(CounterState(value, source_time), 0, True)
    if not state.pending and base <= value:
        # Fast path, the common case: the counter stood still or moved forward a little.
        step = value - base
        if step <= rule.floor:
            return Step(CounterState(value, source_time), step, True)
        since = state.source_time
        if state.anchor:
            limit = rule.limit(0.0)
        else:
            limit = rule.limit(None if since is None else max(0.0, source_time - since))
        if limit is None or step <= limit:
            return Step(CounterState(value, source_time), step, True)
    kind, pieces = _judge(base, state.source_time, value, source_time, rule, state.anchor)
    given_up = len(state.pending)
    if kind == "up":
        return Step(CounterState(value, source_time), pieces, True, given_up)
    pending = state.pending
    if pending and pending[-1] == (value, source_time):
        return Step(state, 0, True)  # the same pending reading delivered again
    if pending and _agrees(pending[-1], value, source_time, rule):
        # Another reading in line with the pending ones: closer to confirming them.
        pending = (*pending, (value, source_time))
        given_up = 0
    elif reset and kind in ("glitch", "reset"):
        # A signalled reset: whatever the counter shows now was made since.
        return Step(CounterState(value, source_time), value, True, given_up, 0, True)
    elif kind == "glitch":
        # The baseline stands; earlier pending readings were glitches too.
        return Step(CounterState(base, state.source_time, (), state.anchor), 0, True, given_up + 1)
    else:
        # A reset or a jump: held until confirmed; older pending readings were glitches.
        pending = ((value, source_time),)
    if len(pending) < rule.confirm:
        return Step(CounterState(base, state.source_time, pending, state.anchor), 0, True, given_up)
    first = pending[0][0]
    kind, pieces = _judge(base, state.source_time, first, pending[0][1], rule, state.anchor)
    accepted = CounterState(value, source_time)
    if kind == "reset" or state.anchor:
        # Confirmed reset, or a per-order counter that already showed pieces when the order
        # started (the gateway started mid-order): the pieces on the counter now are new.
        if kind != "reset":
            return Step(accepted, value, True, given_up)
        # Confirmed reset: the pieces on the counter now were made since the reset.
        return Step(accepted, value, True, given_up, 0, True)
    # Confirmed jump beyond what the machine can make: a replaced or re-based counter.
    # Only the growth since the jump is production.
    return Step(accepted, value - first, True, given_up, pieces)
