"""Pure counter arithmetic: device counter readings to piece deltas.

Device counters are unreliable in known ways: the operator resets them, 16- and 32-bit
registers wrap, the same value is read twice, a reconnecting OPC UA client replays values
older than ones already seen, a line glitches, a 32-bit value is torn across two requests,
a box reboots. The functions here turn a stream of readings into piece deltas that are
never negative and never credit a glitch. The rules (see ``docs/tracker.md`` for worked
examples):

* same value as before: delta 0 (duplicate read);
* higher value, by at most what the machine can make in the time since the baseline
  (:meth:`CounterRule.limit`): a plausible increase (includes pieces made while offline);
* lower value, a wrap modulus is set and the drop is more than half the modulus: the
  counter wrapped, a plausible increase of new + modulus - old (if plausible, as above);
* a plausible increase is credited only as far as ``confirm`` consecutive readings agree:
  the baseline moves to the lowest of the last ``confirm`` readings when all of them are
  plausible increases, so a one-reading spike is never credited and its return is no reset
  (``confirm=1`` credits each reading at once);
* a drop by at most ``glitch`` counts: a glitch, rejected, the baseline stands (unless the
  device signalled a reset with it);
* a larger drop (a reset) or a larger jump: pending until ``confirm`` consecutive readings
  agree; a reading that agrees with the baseline again rejects them all. A confirmed reset
  credits what the first of them shows (and the held increase before it); a confirmed jump
  re-bases the counter (credits nothing of the jump itself);
* a reading whose source time is older than the last applied one: ignored (late).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.core.vocabulary import MAX_COUNT as MAX_COUNT
from gateway.core.vocabulary import parse_count as parse_count


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
    agree with each other: a reset or a re-based counter not yet confirmed. ``rising``
    holds the latest consecutive readings that are plausible increases over the baseline
    and not yet credited (at most ``confirm - 1`` after a credit). A named tuple,
    not a dataclass: one is built per counter reading, and a tuple is built fastest.
    """

    value: int | None = None
    source_time: float | None = None
    pending: tuple[tuple[int, float], ...] = ()
    anchor: bool = False
    rising: tuple[tuple[int, float], ...] = ()


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
    rising = state.rising
    if rising:
        last_value, last_time = rising[-1]
        if source_time < last_time:
            return Step(state, 0, False)  # older than a reading already held: late
        if source_time == last_time and value == last_value:
            return Step(state, 0, True)  # the same reading delivered again
        if reset and _below(value, last_value, base, rule.wrap):
            # A signalled reset below a held reading: that reading was the counter's last
            # before the reset, and whatever it shows now was made since.
            held = _held(state, rule)
            return Step(CounterState(value, source_time), held + value, True, 0, 0, True)
        if (
            not state.pending
            and _judge(last_value, last_time, value, source_time, rule, False)[0] == "up"
        ):
            # The counter's latest reading is the last held one: a plausible step from it
            # (a wrap included) is an increase, however far the baseline lags behind.
            return _rise(state, value, source_time, rule)
    if not state.pending and base <= value:
        # Fast path, the common case: the counter stood still or moved forward a little.
        step = value - base
        if step > rule.floor:
            since = state.source_time
            if state.anchor:
                limit = rule.limit(0.0)
            else:
                limit = rule.limit(None if since is None else max(0.0, source_time - since))
            plausible = limit is None or step <= limit
        else:
            plausible = True
        if plausible:
            if rule.confirm == 1:
                return Step(CounterState(value, source_time), step, True)
            return _rise(state, value, source_time, rule)
    kind, pieces = _judge(base, state.source_time, value, source_time, rule, state.anchor)
    if kind == "glitch" and rising and _dropped(rising[-1], value, source_time, rule):
        # Below the baseline, and far below the last held reading (the counter's latest):
        # a reset, not a glitch.
        kind = "reset"
    given_up = len(state.pending)
    if kind == "up":
        if rule.confirm == 1:
            return Step(CounterState(value, source_time), pieces, True, given_up)
        rose = _rise(state._replace(pending=()), value, source_time, rule)
        return rose._replace(rejected=rose.rejected + given_up)
    pending = state.pending
    if pending and pending[-1] == (value, source_time):
        return Step(state, 0, True)  # the same pending reading delivered again
    if pending and _agrees(pending[-1], value, source_time, rule):
        # Another reading in line with the pending ones: closer to confirming them.
        pending = (*pending, (value, source_time))
        given_up = 0
    elif reset and kind in ("glitch", "reset"):
        # A signalled reset: whatever the counter shows now was made since, and the readings
        # held before it were the last of the counter before the reset.
        held = _held(state, rule)
        return Step(CounterState(value, source_time), held + value, True, given_up, 0, True)
    elif kind == "glitch":
        # The baseline stands; earlier pending readings were glitches too. A rejected
        # reading does not interrupt the held increases.
        kept = CounterState(base, state.source_time, (), state.anchor, state.rising)
        return Step(kept, 0, True, given_up + 1)
    else:
        # A reset or a jump: held until confirmed; older pending readings were glitches.
        pending = ((value, source_time),)
    if len(pending) < rule.confirm:
        waiting = CounterState(base, state.source_time, pending, state.anchor, state.rising)
        return Step(waiting, 0, True, given_up)
    first, first_time = pending[0]
    kind, pieces = _judge(base, state.source_time, first, first_time, rule, state.anchor)
    if kind == "glitch" and rising and _dropped(rising[-1], first, first_time, rule):
        kind = "reset"
    # The pending readings agree, each at or above the one before: the first is what they
    # all agree on; the later ones are held like any increase until confirmed.
    accepted = CounterState(first, first_time, (), False, pending[1:][-(rule.confirm - 1) :])
    if rule.confirm == 1:
        accepted = CounterState(first, first_time)
    if kind == "reset" or state.anchor:
        # Confirmed reset, or a per-order counter that already showed pieces when the order
        # started (the gateway started mid-order): the pieces on the counter now are new.
        if kind != "reset":
            return Step(accepted, first, True, given_up)
        # Confirmed reset: the pieces on the counter now were made since the reset, and the
        # readings held before it were the last of the counter before the reset.
        return Step(accepted, _held(state, rule) + first, True, given_up, 0, True)
    # Confirmed jump beyond what the machine can make: a replaced or re-based counter.
    # Only the growth since the jump is production (and what was held before it).
    return Step(accepted, _held(state, rule), True, given_up, pieces)


def _dropped(held: tuple[int, float], value: int, when: float, rule: CounterRule) -> bool:
    """Whether ``value`` is a reset judged against the held reading ``held``."""
    return _judge(held[0], held[1], value, when, rule, False)[0] == "reset"


def _below(value: int, held: int, base: int, wrap: int | None) -> bool:
    """Whether ``value`` is below the held reading ``held``, both counted from ``base``."""
    if wrap:
        return (value - base) % wrap < (held - base) % wrap
    return value < held


def _held(state: CounterState, rule: CounterRule) -> int:
    """Pieces up to the last held reading: the counter's last before a reset or an end."""
    base = state.value
    if not state.rising or base is None:
        return 0
    last = state.rising[-1][0]
    return (last - base) % rule.wrap if rule.wrap else last - base


def _rise(state: CounterState, value: int, source_time: float, rule: CounterRule) -> Step:
    """Hold a plausible increase; credit what the last ``confirm`` readings agree on."""
    base = state.value
    assert base is not None
    wrap = rule.wrap
    window = (*state.rising, (value, source_time))
    steps = [(v - base) % wrap if wrap else v - base for v, _ in window]
    # Below the reading held before it: one of the two was a glitch (a spike or a dip).
    rejected = 1 if len(steps) > 1 and steps[-1] < steps[-2] else 0
    if len(window) < rule.confirm:
        held = CounterState(base, state.source_time, (), state.anchor, window)
        return Step(held, 0, True, rejected)
    pieces = min(steps)
    low, low_time = window[steps.index(pieces)]
    kept = window[len(window) - rule.confirm + 1 :]
    return Step(CounterState(low, low_time, (), False, kept), pieces, True, rejected)
