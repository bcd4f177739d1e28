"""Event types and their typed payloads: what the tracker emits, field by field (pure).

:class:`EventType` names every event; each has one frozen dataclass payload here, the one
source of truth of its fields. The tracker emits :class:`gateway.core.model.Event` with the
JSON-ready ``data`` dict (cheap on the hot path); :meth:`Event.payload` gives the typed view,
and :func:`payload_of` / :meth:`Payload.to_data` convert both ways without loss. Which fields
are times is declared here (``time_field()``), not guessed from key names: the envelope
formats exactly :data:`TIME_FIELDS` of each type as RFC 3339. The contract's pydantic models
(:mod:`gateway.contract.models`) are checked against these classes by one test
(``tests/unit/test_event_payloads.py``).

Adding an event type: a member of :class:`EventType`, a payload class in :data:`PAYLOADS`,
the contract model (the drift test says what is missing), then the tracker emits it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

from gateway.core.vocabulary import OPERATORS_KEY


class EventType(enum.StrEnum):
    """The short contract name of every event (topic segment, CloudEvents ``type`` tail)."""

    MACHINE_STATE_CHANGED = "machine.state.changed"
    MACHINE_CONNECTION_CHANGED = "machine.connection.changed"
    MACHINE_ALARM_RAISED = "machine.alarm.raised"
    MACHINE_ALARM_CLEARED = "machine.alarm.cleared"
    ORDER_STARTED = "order.started"
    ORDER_PROGRESS = "order.progress"
    ORDER_COMPLETED = "order.completed"
    ORDER_AT_RISK = "order.at_risk"
    ORDER_BACK_ON_TRACK = "order.back_on_track"


#: Why the machine state changed.
StateChangeReason = Literal["device", "alarm", "offline"]
#: How bad an alarm is: ``fault`` while the machine is in state fault.
AlarmSeverity = Literal["fault", "warning"]
#: Who started an order.
OrderSourceName = Literal["device", "platform"]
#: Why an order ended.
CompletionReason = Literal[
    "target_reached", "device_ended", "order_changed", "order_cleared", "cancelled", "replaced"
]
#: What may complete an order (``complete_when``); ``order_changed`` is always among them.
CompletionRule = Literal["good_reached", "total_reached", "device_ended", "order_changed"]

_TIME = "time"
_OMIT_NONE = "omit_none"


def time_field() -> Any:
    """A field holding a time (epoch seconds): formatted as RFC 3339 on the wire."""
    return field(metadata={_TIME: True})


P = TypeVar("P", bound="Payload")


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorShare:
    """One operator's part of an order: logged-in seconds and pieces counted meanwhile."""

    operator: str | None
    seconds: float
    good: int
    scrap: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Payload:
    """Base of the typed event payloads; the field order is the wire order."""

    event_type: ClassVar[EventType]

    @classmethod
    def from_data(cls: type[P], data: Mapping[str, Any]) -> P:
        """The typed payload of a JSON-ready ``data`` dict (``ValueError`` if keys differ)."""
        names = _names(cls)
        unknown = set(data) - set(names)
        missing = [n for n in _required(cls) if n not in data]
        if unknown or missing:
            raise ValueError(
                f"{cls.event_type} payload: unknown keys {sorted(unknown)}, missing {missing}"
            )
        values = dict(data)
        shares = values.get(OPERATORS_KEY)
        if shares is not None:
            values[OPERATORS_KEY] = tuple(OperatorShare(**s) for s in shares)
        return cls(**values)

    def to_data(self) -> dict[str, Any]:
        """The JSON-ready dict the tracker emits for this payload, in wire order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get(_OMIT_NONE):
                continue
            if f.name == OPERATORS_KEY and value is not None:
                value = [
                    {"operator": s.operator, "seconds": s.seconds, "good": s.good, "scrap": s.scrap}
                    for s in value
                ]
            out[f.name] = value
        return out


def _names(cls: type[Payload]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _required(cls: type[Payload]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.default is MISSING)


def _operators() -> Any:
    # Absent (not null) while the machine never reported a badge.
    return field(default=None, metadata={_OMIT_NONE: True})


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineStateChanged(Payload):
    """``machine.state.changed``: the machine entered another state."""

    event_type: ClassVar[EventType] = EventType.MACHINE_STATE_CHANGED
    state: str
    previous: str | None
    previous_duration_s: float | None
    unobserved_s: float
    reason: StateChangeReason
    order_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConnectionChanged(Payload):
    """``machine.connection.changed``: the link to the device came up or dropped."""

    event_type: ClassVar[EventType] = EventType.MACHINE_CONNECTION_CHANGED
    connected: bool
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineAlarmRaised(Payload):
    """``machine.alarm.raised``: the device reports an alarm code other than 0."""

    event_type: ClassVar[EventType] = EventType.MACHINE_ALARM_RAISED
    code: int
    text: str
    severity: AlarmSeverity


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineAlarmCleared(Payload):
    """``machine.alarm.cleared``: the active alarm is gone."""

    event_type: ClassVar[EventType] = EventType.MACHINE_ALARM_CLEARED
    code: int
    text: str
    duration_s: float | None
    unobserved_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderStarted(Payload):
    """``order.started``: an order began running on the machine."""

    event_type: ClassVar[EventType] = EventType.ORDER_STARTED
    order_id: str
    source: OrderSourceName
    target: int | None
    due: float | None = time_field()
    good: int
    scrap: int
    started_at: float = time_field()
    gap_free: bool
    unobserved_s: float
    gap_started_at: float | None = time_field()
    gap_ended_at: float | None = time_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderProgress(Payload):
    """``order.progress``: counts moved (by percent step or time interval)."""

    event_type: ClassVar[EventType] = EventType.ORDER_PROGRESS
    order_id: str
    good: int
    scrap: int
    target: int | None
    percent: float | None
    rate_per_hour: float | None
    eta: float | None = time_field()
    due: float | None = time_field()
    started_at: float = time_field()
    operators: tuple[OperatorShare, ...] | None = _operators()
    gap_free: bool
    unobserved_s: float
    gap_started_at: float | None = time_field()
    gap_ended_at: float | None = time_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderCompleted(Payload):
    """``order.completed``: the order stopped running; once per started order."""

    event_type: ClassVar[EventType] = EventType.ORDER_COMPLETED
    order_id: str
    reason: CompletionReason
    rule: CompletionRule | None
    good: int
    scrap: int
    target: int | None
    started_at: float = time_field()
    completed_at: float = time_field()
    duration_s: float
    operators: tuple[OperatorShare, ...] | None = _operators()
    gap_free: bool
    unobserved_s: float
    gap_started_at: float | None = time_field()
    gap_ended_at: float | None = time_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderAtRisk(Payload):
    """``order.at_risk``: the order will probably miss its due time."""

    event_type: ClassVar[EventType] = EventType.ORDER_AT_RISK
    order_id: str
    eta: float | None = time_field()
    due: float = time_field()
    late_by_s: float
    gap_free: bool
    unobserved_s: float
    gap_started_at: float | None = time_field()
    gap_ended_at: float | None = time_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderBackOnTrack(Payload):
    """``order.back_on_track``: an order at risk is expected in time again."""

    event_type: ClassVar[EventType] = EventType.ORDER_BACK_ON_TRACK
    order_id: str
    eta: float = time_field()
    due: float = time_field()
    gap_free: bool
    unobserved_s: float
    gap_started_at: float | None = time_field()
    gap_ended_at: float | None = time_field()


#: Every event type's payload class.
PAYLOADS: Mapping[EventType, type[Payload]] = {
    cls.event_type: cls
    for cls in (
        MachineStateChanged,
        MachineConnectionChanged,
        MachineAlarmRaised,
        MachineAlarmCleared,
        OrderStarted,
        OrderProgress,
        OrderCompleted,
        OrderAtRisk,
        OrderBackOnTrack,
    )
}

#: Per event type (as a plain string too: ``Event.type`` is one), its time fields.
TIME_FIELDS: Mapping[str, frozenset[str]] = {
    str(t): frozenset(f.name for f in fields(cls) if f.metadata.get(_TIME))
    for t, cls in PAYLOADS.items()
}


def payload_of(event_type: str, data: Mapping[str, Any]) -> Payload:
    """The typed payload of an event's ``data`` (``ValueError`` for an unknown type)."""
    try:
        cls = PAYLOADS[EventType(event_type)]
    except ValueError:
        raise ValueError(f"unknown event type {event_type!r}") from None
    return cls.from_data(data)
