"""MachineTracker: the pure functional core turning samples and order commands into events.

One tracker per machine. It is synchronous and deterministic: no I/O, no clock, no
randomness, no logging. Time comes in as ``now`` (float epoch seconds) with every call;
events come out as :class:`gateway.core.model.Event` with a per-machine ``sequence`` that
starts at 1 and never repeats (also across :meth:`MachineTracker.export_state` /
:meth:`MachineTracker.restore`).

Inputs that are not usable (bad quality, wrong type, out of range, older than what was
already applied) never raise: they are skipped, and the malformed ones are kept as
:class:`Rejection` records that the shell fetches with
:meth:`MachineTracker.drain_rejections` and logs.

The rules (counter arithmetic, event payloads, order-source policy) are written down with
worked examples in ``docs/tracker.md``.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

from gateway.core.attribution import Attribution, parse_operator
from gateway.core.counters import CounterRule, CounterState, advance
from gateway.core.events import CompletionReason, CompletionRule, EventType
from gateway.core.model import Event, Quality, Sample
from gateway.core.vocabulary import (
    BIT_SIGNALS,
    COUNTER_SIGNALS,
    MAX_ID_LEN,
    MAX_TARGET,
    MAX_TEXT_LEN,
    OPERATOR_SIGNAL,
    OPERATORS_KEY,
    TARGET_SIGNAL,
    MachineState,
    clean_text,
    normalise,
    parse_bit,
    parse_count,
)

#: Builds a :class:`CounterState` without the named tuple's slower constructor.
_new_state = tuple.__new__

OrderSource = Literal["device", "platform", "device_then_platform"]
COMPLETION_RULES: tuple[CompletionRule, ...] = (
    "good_reached",
    "total_reached",
    "device_ended",
    "order_changed",
)

#: Orders waiting per machine; an assign beyond this is rejected.
MAX_QUEUE = 1_000
#: Finished order ids remembered to reject a platform re-assigning one by mistake; as many
#: withdrawn ones (taken off the queue before they ran) besides.
RECENT_ORDERS = 1_000
#: Command ids remembered per destination so a redelivered command (MQTT is at least
#: once) is idempotent.
RECENT_COMMANDS = 1_000
#: The answer to an order-scoped platform whose order id is running, queued or done here:
#: the same words whoever's order it is, so no platform learns of another's orders.
ORDER_ID_TAKEN = "order id is in use on this machine: choose a new order id"
#: Closed unobserved periods remembered to keep them out of alarm and state durations.
RECENT_GAPS = 16
MAX_REJECTIONS = 100
STATE_VERSION = 1

_COUNT_SIGNALS = COUNTER_SIGNALS
CounterMode = Literal["per_order", "lifetime"]
_USED_SIGNALS = frozenset(
    {
        "state",
        "order_id",
        TARGET_SIGNAL,
        "alarm_code",
        "alarm_text",
        OPERATOR_SIGNAL,
        *BIT_SIGNALS,
        *_COUNT_SIGNALS,
    }
)


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    """Per-machine tracker behaviour (compiled from the machine's config)."""

    progress_step_percent: float = 5.0
    progress_interval: float = 30.0
    rate_window: float = 600.0
    counter_mode: Literal["per_order", "lifetime"] = "per_order"
    counter_wrap: int | None = None
    scrap_source: Literal["counter", "total_minus_good", "none"] = "counter"
    #: Shorthand kept for older configs: false drops good_reached/total_reached from the
    #: default ``complete_when``.
    complete_on_target: bool = True
    order_source: OrderSource = "device"
    #: The rate needs at least this much history (capped at ``rate_window``) to be shown.
    rate_min_span: float = 60.0
    #: A fixed largest counter step in one reading. ``None`` (the default) derives it from
    #: ``max_rate_per_hour`` and the time since the last accepted reading (at least
    #: ``poll_interval``). A larger step is held until confirmed, then taken as a replaced or
    #: re-based counter (a new controller, a restored backup): nothing of it is credited.
    max_counter_jump: int | None = None
    #: Fastest the machine can count (pieces per hour, per counter).
    max_rate_per_hour: float = 36_000.0
    #: Seconds between polls (the shortest time a counter step is judged over).
    poll_interval: float = 1.0
    #: Consecutive agreeing readings that confirm a reset or a large jump.
    counter_confirm: int = 2
    #: A drop by at most this many counts is a glitch, not a reset (unless signalled).
    counter_glitch: int = 10
    #: Per counter signal: ``(signal, mode or None, wrap modulus or None)``; ``None`` takes
    #: ``counter_mode`` / ``counter_wrap`` (e.g. a per-order good counter next to a
    #: lifetime scrap counter that wraps at 16 bits).
    counter_rules: tuple[tuple[str, CounterMode | None, int | None], ...] = ()
    #: What completes an order, any of :data:`COMPLETION_RULES`; ``None``: good_reached
    #: (if ``complete_on_target``) and order_changed. ``total_reached`` makes the target,
    #: ``percent``, the rate and the ETA count every piece (good and scrap).
    complete_when: tuple[CompletionRule, ...] | None = None

    def __post_init__(self) -> None:
        """Reject settings that would make the tracker misbehave."""
        if not self.progress_step_percent > 0:
            raise ValueError("progress_step_percent must be > 0")
        if not self.progress_interval > 0:
            raise ValueError("progress_interval must be > 0")
        if not self.rate_window > 0:
            raise ValueError("rate_window must be > 0")
        if not self.rate_min_span >= 0:
            raise ValueError("rate_min_span must be >= 0")
        if self.max_counter_jump is not None and self.max_counter_jump < 1:
            raise ValueError("max_counter_jump must be >= 1 (or unset)")
        if not self.max_rate_per_hour > 0:
            raise ValueError("max_rate_per_hour must be > 0")
        if not self.poll_interval > 0:
            raise ValueError("poll_interval must be > 0")
        if not 1 <= self.counter_confirm <= 10:
            raise ValueError("counter_confirm must be 1..10 readings")
        if self.counter_glitch < 0:
            raise ValueError("counter_glitch must be >= 0")
        if self.complete_when is not None:
            unknown = [r for r in self.complete_when if r not in COMPLETION_RULES]
            if unknown:
                raise ValueError(
                    f"complete_when: unknown rule(s) {unknown}; use {', '.join(COMPLETION_RULES)}"
                )
            if "order_changed" not in self.complete_when:
                raise ValueError(
                    "complete_when must include order_changed: a machine that moved to "
                    "another order has ended this one"
                )
            if {"good_reached", "total_reached"} <= set(self.complete_when):
                raise ValueError(
                    "complete_when: good_reached and total_reached together; the target has "
                    "one basis, good pieces or all pieces"
                )
        for signal, mode, wrap in self.counter_rules:
            if signal not in COUNTER_SIGNALS:
                raise ValueError(f"counter_rules: {signal!r} is not a counter signal")
            if mode not in (None, "per_order", "lifetime"):
                raise ValueError(f"counter_rules: unknown mode {mode!r} for {signal}")
            if wrap is not None and wrap < 2:
                raise ValueError(f"counter_rules: wrap of {signal} must be >= 2 (e.g. 65536)")

        if self.counter_wrap is not None and self.counter_wrap < 2:
            raise ValueError("counter_wrap must be >= 2 (e.g. 65536)")
        if self.counter_mode not in ("per_order", "lifetime"):
            raise ValueError(f"unknown counter_mode {self.counter_mode!r}")
        if self.scrap_source not in ("counter", "total_minus_good", "none"):
            raise ValueError(f"unknown scrap_source {self.scrap_source!r}")
        if self.order_source not in ("device", "platform", "device_then_platform"):
            raise ValueError(f"unknown order_source {self.order_source!r}")

    @property
    def completion(self) -> tuple[CompletionRule, ...]:
        """The rules in force (``complete_when`` or the default it stands for)."""
        if self.complete_when is not None:
            return self.complete_when
        return ("good_reached", "order_changed") if self.complete_on_target else ("order_changed",)

    def mode_of(self, signal: str) -> CounterMode:
        """The counter mode of ``signal`` (its own rule, else ``counter_mode``)."""
        for name, mode, _ in self.counter_rules:
            if name == signal and mode is not None:
                return mode
        return self.counter_mode

    def wrap_of(self, signal: str) -> int | None:
        """The wrap modulus of ``signal`` (its own rule, else ``counter_wrap``)."""
        for name, _, wrap in self.counter_rules:
            if name == signal and wrap is not None:
                return wrap
        return self.counter_wrap


@dataclass(frozen=True, slots=True)
class AssignOrder:
    """Platform command: run ``order_id`` on this machine (queued behind running orders)."""

    order_id: str
    target: int
    due: float | None = None
    customer: str | None = None
    command_id: str = ""
    #: The destination the command came through: command ids are unique per destination.
    origin: str = ""
    #: The destination sees only its own orders: the answer names no other order's state
    #: and counts no queue.
    private: bool = False


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """Platform command: drop a queued order or stop the running platform order."""

    order_id: str
    command_id: str = ""
    #: As for :class:`AssignOrder`.
    origin: str = ""


Command = AssignOrder | CancelOrder


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Answer to a platform command; ``reason`` is a human-readable explanation."""

    accepted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """A sample the tracker could not use, for the shell to log."""

    signal: str
    value: str
    reason: str
    time: float


@dataclass(slots=True)
class _Queued:
    order_id: str
    target: int
    due: float | None
    customer: str | None


@dataclass(slots=True)
class _Order:
    order_id: str
    source: str
    target: int | None
    due: float | None
    customer: str | None
    started_at: float
    good: int = 0
    scrap: int = 0
    total: int = 0
    completed_at: float | None = None
    overrun: int = 0
    progress_sent: bool = False
    progress_time: float = 0.0
    progress_good: int = 0
    progress_scrap: int = 0
    progress_percent: float = 0.0
    at_risk: bool = False
    #: (time, good) points for the sliding-window rate; the first is the anchor.
    history: list[tuple[float, int]] = field(default_factory=list)

    #: Count the target is measured in: good pieces, or all pieces (``total_reached``).
    total_basis: bool = False
    #: Seconds of the order's life the gateway did not observe, and the bounds of the
    #: unobserved period(s): start of the first, end of the last.
    unobserved_s: float = 0.0
    gap_started_at: float | None = None
    gap_ended_at: float | None = None

    @property
    def running(self) -> bool:
        return self.completed_at is None

    @property
    def done(self) -> int:
        """Pieces on the target's basis: good, or all (the total counter or good + scrap)."""
        if self.total_basis:
            return max(self.total, self.good + self.scrap)
        return self.good


_ORDER_FIELDS = tuple(f.name for f in dataclass_fields(_Order))


def _add_gap(order: _Order, gap: tuple[float, float]) -> None:
    order.unobserved_s = round(order.unobserved_s + gap[1] - gap[0], 3)
    if order.gap_started_at is None:
        order.gap_started_at = gap[0]
    order.gap_ended_at = gap[1]


def _gap_fields(order: _Order) -> dict[str, Any]:
    """What every order event says about the gaps the order spans."""
    return {
        "gap_free": order.gap_started_at is None,
        "unobserved_s": order.unobserved_s,
        "gap_started_at": order.gap_started_at,
        "gap_ended_at": order.gap_ended_at,
    }


def _percent(done: int, target: int | None) -> float | None:
    if not target:
        return None
    return round(100.0 * done / target, 2)


def _rate(order: _Order, now: float, settings: TrackerSettings) -> float | None:
    """Good pieces per hour over the sliding window, or None while history is too short."""
    hist = order.history
    if not hist:
        return None
    start = now - settings.rate_window
    t0, g0 = hist[0]
    # After pruning hist[0] is the last point at or before the window start (the value of
    # the step function there), or the order start when the order is younger than the window.
    span = settings.rate_window if t0 <= start else now - t0
    if span <= 0 or span < min(settings.rate_min_span, settings.rate_window):
        return None
    return round((order.done - g0) * 3600.0 / span, 2)


def _prune(order: _Order, now: float, window: float) -> None:
    start = now - window
    hist = order.history
    drop = 0
    while drop + 1 < len(hist) and hist[drop + 1][0] <= start:
        drop += 1
    if drop:
        del hist[:drop]


def _eta(order: _Order, rate: float | None, now: float) -> float | None:
    if not order.target or not rate or rate <= 0:
        return None
    remaining = order.target - order.done
    if remaining <= 0:
        return None
    return round(now + remaining * 3600.0 / rate, 3)


class MachineTracker:
    """Per-machine state machine: samples, connection changes and commands in, events out."""

    def __init__(self, machine: str, settings: TrackerSettings = TrackerSettings()) -> None:
        """Create a tracker for ``machine`` with nothing known yet."""
        self.machine = machine
        self.settings = settings
        self._seq = 0
        self._connected: bool | None = None
        self._state: str | None = None
        self._state_since: float | None = None
        self._alarm_code = 0
        self._alarm_text = ""
        self._alarm_since: float | None = None
        self._device_alarm_text = ""
        self._device_order_id: str | None = None
        self._device_target: int | None = None
        self._counters: dict[str, CounterState] = {s: CounterState() for s in _COUNT_SIGNALS}
        self._last_time: dict[str, float] = {}
        # Gateway time a counter was last read: a held increase that stood unchanged for two
        # polls is confirmed by time (a subscription reports no unchanged value).
        self._read_at: dict[str, float] = {}
        # The operator logged in before the batch being applied (see observe()).
        self._reader: tuple[bool, str | None] | None = None
        self._order: _Order | None = None
        self._queue: list[_Queued] = []
        self._recent_orders: list[str] = []
        self._withdrawn_orders: list[str] = []
        self._commands: dict[str, CommandResult] = {}
        self._updated_at: float | None = None
        self._rejections: list[Rejection] = []
        #: Last text value per signal and what it parsed to (a repeated text skips parsing).
        self._parsed_text: dict[str, tuple[str, Any]] = {}
        #: Who works on the order (the badge); see gateway.core.attribution.
        self._attribution = Attribution()
        self._rules = {name: self._rule_for(name) for name in _COUNT_SIGNALS}
        self._wraps = {name: rule.wrap for name, rule in self._rules.items()}
        self._per_order = tuple(
            name for name in _COUNT_SIGNALS if settings.mode_of(name) == "per_order"
        )
        #: Counters whose next drop is a reset the device signalled (order change, changeover,
        #: reconnect after a possible reboot, reset bit).
        self._reset_hint: set[str] = set()
        #: Counters reset while the running order ran (before the device showed a new id).
        self._reset_in_order: set[str] = set()
        self._rejected_readings: dict[str, int] = dict.fromkeys(_COUNT_SIGNALS, 0)
        #: Readings rejected by this object (not restored): what the metric counts on from.
        self._rejected_total = 0
        self._completion = frozenset(settings.completion)
        self._total_basis = "total_reached" in self._completion
        self._on_good = "good_reached" in self._completion
        self._on_total = self._total_basis
        #: Last ``order_ended`` read from the device (``None``: never read).
        self._device_ended: bool | None = None
        #: ``now`` of the last batch with usable data: the device was observed until then.
        self._seen_at: float | None = None
        #: Start of the unobserved period in progress (device unreachable, gateway down).
        self._gap_start: float | None = None
        #: Recent closed gaps ``(start, end)``; the one closed by the current batch.
        self._gaps: list[tuple[float, float]] = []
        self._gap_now: tuple[float, float] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def order_id(self) -> str | None:
        """The order the machine works on now (running or just completed), if any."""
        return self._order.order_id if self._order is not None else None

    @property
    def rejected_readings(self) -> dict[str, int]:
        """Counter readings rejected as glitches since start, per signal (a metric)."""
        return dict(self._rejected_readings)

    @property
    def rejected_total(self) -> int:
        """Counter readings rejected as glitches by this tracker object (restores start at 0)."""
        return self._rejected_total

    @property
    def sequence(self) -> int:
        """Last sequence number used (0 before the first event)."""
        return self._seq

    def observe(self, samples: Sequence[Sample], now: float) -> list[Event]:
        """Apply one acquisition batch of samples; return the events it caused."""
        out: list[Event] = []
        batch = self._usable(samples, now)
        self._updated_at = now
        if not batch:
            return out
        if self._gap_start is not None:
            self._end_gap(now)
        if self._connected is not True:
            # Good data is proof the device is reachable, even if the shell has not said so.
            out += self.connection(True, now, "data_received")
        # The badge before the order id and the counts, like the order id before the counts:
        # pieces read in the same batch as a new badge are the new operator's. Pieces held
        # for confirmation were read before this batch: the operator logged in then.
        attribution = self._attribution
        badges = batch.get(OPERATOR_SIGNAL)
        if badges:
            self._reader = (attribution.known, attribution.operator)
            for badge in badges:
                attribution.badge(badge, now)
        elif self._reader is not None:
            self._reader = None  # no new badge: the one logged in read the pieces
        self._attribution.observed(now)
        targets = batch.get("target_count", [])
        if targets:
            self._device_target = targets[-1] or None
        for order_id in batch.get("order_id", []):
            self._on_device_order(order_id, now, out)
        if targets:
            self._on_device_target(now)
        states = batch.get("state", [])
        if ("setup" in states if states else self._state == "setup") or (
            "counter_reset" in batch and any(batch["counter_reset"])
        ):
            # The device says its counters restart: a drop now is a reset, not a glitch.
            self._hint_reset()
        order = self._order
        before = (order.good, order.scrap) if order is not None and order.running else None
        self._on_counts(batch, now)
        if order is not None and before is not None:
            good, scrap = order.good - before[0], order.scrap - before[1]
            if good or scrap:
                self._credit_reader(good, scrap)
        self._after_counts(now, out)
        ended = batch.get("order_ended")
        if ended:
            self._on_order_ended(ended, now, out)
        texts = batch.get("alarm_text", [])
        if texts:
            self._device_alarm_text = texts[-1]
        final_state = states[-1] if states else self._state
        for code in batch.get("alarm_code", []):
            self._on_alarm(code, final_state, now, out)
        if texts and self._alarm_code:
            # Better text for the active alarm (often read in a later poll than its code).
            self._alarm_text = self._device_alarm_text
        for state in states:
            self._on_state(state, now, out)
        self._check_risk(now, out)
        self._seen_at = now
        self._gap_now = None
        return out

    def connection(self, connected: bool, now: float, reason: str = "") -> list[Event]:
        """Record that the device link came up or dropped; return the events it caused."""
        self._updated_at = now
        if self._connected is connected:
            return []
        self._connected = connected
        if not connected:
            self._attribution.pause(now)
        if not connected and self._gap_start is None:
            # Unobserved from the last data on (the loss is noticed only after a timeout).
            self._gap_start = self._seen_at if self._seen_at is not None else now
        if connected:
            # The device may have rebooted while unreachable: its counters may restart.
            self._hint_reset()
        out = [
            self._event(
                EventType.MACHINE_CONNECTION_CHANGED, now, connected=connected, reason=reason
            )
        ]
        if not connected and self._state != MachineState.OFFLINE.value:
            self._set_state(MachineState.OFFLINE.value, "offline", now, out)
        return out

    def tick(self, now: float) -> list[Event]:
        """Time-driven checks: progress on the interval, at-risk / back-on-track."""
        out: list[Event] = []
        order = self._order
        before = (order.good, order.scrap) if order is not None and order.running else None
        if self._confirm_stood(now, ()):
            if order is not None and before is not None:
                self._attribution.credit(order.good - before[0], order.scrap - before[1])
            self._after_counts(now, out)
        order = self._order
        if order is not None and order.running:
            self._maybe_progress(order, now, out)
            self._check_risk(now, out)
        return out

    def command(self, cmd: Command, now: float) -> tuple[CommandResult, list[Event]]:
        """Apply a platform order command; return the verdict and the events it caused."""
        # Each platform picks its own command ids: two platforms may use the same one, and
        # neither may get (or cause) the other's verdict. Destination names hold no '/'.
        key = f"{cmd.origin}/{cmd.command_id}" if cmd.command_id else ""
        if key and key in self._commands:
            first = self._commands[key]
            return CommandResult(first.accepted, f"duplicate command: {first.reason}"), []
        out: list[Event] = []
        self._updated_at = now
        if isinstance(cmd, AssignOrder):
            result = self._assign(cmd, now, out)
        else:
            result = self._cancel(cmd, now, out)
        if key:
            self._commands[key] = result
            if len(self._commands) > RECENT_COMMANDS:
                self._forget_commands(f"{cmd.origin}/")
        return result, out

    def queued_orders(self) -> list[tuple[str, str | None]]:
        """The waiting platform orders, in queue order: (order id, customer)."""
        return [(q.order_id, q.customer) for q in self._queue]

    def _forget_commands(self, prefix: str) -> None:
        """Keep the last :data:`RECENT_COMMANDS` ids per destination.

        Per destination, so one platform's many commands never push another's out (its
        resent command would lose its first verdict).
        """
        mine = [k for k in self._commands if k.startswith(prefix)]
        if len(mine) > RECENT_COMMANDS:
            del self._commands[mine[0]]
        # A bound on the whole table too (ids from before they were per destination).
        while len(self._commands) > 4 * RECENT_COMMANDS:
            del self._commands[next(iter(self._commands))]

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready current state, published retained for late joiners."""
        order = self._order
        order_view: dict[str, Any] | None = None
        if order is not None:
            now = self._updated_at if self._updated_at is not None else order.started_at
            rate = _rate(order, now, self.settings) if order.running else None
            order_view = {
                "order_id": order.order_id,
                "source": order.source,
                "status": "running" if order.running else "completed",
                "good": order.good,
                "scrap": order.scrap,
                "target": order.target,
                "percent": _percent(order.done, order.target),
                "rate_per_hour": rate,
                "eta": _eta(order, rate, now) if order.running else None,
                "due": order.due,
                "started_at": order.started_at,
                "completed_at": order.completed_at,
                "overrun": order.overrun,
                **self._operators(now),
            }
        return {
            "machine": self.machine,
            "state": self._state,
            "state_since": self._state_since,
            "connected": bool(self._connected),
            "order": order_view,
            "queued": len(self._queue),
            "alarm": {"code": self._alarm_code, "text": self._alarm_text}
            if self._alarm_code
            else None,
            "sequence": self._seq,
            "updated_at": self._updated_at,
        }

    def drain_rejections(self) -> list[Rejection]:
        """Return and forget the unusable samples seen since the last call (at most 100)."""
        out, self._rejections = self._rejections, []
        return out

    def export_state(self) -> dict[str, Any]:
        """Everything needed to resume this tracker after a restart, JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "machine": self.machine,
            "sequence": self._seq,
            "connected": self._connected,
            "state": self._state,
            "state_since": self._state_since,
            "alarm": [self._alarm_code, self._alarm_text, self._alarm_since],
            "device_alarm_text": self._device_alarm_text,
            "device_order_id": self._device_order_id,
            "device_target": self._device_target,
            "counters": {
                k: [
                    c.value,
                    c.source_time,
                    [list(p) for p in c.pending],
                    c.anchor,
                    [list(r) for r in c.rising],
                ]
                for k, c in self._counters.items()
            },
            "reset_hint": sorted(self._reset_hint),
            "reset_in_order": sorted(self._reset_in_order),
            "device_ended": self._device_ended,
            "seen_at": self._seen_at,
            "gap_start": self._gap_start,
            "gaps": [list(g) for g in self._gaps],
            "rejected_readings": dict(self._rejected_readings),
            "last_time": dict(self._last_time),
            "read_at": dict(self._read_at),
            "order": _order_to_dict(self._order),
            "queue": [
                {"order_id": q.order_id, "target": q.target, "due": q.due, "customer": q.customer}
                for q in self._queue
            ],
            "recent_orders": list(self._recent_orders),
            "withdrawn_orders": list(self._withdrawn_orders),
            "commands": {k: [r.accepted, r.reason] for k, r in self._commands.items()},
            "updated_at": self._updated_at,
            "attribution": self._attribution.export(),
        }

    @classmethod
    def restore(
        cls,
        machine: str,
        settings: TrackerSettings,
        state: dict[str, Any],
        *,
        downtime: bool = True,
    ) -> MachineTracker:
        """Rebuild a tracker from :meth:`export_state` output; raise ``ValueError`` if invalid.

        ``downtime``: the state comes from a gateway that stopped, so the time from the last
        data it saw to the next is unobserved (a gap, when longer than two polls). False for
        a tracker rebuilt in a running gateway: then the restore changes no later event.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"tracker state for {machine!r}: unsupported or missing version")
        if state.get("machine") != machine:
            raise ValueError(f"tracker state is for {state.get('machine')!r}, not {machine!r}")
        t = cls(machine, settings)
        try:
            t._seq = int(state["sequence"])
            t._connected = _opt(state["connected"], bool)
            t._state = _opt(state["state"], str)
            t._state_since = _opt_float(state["state_since"])
            code, text, since = state["alarm"]
            t._alarm_code, t._alarm_text = int(code), str(text)
            t._alarm_since = _opt_float(since)
            t._device_alarm_text = str(state["device_alarm_text"])
            t._device_order_id = _opt(state["device_order_id"], str)
            t._device_target = _opt(state["device_target"], int)
            for name in _COUNT_SIGNALS:
                # A state saved before glitch filtering has only [value, time].
                value, when, *more = state["counters"][name]
                pending = tuple((int(v), float(w)) for v, w in (more[0] if more else ()))
                anchor = bool(more[1]) if len(more) > 1 else False
                # A state saved before increases were confirmed has no held readings.
                rising = tuple((int(v), float(w)) for v, w in (more[2] if len(more) > 2 else ()))
                t._counters[name] = CounterState(
                    _opt(value, int), _opt_float(when), pending, anchor, rising
                )
            t._reset_hint = {str(h) for h in state.get("reset_hint", [])} & set(_COUNT_SIGNALS)
            t._reset_in_order = {str(h) for h in state.get("reset_in_order", [])} & set(
                _COUNT_SIGNALS
            )
            t._device_ended = _opt(state.get("device_ended"), bool)
            t._seen_at = _opt_float(state.get("seen_at"))
            t._gaps = [(float(a), float(b)) for a, b in state.get("gaps", [])][-RECENT_GAPS:]
            # Nothing was observed between the saved state and whatever comes next: a gap
            # from the last data seen (or, in an older state, the last call).
            for name, n in state.get("rejected_readings", {}).items():
                if name in t._rejected_readings:
                    t._rejected_readings[name] = int(n)
            t._last_time = {str(k): float(v) for k, v in state["last_time"].items()}
            # A state saved before increases were confirmed by time has none.
            t._read_at = {
                str(k): float(v) for k, v in state.get("read_at", {}).items() if k in _COUNT_SIGNALS
            }
            t._order = _order_from_dict(state["order"])
            t._queue = [_Queued(**q) for q in state["queue"]]
            t._recent_orders = [str(o) for o in state["recent_orders"]]
            # Absent in a state saved before withdrawn ids were kept.
            t._withdrawn_orders = [str(o) for o in state.get("withdrawn_orders", [])]
            t._commands = {
                str(k): CommandResult(bool(a), str(r)) for k, (a, r) in state["commands"].items()
            }
            t._updated_at = _opt_float(state["updated_at"])
            # Absent in state written before attribution existed.
            running = t._order is not None and t._order.running
            t._attribution = Attribution.restore(state.get("attribution"), t._updated_at, running)
            gap_start = _opt_float(state.get("gap_start"))
            if gap_start is None and downtime:
                gap_start = t._seen_at if t._seen_at is not None else t._updated_at
            t._gap_start = gap_start
        # AttributeError: a list where a mapping belongs; OverflowError: int(inf), float(10**400).
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"tracker state for {machine!r} is malformed: {exc!r}") from exc
        if t._seq < 0:
            raise ValueError(f"tracker state for {machine!r}: negative sequence")
        return t

    # ------------------------------------------------------------------ samples

    def _reject(self, sample: Sample, reason: str, now: float) -> None:
        if len(self._rejections) >= MAX_REJECTIONS:
            del self._rejections[0]
        self._rejections.append(Rejection(sample.signal, repr(sample.value)[:80], reason, now))

    def _usable(self, samples: Sequence[Sample], now: float) -> dict[str, list[Any]]:
        """Validate and parse the samples the tracker uses, grouped by signal, in order."""
        batch: dict[str, list[Any]] = {}
        wraps = self._wraps
        me = self.machine
        good = Quality.GOOD
        any_good = False
        for s in samples:
            # One unpack instead of an attribute lookup per field: this runs for every
            # sample of every poll, telemetry included.
            machine, signal, raw, source_time, quality = s
            if machine != me:
                self._reject(s, f"sample for machine {machine!r}", now)
                continue
            if quality is not good:
                continue  # keep the last good value
            any_good = True
            if signal not in _USED_SIGNALS:
                continue  # telemetry, program, operator...: not the tracker's business
            last = self._last_time.get(signal)
            if last is not None and source_time < last:
                continue  # late replay (e.g. after an OPC UA reconnect): newer value known
            memo = self._parsed_text.get(signal) if type(raw) is str else None
            if memo is not None and memo[0] == raw:
                # The same text as last time (state and order id, every poll): already valid.
                value = memo[1]
            else:
                try:
                    value = self._parse(signal, raw, wraps.get(signal))
                except ValueError as exc:
                    self._reject(s, str(exc), now)
                    continue
                if type(raw) is str:
                    self._parsed_text[signal] = (raw, value)
            self._last_time[signal] = source_time
            if signal in _COUNT_SIGNALS:
                value = (value, source_time)
            batch.setdefault(signal, []).append(value)
        if any_good and not batch:
            batch["_alive"] = []
        return batch

    @staticmethod
    def _parse(signal: str, value: object, wrap: int | None) -> Any:
        # The vocabulary's one validator, as the mapper applies it; the tracker adds only
        # the counter's wrap, the badge's "nobody" and the bits as bools.
        if signal in _COUNT_SIGNALS:
            return parse_count(value, wrap)
        if signal == OPERATOR_SIGNAL:
            return parse_operator(value)
        if signal in BIT_SIGNALS:
            return parse_bit(value, signal)
        return normalise(signal, value)

    def _confirm_stood(self, now: float, skip: Container[str]) -> bool:
        """Credit held increases that stood unchanged for two polls; True if any counted.

        A poll would have read a spike's return by then, and a subscription sends no
        unchanged value. ``skip``: counters read in this batch (their reading decides).
        """
        if self._connected is not True:
            return False
        wait = 2.0 * self.settings.poll_interval
        order = self._order
        before = (order.good, order.scrap) if order is not None else None
        credited = False
        for name, c in self._counters.items():
            rising = c.rising
            if not rising or c.value is None or name in skip:
                continue
            if now - self._read_at.get(name, rising[-1][1]) < wait:
                continue
            wrap = self._rules[name].wrap
            low, low_time = rising[-1]
            pieces = (low - c.value) % wrap if wrap else low - c.value
            self._counters[name] = CounterState(low, low_time, c.pending)
            if pieces and order is not None:
                self._credit(order, name, pieces)
                credited = True
        if credited and order is not None and before is not None:
            self._counts_moved(order, before, now)
        return credited

    def _on_counts(self, batch: dict[str, list[Any]], now: float) -> None:
        order = self._order
        before = (order.good, order.scrap) if order is not None else None
        hints = self._reset_hint
        read_at = self._read_at
        read = 0
        for signal in _COUNT_SIGNALS:
            readings = batch.get(signal)
            if not readings:
                continue
            read_at[signal] = now
            read += 1
            rule = self._rules[signal]
            counters = self._counters
            floor = rule.floor
            two = rule.confirm == 2
            for value, when in readings:
                c = counters[signal]
                base, _, pending, _, rising = c
                # With two readings to agree, one is held at a time (and only over a base).
                if two and rising and not pending:
                    ((held, held_time),) = rising
                    fast = base <= held <= value <= base + floor and when > held_time  # type: ignore[operator]
                else:
                    fast = False
                if fast:
                    # advance()'s common case inline (this runs for every counter reading):
                    # a small step forward is plausible, and the baseline moves to the
                    # reading held before it. tuple.__new__: a named tuple's own
                    # constructor is several times slower.
                    counters[signal] = _new_state(
                        CounterState, (held, held_time, (), False, ((value, when),))
                    )
                    delta = held - base  # type: ignore[operator]
                    if hints:
                        hints.discard(signal)
                else:
                    state, delta, applied, rejected, rebased, reset = advance(
                        c, value, when, rule, signal in hints
                    )
                    if not applied:
                        continue
                    counters[signal] = state
                    if hints and not state.pending:
                        hints.discard(signal)  # kept across a glitch until one is accepted
                    if rejected or rebased or reset:
                        self._unusual_step(signal, value, when, state, rejected, rebased, reset)
                if delta and order is not None:
                    self._credit(order, signal, delta)
        if read < len(read_at):
            self._confirm_stood(now, batch)  # a counter read before, not in this batch
        if order is None or not order.running:
            return
        # _counts_moved() inline (this runs for every batch).
        if self.settings.scrap_source == "total_minus_good":
            order.scrap = max(order.scrap, order.total - order.good)
        done = order.done if order.total_basis else order.good
        if before != (order.good, order.scrap) and done != order.history[-1][1]:
            order.history.append((now, done))
            _prune(order, now, self.settings.rate_window)

    def _counts_moved(self, order: _Order, before: tuple[int, int], now: float) -> None:
        """Derived scrap and the rate history after pieces were credited."""
        if not order.running:
            return
        if self.settings.scrap_source == "total_minus_good":
            # Never backwards: good and total may come from different polls.
            order.scrap = max(order.scrap, order.total - order.good)
        done = order.done if order.total_basis else order.good
        if before != (order.good, order.scrap) and done != order.history[-1][1]:
            order.history.append((now, done))
            _prune(order, now, self.settings.rate_window)

    def _unusual_step(
        self,
        signal: str,
        value: int,
        when: float,
        state: CounterState,
        rejected: int,
        rebased: int,
        reset: bool,
    ) -> None:
        """Record a glitch, a re-based counter or a reset (off the common path)."""
        if rejected:
            self._rejected_readings[signal] += rejected
            self._rejected_total += rejected
            self._add_rejection(
                Rejection(
                    signal,
                    str(value),
                    f"counter reading disagrees with the baseline {state.value} and was not "
                    f"confirmed by {self.settings.counter_confirm} consecutive readings: taken "
                    f"as a glitch ({rejected} reading(s) rejected)",
                    when,
                )
            )
        if rebased:
            self._add_rejection(
                Rejection(
                    signal,
                    str(value),
                    f"counter jumped by {rebased}, more than the machine can make "
                    "(max_rate_per_hour / max_counter_jump), and stayed there: taken as "
                    "a replaced or re-based counter, not as production",
                    when,
                )
            )
        order = self._order
        if reset and order is not None and order.running:
            self._reset_in_order.add(signal)

    def _add_rejection(self, rejection: Rejection) -> None:
        if len(self._rejections) >= MAX_REJECTIONS:
            del self._rejections[0]
        self._rejections.append(rejection)

    def _rule_for(self, signal: str) -> CounterRule:
        s = self.settings
        return CounterRule(
            wrap=s.wrap_of(signal),
            confirm=s.counter_confirm,
            glitch=s.counter_glitch,
            max_rate=s.max_rate_per_hour / 3600.0,
            poll_interval=s.poll_interval,
            max_jump=s.max_counter_jump,
        )

    def _end_gap(self, now: float) -> None:
        """Observation resumed: record the gap and charge it to the order it spans."""
        start = self._gap_start
        self._gap_start = None
        # A short pause (a config reload rebuilding the tracker, one slow poll) is no gap.
        if start is None or now - start <= max(2.0 * self.settings.poll_interval, 2.0):
            return
        gap = (start, now)
        self._gaps.append(gap)
        if len(self._gaps) > RECENT_GAPS:
            del self._gaps[0]
        self._gap_now = gap
        order = self._order
        if order is not None and order.running:
            _add_gap(order, gap)

    def _hint_reset(self) -> None:
        """The device may restart its counters now: a drop is a reset, not a glitch."""
        # Only counters read before: a hint for a counter never read would stay for ever.
        self._reset_hint.update(n for n, c in self._counters.items() if c.value is not None)

    def _unobserved(self, since: float, now: float) -> float:
        """Seconds of ``[since, now]`` inside known gaps."""
        total = 0.0
        for start, end in self._gaps:
            total += max(0.0, min(end, now) - max(start, since))
        return total

    def _credit(self, order: _Order, signal: str, delta: int) -> None:
        if not order.running:
            if signal == "good_count":
                order.overrun += delta
            return
        if signal == "good_count":
            order.good += delta
        elif signal == "total_count":
            order.total += delta
        elif self.settings.scrap_source == "counter":
            order.scrap += delta

    def _credit_reader(self, good: int, scrap: int) -> None:
        """Credit pieces to the operator logged in when their readings were taken."""
        reader = self._reader
        if reader is not None and reader[0] and self.settings.counter_confirm > 1:
            # Credited once a later reading agreed: read while the previous badge showed.
            self._attribution.credit_to(reader[1], good, scrap)
        else:
            self._attribution.credit(good, scrap)

    def _settle(self, now: float) -> None:
        """The order ends: credit the counter readings still held, up to the last one.

        No later reading of this order will come to confirm them (an order change, a job
        that ended): the last reading is the best knowledge of the order's last count.
        """
        order = self._order
        before = (order.good, order.scrap) if order is not None and order.running else None
        for name, c in self._counters.items():
            base, rising = c.value, c.rising
            if not rising or base is None:
                continue
            wrap = self._rules[name].wrap
            low, low_time = rising[-1]
            pieces = (low - base) % wrap if wrap else low - base
            # Pending readings (a reset not yet confirmed) stay pending against the new base.
            self._counters[name] = CounterState(low, low_time, c.pending)
            if pieces and order is not None:
                self._credit(order, name, pieces)
        if order is not None and before is not None:
            self._counts_moved(order, before, now)
            # Called outside observe()'s own crediting: the readings' operator gets them.
            self._credit_reader(order.good - before[0], order.scrap - before[1])

    def _after_counts(self, now: float, out: list[Event]) -> None:
        order = self._order
        if order is None or not order.running:
            return
        rule = self._reached(order) if order.target else None
        if rule is not None:
            self._complete("target_reached", now, out, rule)
            self._start_next(now, out)
        else:
            self._maybe_progress(order, now, out)

    def _reached(self, order: _Order) -> CompletionRule | None:
        """The completion rule the order's counts meet now, or ``None``."""
        target = order.target
        if target and (
            (self._on_good and order.good >= target) or (self._on_total and order.done >= target)
        ):
            return "good_reached" if self._on_good else "total_reached"
        return None

    def _on_order_ended(self, values: list[bool], now: float, out: list[Event]) -> None:
        for ended in values:
            # Only the change to ended counts: a job state still "Ended" from the previous
            # job (its new state not read yet) must not end the next one.
            rising = ended and self._device_ended is False
            self._device_ended = ended
            order = self._order
            if not rising or "device_ended" not in self._completion:
                continue
            if order is not None and order.running:
                self._settle(now)  # the job's last reading is its last: nothing follows to agree
                reached = self._reached(order)
                if reached is not None:
                    # The target was met before the job ended (credited one reading late).
                    self._complete("target_reached", now, out, reached)
                else:
                    self._complete("device_ended", now, out, "device_ended")
                self._start_next(now, out)

    def _on_state(self, state: str, now: float, out: list[Event]) -> None:
        if state == self._state:
            return
        reason = "alarm" if state == MachineState.FAULT.value and self._alarm_code else "device"
        self._set_state(state, reason, now, out)

    def _set_state(self, state: str, reason: str, now: float, out: list[Event]) -> None:
        previous, since = self._state, self._state_since
        self._state, self._state_since = state, now
        # Offline is itself what was observed of a gap; other states exclude gaps.
        unseen = (
            0.0
            if since is None or previous == MachineState.OFFLINE.value
            else self._unobserved(since, now)
        )
        order = self._order
        out.append(
            self._event(
                EventType.MACHINE_STATE_CHANGED,
                now,
                state=state,
                previous=previous,
                previous_duration_s=None
                if since is None
                else round(max(0.0, now - since - unseen), 3),
                unobserved_s=round(unseen, 3),
                reason=reason,
                order_id=order.order_id if order is not None and order.running else None,
            )
        )

    def _on_alarm(self, code: int, state: str | None, now: float, out: list[Event]) -> None:
        if code == self._alarm_code:
            return
        if self._alarm_code:
            since = self._alarm_since
            unseen = 0.0 if since is None else self._unobserved(since, now)
            out.append(
                self._event(
                    EventType.MACHINE_ALARM_CLEARED,
                    now,
                    code=self._alarm_code,
                    text=self._alarm_text,
                    # Only what was observed: the alarm may have cleared at any time in a gap.
                    duration_s=None if since is None else round(max(0.0, now - since - unseen), 3),
                    unobserved_s=round(unseen, 3),
                )
            )
        self._alarm_code, self._alarm_since = code, now
        self._alarm_text = self._device_alarm_text if code else ""
        if code:
            severity = "fault" if state == MachineState.FAULT.value else "warning"
            out.append(
                self._event(
                    EventType.MACHINE_ALARM_RAISED,
                    now,
                    code=code,
                    text=self._alarm_text,
                    severity=severity,
                )
            )

    # ------------------------------------------------------------------ orders

    def _on_device_order(self, order_id: str, now: float, out: list[Event]) -> None:
        policy = self.settings.order_source
        if order_id == self._device_order_id:
            return
        self._device_order_id = order_id
        # A new job on the device: its counters may restart with it.
        self._hint_reset()
        if policy == "platform":
            return  # recorded only: the platform decides what runs
        order = self._order
        if policy == "device":
            if order is not None:
                self._finish_current("order_changed" if order_id else "order_cleared", now, out)
            if order_id:
                self._start(order_id, "device", self._device_target, None, None, now, out)
            return
        # device_then_platform: a device order id wins; without one the queue runs.
        if order_id:
            if order is not None and order.running and order.order_id == order_id:
                return  # the operator confirmed the running order on the machine
            if order is not None:
                reason: CompletionReason = (
                    "replaced" if order.source == "platform" else "order_changed"
                )
                self._finish_current(reason, now, out)
            queued = next((q for q in self._queue if q.order_id == order_id), None)
            if queued is not None:
                self._queue.remove(queued)
                target = self._device_target or queued.target
                self._start(order_id, "device", target, queued.due, queued.customer, now, out)
            else:
                self._start(order_id, "device", self._device_target, None, None, now, out)
            return
        if order is not None and order.source == "device":
            self._finish_current("order_cleared", now, out)
        self._start_next(now, out)

    def _on_device_target(self, now: float) -> None:
        order = self._order
        if (
            order is not None
            and order.running
            and order.source == "device"
            and self._device_target is not None
        ):
            order.target = self._device_target

    def _finish_current(self, reason: CompletionReason, now: float, out: list[Event]) -> None:
        """Complete the running order with ``reason`` (or drop a completed one) and clear it."""
        self._settle(now)
        order = self._order
        reached = None if order is None or not order.running else self._reached(order)
        if order is not None and reached is not None:
            # The last reading (credited now, with nothing left to agree) met the target.
            self._complete("target_reached", now, out, reached)
        elif order is not None and order.running:
            changed = reason in ("order_changed", "order_cleared")
            self._complete(reason, now, out, "order_changed" if changed else None)
        self._order = None

    def _start(
        self,
        order_id: str,
        source: str,
        target: int | None,
        due: float | None,
        customer: str | None,
        now: float,
        out: list[Event],
    ) -> None:
        # Readings held before the start are pieces of the order before (or of none).
        self._settle(now)
        order = _Order(
            order_id, source, target, due, customer, started_at=now, total_basis=self._total_basis
        )
        order.progress_time = now
        if self._gap_now is not None:
            # First seen right after a gap: the order started somewhere inside it.
            _add_gap(order, self._gap_now)
        if source == "device":
            # A per-order device counter belongs to this order: whatever it shows (also when
            # the gateway starts mid-order) are pieces of this order. Unless it was reset while
            # the previous order id was still shown: the pieces since were counted for that
            # order already, and counting them again here would count them twice.
            for name in self._per_order:
                if name not in self._reset_in_order:
                    c = self._counters[name]
                    self._counters[name] = c._replace(value=0, pending=(), anchor=True, rising=())
        self._reset_in_order.clear()
        order.history.append((now, 0))
        self._order = order
        self._attribution.begin_order(now)
        out.append(
            self._event(
                EventType.ORDER_STARTED,
                now,
                order_id=order_id,
                source=source,
                target=target,
                due=due,
                good=0,
                scrap=0,
                started_at=now,
                **_gap_fields(order),
            )
        )

    def _start_next(self, now: float, out: list[Event]) -> None:
        """Start the next queued platform order if the policy lets the platform decide now."""
        if not self._queue or (self._order is not None and self._order.running):
            return
        policy = self.settings.order_source
        if policy == "device" or (policy == "device_then_platform" and self._device_order_id):
            return
        q = self._queue.pop(0)
        self._start(q.order_id, "platform", q.target, q.due, q.customer, now, out)

    def _complete(
        self,
        reason: CompletionReason,
        now: float,
        out: list[Event],
        rule: CompletionRule | None = None,
    ) -> None:
        order = self._order
        assert order is not None and order.running
        self._attribution.end_order(now)
        if (order.good, order.scrap) != (order.progress_good, order.progress_scrap):
            self._progress(order, now, out)
        order.completed_at = now
        self._recent_orders.append(order.order_id)
        if len(self._recent_orders) > RECENT_ORDERS:
            del self._recent_orders[0]
        out.append(
            self._event(
                EventType.ORDER_COMPLETED,
                now,
                order_id=order.order_id,
                reason=reason,
                rule=rule,
                good=order.good,
                scrap=order.scrap,
                target=order.target,
                started_at=order.started_at,
                completed_at=now,
                duration_s=round(max(0.0, now - order.started_at), 3),
                **self._operators(now),
                **_gap_fields(order),
            )
        )

    def _maybe_progress(self, order: _Order, now: float, out: list[Event]) -> None:
        if (order.good, order.scrap) == (order.progress_good, order.progress_scrap):
            return
        percent = _percent(order.done if order.total_basis else order.good, order.target)
        if (
            not order.progress_sent
            or (
                percent is not None
                and percent - order.progress_percent >= self.settings.progress_step_percent
            )
            or now - order.progress_time >= self.settings.progress_interval
        ):
            self._progress(order, now, out)

    def _progress(self, order: _Order, now: float, out: list[Event]) -> None:
        _prune(order, now, self.settings.rate_window)
        rate = _rate(order, now, self.settings)
        percent = _percent(order.done, order.target)
        order.progress_sent = True
        order.progress_time = now
        order.progress_good, order.progress_scrap = order.good, order.scrap
        order.progress_percent = percent or 0.0
        out.append(
            self._event(
                EventType.ORDER_PROGRESS,
                now,
                order_id=order.order_id,
                good=order.good,
                scrap=order.scrap,
                target=order.target,
                percent=percent,
                rate_per_hour=rate,
                eta=_eta(order, rate, now),
                due=order.due,
                started_at=order.started_at,
                **self._operators(now),
                **_gap_fields(order),
            )
        )

    def _check_risk(self, now: float, out: list[Event]) -> None:
        order = self._order
        if order is None or not order.running or order.due is None:
            return
        _prune(order, now, self.settings.rate_window)
        eta = _eta(order, _rate(order, now, self.settings), now)
        # Without an eta the order is only known to be late once the due time has passed.
        late = eta > order.due if eta is not None else now > order.due
        if late and not order.at_risk:
            order.at_risk = True
            late_by = (eta if eta is not None else now) - order.due
            out.append(
                self._event(
                    EventType.ORDER_AT_RISK,
                    now,
                    order_id=order.order_id,
                    eta=eta,
                    due=order.due,
                    late_by_s=round(late_by, 3),
                    **_gap_fields(order),
                )
            )
        elif order.at_risk and eta is not None and not late:
            order.at_risk = False
            out.append(
                self._event(
                    EventType.ORDER_BACK_ON_TRACK,
                    now,
                    order_id=order.order_id,
                    eta=eta,
                    due=order.due,
                    **_gap_fields(order),
                )
            )

    # ------------------------------------------------------------------ commands

    def _assign(self, cmd: AssignOrder, now: float, out: list[Event]) -> CommandResult:
        if self.settings.order_source == "device":
            return CommandResult(False, "machine takes its orders from the device only")
        try:
            order_id = clean_text(cmd.order_id, "order_id", MAX_ID_LEN)
        except ValueError as exc:
            return CommandResult(False, str(exc))
        if not order_id:
            return CommandResult(False, "order_id must not be empty")
        if isinstance(cmd.target, bool) or not isinstance(cmd.target, int):
            return CommandResult(False, "target must be an integer")
        if not 1 <= cmd.target <= MAX_TARGET:
            return CommandResult(False, f"target must be between 1 and {MAX_TARGET}")
        due = cmd.due
        if due is not None and (
            isinstance(due, bool)
            or not isinstance(due, int | float)
            or not math.isfinite(due)
            or due <= 0
        ):
            return CommandResult(False, "due must be epoch seconds or null")
        if cmd.customer is not None and (
            not isinstance(cmd.customer, str) or len(cmd.customer) > MAX_TEXT_LEN
        ):
            return CommandResult(False, "customer must be a string of at most 256 characters")
        current = self._order
        clash = ""
        if current is not None and current.order_id == order_id and current.running:
            clash = f"order {order_id} is already running"
        elif any(q.order_id == order_id for q in self._queue):
            clash = f"order {order_id} is already queued"
        elif order_id in self._recent_orders:
            clash = f"order {order_id} already ran on this machine"
        elif order_id in self._withdrawn_orders:
            clash = f"order {order_id} was withdrawn from this machine"
        if clash:
            # The order may be another platform's: one neutral answer for every clash.
            return CommandResult(False, ORDER_ID_TAKEN if cmd.private else clash)
        if len(self._queue) >= MAX_QUEUE:
            return CommandResult(False, f"queue full ({MAX_QUEUE} orders)")
        self._queue.append(
            _Queued(order_id, cmd.target, None if due is None else float(due), cmd.customer)
        )
        self._start_next(now, out)
        order = self._order
        if order is not None and order.order_id == order_id and order.running:
            return CommandResult(True, "started")
        # The queue holds other platforms' orders too: a private answer does not count it.
        return CommandResult(
            True, "queued" if cmd.private else f"queued at position {len(self._queue)}"
        )

    def _cancel(self, cmd: CancelOrder, now: float, out: list[Event]) -> CommandResult:
        if self.settings.order_source == "device":
            return CommandResult(False, "machine takes its orders from the device only")
        queued = next((q for q in self._queue if q.order_id == cmd.order_id), None)
        if queued is not None:
            self._queue.remove(queued)
            # The id stays in use, as for an order that ran: freed, another platform could
            # take the same order id on this machine and get events under one it never owned.
            self._withdrawn_orders.append(queued.order_id)
            if len(self._withdrawn_orders) > RECENT_ORDERS:
                del self._withdrawn_orders[0]
            return CommandResult(True, "removed from queue")
        order = self._order
        if order is None or order.order_id != cmd.order_id or not order.running:
            return CommandResult(False, f"unknown order {cmd.order_id!r}")
        if order.source != "platform":
            return CommandResult(False, "order comes from the device: clear it on the machine")
        self._finish_current("cancelled", now, out)
        self._start_next(now, out)
        return CommandResult(True, "cancelled")

    # ------------------------------------------------------------------ helpers

    def _operators(self, now: float) -> dict[str, Any]:
        """``operators`` of the order for its events, absent while no badge was ever read."""
        view = self._attribution.view(now)
        return {} if view is None else {OPERATORS_KEY: view}

    def _event(self, type_: EventType, now: float, **data: Any) -> Event:
        # The data dict in the field order of the type's payload class (gateway/core/events.py;
        # tests/unit/test_event_payloads.py holds the two together): cheaper than building the
        # dataclass for every event, and Event.payload() gives the typed view.
        self._seq += 1
        return Event(self.machine, type_.value, now, self._seq, data)


def _order_to_dict(order: _Order | None) -> dict[str, Any] | None:
    if order is None:
        return None
    # Not dataclasses.asdict: it deep-copies every history point, and this runs with every
    # event (the outbox stores the state with it). Every field but history is immutable.
    d = {name: getattr(order, name) for name in _ORDER_FIELDS}
    d["history"] = [[t, g] for t, g in order.history]
    return d


def _order_from_dict(d: dict[str, Any] | None) -> _Order | None:
    if d is None:
        return None
    fields = dict(d)
    fields["history"] = [(float(t), int(g)) for t, g in fields["history"]]
    order = _Order(**fields)
    if not order.history:
        raise ValueError("order history must not be empty")
    return order


def _opt(value: Any, kind: type[Any]) -> Any:
    if value is None:
        return None
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
