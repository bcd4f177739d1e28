"""MQTT contract v1 as pydantic models: the single source of the published schemas.

Every payload the gateway sends or accepts has one model here; ``gateway/schema.py`` turns
them into JSON Schema and AsyncAPI, ``docs/contract.md`` explains them. The encoding itself
lives in ``gateway/envelope.py``; these models describe its output after the time
conversion (every time is an RFC 3339 UTC string with milliseconds).

Strictness differs by direction, on purpose:

- **Outbound** (events, state, status, command responses) forbid unknown fields: a field the
  gateway starts to send without a model change is drift, and the contract tests catch it.
  Consumers are told the opposite: ignore fields you do not know, v1 may add some.
- **Inbound** (downlink commands) forbid unknown fields too: a command is an instruction,
  and silently ignoring a field the platform meant (a misspelt ``due``, a newer option this
  gateway does not know) is worse than a clear rejection.

:func:`decode_command` validates a downlink payload and returns the tracker's command;
:func:`encode_response` builds the answer. Both are pure.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.contract.envelope import EVENT_TYPE_PREFIX, SCHEMA_PREFIX, format_time
from gateway.core.events import (
    AlarmSeverity,
    CompletionReason,
    CompletionRule,
    OrderSourceName,
    StateChangeReason,
)
from gateway.core.tracker import AssignOrder, CancelOrder, CommandResult
from gateway.core.vocabulary import (
    MAX_ID_LEN,
    MAX_OPERATOR_LEN,
    MAX_TARGET,
    MAX_TEXT_LEN,
    MachineState,
)

#: Contract version; part of every ``dataschema`` and schema ``$id``.
CONTRACT_VERSION = 1
#: Largest downlink command payload accepted, in bytes.
MAX_COMMAND_BYTES = 16_384
#: Longest ``command_id`` accepted from a platform.
MAX_COMMAND_ID_LEN = MAX_ID_LEN
#: Suffix of the default response topic: ``{machine_root}/cmd/{command}/response``.
RESPONSE_SUFFIX = "/response"
#: Longest refusal reason built from a bad payload.
_MAX_REASON = 500
#: Downlink command names (the last topic segment of ``.../cmd/{command}``).
COMMANDS = ("assign-order", "cancel-order")

# On the wire: what envelope.format_time produces. [0-9] rather than \d: Python and Rust
# regexes match Unicode digits with \d, JSON Schema (ECMA 262) only ASCII ones.
TIMESTAMP_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
UUID7_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
#: Topic-safe identifier (gateway id, site, area, line, machine), as the config enforces.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Printable text: no C0 control characters and no DEL (the tracker rejects them).
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"

_EXAMPLE_TIME = "2026-11-22T08:15:30.250Z"

#: RFC 3339 UTC time with milliseconds, as the gateway writes it.
Timestamp = Annotated[
    str,
    Field(
        pattern=TIMESTAMP_PATTERN,
        json_schema_extra={"format": "date-time"},
        examples=[_EXAMPLE_TIME],
    ),
]
#: A topic segment naming a machine, line, area, site or gateway.
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN, examples=["sew-07"])]
#: Order id as the tracker accepts it (from a device or a platform).
OrderId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_ID_LEN,
        pattern=_NO_CONTROL_PATTERN,
        examples=["PO-4711"],
    ),
]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]

#: The value sets of event fields are the core's (gateway/core/events.py).
CompletionReasonName = CompletionReason
CompletionRuleName = CompletionRule


class _Outbound(BaseModel):
    """Base of everything the gateway sends: exact shape, unknown fields are drift."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Observed(_Outbound):
    """Fields every order event carries about the periods the gateway did not observe."""

    gap_free: bool = Field(
        description=(
            "True when the gateway observed the order without a gap so far. False when part "
            "of it went unobserved: the device was unreachable or the gateway was down. Its "
            "counts are then still the device's counts, but what happened inside the gap "
            "(when pieces were made, short stops) is unknown."
        )
    )
    unobserved_s: Seconds = Field(
        description=(
            "Seconds of the order's life the gateway did not observe (0 when `gap_free`). "
            "For an order first seen right after a gap it is the whole gap: it started "
            "somewhere inside it."
        ),
        examples=[61.0],
    )
    gap_started_at: Timestamp | None = Field(
        description="Start of the first unobserved period of the order; null when gap free."
    )
    gap_ended_at: Timestamp | None = Field(
        description="End of the last unobserved period of the order; null when gap free."
    )


class _Inbound(BaseModel):
    """Base of downlink commands: strict types, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ------------------------------------------------------------------------------ events


class MachineStateChanged(_Outbound):
    """``machine.state.changed``: the machine entered another state."""

    state: MachineState = Field(description="The new state.", examples=["fault"])
    previous: MachineState | None = Field(
        description="The state before; null for the first state the gateway saw.",
        examples=["running"],
    )
    previous_duration_s: Seconds | None = Field(
        description=(
            "Seconds the previous state was observed; null when there was none. Time the "
            "gateway did not observe (it was down) is not counted in: see `unobserved_s`."
        ),
        examples=[754.5],
    )
    unobserved_s: Seconds = Field(
        description=(
            "Seconds of the previous state the gateway did not observe (0 normally). The "
            "state may have changed at any time inside them."
        ),
        examples=[0.0],
    )
    reason: StateChangeReason = Field(
        description=(
            "Why: `device` (the machine reported it), `alarm` (it went to `fault` while an "
            "alarm is active) or `offline` (the gateway lost the device)."
        ),
        examples=["alarm"],
    )
    order_id: OrderId | None = Field(
        description="The order running at the time of the change, if any."
    )


class MachineConnectionChanged(_Outbound):
    """``machine.connection.changed``: the gateway's link to the device came up or dropped."""

    connected: bool = Field(description="True when the device is reachable again.")
    reason: str = Field(
        description=(
            "Free text for people, not for program logic: `data_received`, or the error "
            "that cut the link."
        ),
        examples=["data_received", "connection refused"],
    )


class MachineAlarmRaised(_Outbound):
    """``machine.alarm.raised``: the device reports an alarm code other than 0."""

    code: int = Field(description="Device-specific alarm code (never 0).", examples=[17])
    text: str = Field(
        max_length=MAX_TEXT_LEN,
        description="Alarm text from the device; empty when it has none.",
        examples=["Thread break"],
    )
    severity: AlarmSeverity = Field(
        description="`fault` when the machine is (or goes) to the `fault` state, else `warning`."
    )


class MachineAlarmCleared(_Outbound):
    """``machine.alarm.cleared``: the active alarm is gone (code back to 0 or replaced)."""

    code: int = Field(description="The alarm code that cleared.", examples=[17])
    text: str = Field(max_length=MAX_TEXT_LEN, description="Its last known text.")
    duration_s: Seconds | None = Field(
        description=(
            "Seconds the alarm was observed active; null when its start is unknown. Time the "
            "gateway did not observe (device unreachable, gateway down) is not counted in."
        ),
        examples=[95.0],
    )
    unobserved_s: Seconds = Field(
        description=(
            "Seconds of the alarm's span the gateway did not observe (0 normally): it may "
            "have cleared at any time inside them, so it lasted at least `duration_s` and at "
            "most `duration_s + unobserved_s`."
        ),
        examples=[0.0],
    )


class OperatorShare(_Outbound):
    """One operator's part of an order: logged-in time and pieces counted meanwhile."""

    operator: (
        Annotated[
            str, Field(min_length=1, max_length=MAX_OPERATOR_LEN, pattern=_NO_CONTROL_PATTERN)
        ]
        | None
    ) = Field(
        description=(
            "The badge as the machine shows it (destinations with `operator: pass`) or its "
            "pseudonym `op-` + 16 hex digits, stable per site secret (`operator: "
            "pseudonymise`); null for time and pieces with nobody logged in."
        ),
        examples=["op-3f2a9c0d4e5b6a71"],
    )
    seconds: Seconds = Field(
        description=(
            "Seconds the operator was logged in while the order ran and the gateway "
            "observed the machine (time the machine or the gateway was unreachable is "
            "nobody's)."
        ),
        examples=[1260.0],
    )
    good: Count = Field(description="Good pieces counted while the operator was logged in.")
    scrap: Count = Field(description="Scrap pieces counted while the operator was logged in.")


_OPERATORS_DESCRIPTION = (
    "Who worked on the order, in order of first appearance; the shares add up to the "
    "order's counts from the first badge read on. Present only for machines that map an "
    "`operator` signal and only at destinations whose operator policy is `pass` or "
    "`pseudonymise`: absent everywhere else."
)
#: The ``operators`` field of order events and the state's order; absent when not allowed.
Operators = Annotated[list[OperatorShare] | None, Field(description=_OPERATORS_DESCRIPTION)]


class OrderStarted(_Observed):
    """``order.started``: an order began running on the machine."""

    order_id: OrderId = Field(description="Order id from the device or the platform.")
    source: OrderSourceName = Field(
        description="`device` (order id read from the machine) or `platform` (assign-order)."
    )
    target: Annotated[int, Field(ge=1, le=MAX_TARGET)] | None = Field(
        description="Target quantity of good pieces; null when unknown.", examples=[200]
    )
    due: Timestamp | None = Field(description="Due time (platform orders only), else null.")
    good: Literal[0] = Field(description="Always 0 at the start.")
    scrap: Literal[0] = Field(description="Always 0 at the start.")
    started_at: Timestamp = Field(description="When the order started (same as event time).")


class OrderProgress(_Observed):
    """``order.progress``: counts moved (emitted by percent step or time interval)."""

    order_id: OrderId = Field(description="The running order.")
    good: Count = Field(description="Good pieces of this order so far; never decreases.")
    scrap: Count = Field(description="Scrap pieces of this order so far; never decreases.")
    target: Annotated[int, Field(ge=1, le=MAX_TARGET)] | None = Field(
        description="Target quantity; null when unknown."
    )
    percent: Annotated[float, Field(ge=0)] | None = Field(
        description=(
            "100 * pieces / target, two decimals, on the target's basis: good pieces, or all "
            "pieces (good + scrap) on a machine that completes on `total_reached`; null "
            "without a target. May exceed 100 when the gateway does not complete orders on "
            "target."
        ),
        examples=[42.5],
    )
    rate_per_hour: Annotated[float, Field(ge=0)] | None = Field(
        description=(
            "Pieces per hour on the target's basis (good, or all pieces) over a sliding "
            "window; null until enough history."
        ),
        examples=[118.2],
    )
    eta: Timestamp | None = Field(
        description="Expected completion at the current rate; null without target or rate."
    )
    due: Timestamp | None = Field(description="Due time (platform orders), else null.")
    started_at: Timestamp = Field(description="When the order started.")
    operators: Operators = None


class OrderCompleted(_Observed):
    """``order.completed``: the order stopped running; sent exactly once per started order."""

    order_id: OrderId = Field(description="The order that completed.")
    reason: CompletionReasonName = Field(
        description=(
            "`target_reached`, `device_ended` (the machine reported its job ended), "
            "`order_changed` (the device switched to another order), `order_cleared` (the "
            "device cleared its order id), `cancelled` (cancel-order) or `replaced` (a device "
            "order took over from a platform order). Treat a reason you do not know as other."
        )
    )
    rule: CompletionRuleName | None = Field(
        description=(
            "The machine's completion rule that fired (its profile's `complete_when`): "
            "`good_reached` (good >= target), `total_reached` (good + scrap >= target, as "
            "OPC 40501 counts runs), `device_ended` or `order_changed` (also for "
            "`order_cleared`); null for `cancelled` and `replaced`."
        ),
        examples=["total_reached"],
    )
    good: Count = Field(description="Final good pieces.")
    scrap: Count = Field(description="Final scrap pieces.")
    target: Annotated[int, Field(ge=1, le=MAX_TARGET)] | None = Field(
        description="Target quantity; null when unknown."
    )
    started_at: Timestamp = Field(description="When the order started.")
    completed_at: Timestamp = Field(description="When it completed (same as event time).")
    duration_s: Seconds = Field(description="completed_at - started_at in seconds.")
    operators: Operators = None


class OrderAtRisk(_Observed):
    """``order.at_risk``: the order will probably miss its due time (sent once per episode)."""

    order_id: OrderId = Field(description="The running order.")
    eta: Timestamp | None = Field(
        description="Expected completion; null when unknown (then the due time has passed)."
    )
    due: Timestamp = Field(description="The due time the order will miss.")
    late_by_s: float = Field(
        description="Seconds the order is expected to be late (eta - due, or now - due).",
        examples=[1830.0],
    )


class OrderBackOnTrack(_Observed):
    """``order.back_on_track``: an order at risk is expected in time again."""

    order_id: OrderId = Field(description="The running order.")
    eta: Timestamp = Field(description="Expected completion, at or before the due time.")
    due: Timestamp = Field(description="The due time.")


#: Short event type (topic segment, ``type`` without ``io.shopfloor.``) to its data model.
EVENT_TYPES: dict[str, type[BaseModel]] = {
    "machine.state.changed": MachineStateChanged,
    "machine.connection.changed": MachineConnectionChanged,
    "machine.alarm.raised": MachineAlarmRaised,
    "machine.alarm.cleared": MachineAlarmCleared,
    "order.started": OrderStarted,
    "order.progress": OrderProgress,
    "order.completed": OrderCompleted,
    "order.at_risk": OrderAtRisk,
    "order.back_on_track": OrderBackOnTrack,
}


class EventEnvelope(_Outbound):
    """CloudEvents 1.0 structured-mode envelope of every event (``.../event/{type}``)."""

    specversion: Literal["1.0"] = Field(description="CloudEvents version.")
    id: str = Field(
        pattern=UUID7_PATTERN,
        description=(
            "Unique event id, a UUIDv7 (RFC 9562) that sorts by creation time. Delivery is at "
            "least once: deduplicate by this id."
        ),
        examples=["019ab1c2-3d4e-7f80-9a1b-2c3d4e5f6a7b"],
    )
    source: str = Field(
        pattern=r"^/shopfloor/[^/]+/[^/]+/[^/]+/[^/]+$",
        description="`/shopfloor/{site}/{area}/{line}/{machine}`: the machine's location path.",
        examples=["/shopfloor/plant1/sewing/line-2/sew-07"],
    )
    type: str = Field(
        pattern=r"^io\.shopfloor\.[a-z][a-z_]*(\.[a-z][a-z_]*)+$",
        description=(
            "`io.shopfloor.` + the short event type (the last topic segment). Ignore types "
            "you do not know: v1 may add some."
        ),
        examples=["io.shopfloor.order.progress"],
    )
    time: Timestamp = Field(description="When the event happened (gateway clock, UTC).")
    subject: str = Field(
        pattern=IDENTIFIER_PATTERN,
        description="The machine id (last segment of `source`).",
        examples=["sew-07"],
    )
    datacontenttype: Literal["application/json"] = Field(description="Always JSON.")
    dataschema: str = Field(
        pattern=r"^urn:shopfloor:schema:v1:[a-z][a-z_.]*$",
        description="URN of the JSON Schema of `data`: `urn:shopfloor:schema:v1:{short type}`.",
        examples=["urn:shopfloor:schema:v1:order.progress"],
    )
    sequence: int = Field(
        ge=1,
        description=(
            "Per-machine counter from 1, +1 per event, never reused while the gateway keeps "
            "its state. A jump means lost events; 1 after a higher number means the gateway "
            "started with fresh state. A JSON integer (not the string form of the CloudEvents "
            "sequence extension)."
        ),
        examples=[42],
    )
    gatewayid: str = Field(
        pattern=IDENTIFIER_PATTERN,
        description="Id of the gateway that produced the event.",
        examples=["gw-01"],
    )
    epoch: int | None = Field(
        default=None,
        ge=1,
        description=(
            "The gateway's sequence space. It changes (to a larger number: the Unix time in "
            "milliseconds when the new space began) whenever `sequence` may have been reset: "
            "the gateway started with a new, emptied or damaged-and-replaced outbox, or lost a "
            "machine's state. A consumer that tracks `sequence` starts afresh for every "
            "machine of this `gatewayid` when `epoch` changes. Absent from gateways before it "
            "existed."
        ),
        examples=[1796567886123],
    )
    delayed: bool | None = Field(
        default=None,
        description=(
            "`true` on an event sent late from the gateway's durable outbox (after a broker "
            "outage or a gateway restart), so live views can tell history from news. `time` and "
            "`id` are the original ones. Absent on live events."
        ),
    )
    data: dict[str, Any] = Field(
        description="Event payload; its schema is named by `dataschema` (one per type)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> EventEnvelope:
        short = self.type.removeprefix(EVENT_TYPE_PREFIX)
        if self.dataschema != SCHEMA_PREFIX + short:
            raise ValueError(f"dataschema {self.dataschema!r} does not match type {self.type!r}")
        if self.source.rsplit("/", 1)[-1] != self.subject:
            raise ValueError(f"subject {self.subject!r} is not the machine of {self.source!r}")
        return self


# ------------------------------------------------------------------------------ retained


class Location(_Outbound):
    """ISA-95 location path of a machine; each part is one topic segment."""

    site: Identifier = Field(examples=["plant1"])
    area: Identifier = Field(examples=["sewing"])
    line: Identifier = Field(examples=["line-2"])
    machine: Identifier = Field(examples=["sew-07"])


class OrderView(_Outbound):
    """The current (or just completed) order of a machine in its state snapshot."""

    order_id: OrderId = Field(description="Order id.")
    source: OrderSourceName = Field(description="`device` or `platform`.")
    status: Literal["running", "completed"] = Field(
        description=(
            "`completed` after the target was reached while the device still shows the "
            "order; extra good pieces then count as `overrun`."
        )
    )
    good: Count = Field(description="Good pieces.")
    scrap: Count = Field(description="Scrap pieces.")
    target: Annotated[int, Field(ge=1, le=MAX_TARGET)] | None = Field(
        description="Target quantity; null when unknown."
    )
    percent: Annotated[float, Field(ge=0)] | None = Field(
        description="100 * good / target; null without target."
    )
    rate_per_hour: Annotated[float, Field(ge=0)] | None = Field(
        description="Good pieces per hour over the sliding window; null when not running."
    )
    eta: Timestamp | None = Field(description="Expected completion; null when unknown.")
    due: Timestamp | None = Field(description="Due time (platform orders), else null.")
    started_at: Timestamp = Field(description="When the order started.")
    completed_at: Timestamp | None = Field(description="When it completed; null while running.")
    overrun: Count = Field(description="Good pieces counted after the order completed.")
    operators: Operators = None


class Alarm(_Outbound):
    """The active alarm of a machine."""

    code: int = Field(description="Device-specific alarm code (never 0).")
    text: str = Field(max_length=MAX_TEXT_LEN, description="Alarm text, may be empty.")


class MachineSnapshot(_Outbound):
    """Retained ``.../state`` of a machine: everything a late joiner needs, QoS 1."""

    schema_: Literal["urn:shopfloor:schema:v1:state"] = Field(
        alias="schema", description="Schema URN of this payload."
    )
    time: Timestamp = Field(description="When the gateway published this snapshot.")
    gateway_id: str = Field(pattern=IDENTIFIER_PATTERN, description="Publishing gateway.")
    location: Location = Field(description="Where the machine is.")
    machine: Identifier = Field(description="Machine id.")
    state: MachineState | None = Field(description="Current state; null before the first one.")
    state_since: Timestamp | None = Field(description="Since when the state holds.")
    connected: bool = Field(description="Whether the gateway currently reaches the device.")
    order: OrderView | None = Field(description="Current or just completed order, or null.")
    queued: Count = Field(
        description="Platform orders waiting on this machine (ids are not shown)."
    )
    alarm: Alarm | None = Field(description="The active alarm, or null.")
    sequence: Count = Field(
        description=(
            "Sequence of the last event of this machine included in the snapshot (0 before "
            "any): events with a higher sequence are newer than this snapshot."
        )
    )
    updated_at: Timestamp | None = Field(
        description="When the gateway last heard from or about the machine."
    )


class GatewayStatus(_Outbound):
    """Retained ``{prefix}/{site}/gateway/{gateway_id}/status``, also the MQTT last will."""

    schema_: Literal["urn:shopfloor:schema:v1:status"] = Field(
        alias="schema", description="Schema URN of this payload."
    )
    status: Literal["online", "offline"] = Field(description="Gateway availability.")
    gateway_id: str = Field(pattern=IDENTIFIER_PATTERN, description="The gateway.")
    version: str = Field(description="Gateway software version.")
    started_at: Timestamp = Field(description="When the gateway process started.")
    time: Timestamp = Field(
        description=(
            "When the message was made. For the last will that is the connect time, not the "
            "time of the disconnect: read `reason`."
        )
    )
    reason: str | None = Field(
        default=None,
        description=(
            "Why offline: `shutdown` (clean stop) or `connection lost` (last will). Absent "
            "when online."
        ),
        examples=["connection lost"],
    )
    backlog: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Events stored in the gateway's durable outbox and not yet acknowledged by this "
            "broker. Refreshed while online when it changes (at most every 10 s); absent in "
            "the first online message and the last will."
        ),
        examples=[0],
    )
    uptime_s: float | None = Field(
        default=None, ge=0, description="Seconds since the gateway process started."
    )
    devices_online: int | None = Field(
        default=None, ge=0, description="Machines answering right now."
    )
    devices_total: int | None = Field(default=None, ge=0, description="Machines configured.")


# ------------------------------------------------------------------------------ commands


class AssignOrderCommand(_Inbound):
    """Downlink ``.../cmd/assign-order``: run an order on this machine (queued if busy)."""

    order_id: OrderId = Field(description="Order id, unique per machine (1-128 characters).")
    target: int = Field(ge=1, le=MAX_TARGET, description="Good pieces to make.", examples=[200])
    due: AwareDatetime | None = Field(
        default=None,
        description=(
            "Due time, RFC 3339 with offset; drives `order.at_risk`. A due time already "
            "past is accepted (a late order is still made) and the answer's reason says so."
        ),
        examples=["2036-11-22T14:00:00Z"],
    )
    customer: str | None = Field(
        default=None,
        max_length=MAX_TEXT_LEN,
        description="Free text kept inside the gateway; never published.",
        examples=["ACME GmbH"],
    )
    command_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_COMMAND_ID_LEN,
        # Echoed in answers and logs: no control characters (a newline forges log lines).
        pattern=_NO_CONTROL_PATTERN,
        description=(
            "Makes the command idempotent: a redelivered command with the same id gets the "
            "first answer again and changes nothing. Echoed in the response. No control "
            "characters."
        ),
        examples=["c-0001"],
    )

    def to_tracker(self) -> AssignOrder:
        """The tracker's command for this payload (``due`` as epoch seconds)."""
        return AssignOrder(
            order_id=self.order_id,
            target=self.target,
            due=None if self.due is None else self.due.timestamp(),
            customer=self.customer,
            command_id=self.command_id or "",
        )


class CancelOrderCommand(_Inbound):
    """Downlink ``.../cmd/cancel-order``: drop a queued order or stop a running platform order."""

    order_id: OrderId = Field(description="The order to cancel.")
    command_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_COMMAND_ID_LEN,
        pattern=_NO_CONTROL_PATTERN,
        description="As for assign-order: makes the command idempotent, echoed in the response.",
        examples=["c-0002"],
    )

    def to_tracker(self) -> CancelOrder:
        """The tracker's command for this payload."""
        return CancelOrder(order_id=self.order_id, command_id=self.command_id or "")


class CommandResponse(_Outbound):
    """Answer to a downlink command, on the MQTT 5 response topic or ``.../response``."""

    schema_: Literal["urn:shopfloor:schema:v1:command-response"] = Field(
        alias="schema", description="Schema URN of this payload."
    )
    command_id: str | None = Field(
        max_length=MAX_COMMAND_ID_LEN,
        description="The command's `command_id`, null when it had none (or was unreadable).",
    )
    command: str = Field(
        description="Command name from the topic (`assign-order`, `cancel-order`).",
        examples=["assign-order"],
    )
    machine: Identifier = Field(description="Machine the command was sent to.")
    order_id: str | None = Field(
        max_length=MAX_ID_LEN,
        description="The command's `order_id`, null when it was missing or unreadable.",
    )
    accepted: bool = Field(description="Whether the gateway applied the command.")
    reason: str = Field(
        description=(
            "For people: `started`, `queued at position 2`, `removed from queue`, "
            "`cancelled`, or why it was refused. A repeated `command_id` gets the first "
            "answer prefixed `duplicate command: `."
        ),
        examples=["queued at position 2"],
    )
    time: Timestamp = Field(description="When the gateway handled the command.")


#: Every named payload schema: name (last part of its ``$id`` URN) to model.
PAYLOADS: dict[str, type[BaseModel]] = {
    "envelope": EventEnvelope,
    **EVENT_TYPES,
    "state": MachineSnapshot,
    "status": GatewayStatus,
    "assign-order": AssignOrderCommand,
    "cancel-order": CancelOrderCommand,
    "command-response": CommandResponse,
}

_COMMAND_MODELS: dict[str, type[AssignOrderCommand] | type[CancelOrderCommand]] = {
    "assign-order": AssignOrderCommand,
    "cancel-order": CancelOrderCommand,
}


def schema_id(name: str) -> str:
    """The ``$id`` (and ``dataschema``) URN of a named payload schema."""
    return f"urn:shopfloor:schema:v{CONTRACT_VERSION}:{name}"


def response_topic(command_topic: str) -> str:
    """Default topic for the answer to a command topic (when no MQTT 5 response topic)."""
    return command_topic + RESPONSE_SUFFIX


class CommandError(ValueError):
    """A downlink command payload that cannot be applied; carries what could be read."""

    def __init__(
        self, message: str, *, command_id: str | None = None, order_id: str | None = None
    ) -> None:
        """Error ``message`` plus the ``command_id`` / ``order_id`` found, for the answer."""
        super().__init__(message)
        self.command_id = command_id
        self.order_id = order_id


def _loose_text(doc: object, key: str, max_len: int) -> str | None:
    value = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(value, str) and 0 < len(value) <= max_len and value.isprintable():
        return value
    return None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    text = "; ".join(parts)
    # Field names come from the sender: keep an answer to a junk payload small.
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def decode_command(name: str, payload: bytes) -> AssignOrder | CancelOrder:
    """Validate a downlink payload for command ``name``; raise :class:`CommandError` if bad."""
    model = _COMMAND_MODELS.get(name)
    if model is None:
        raise CommandError(f"unknown command {name[:64]!r}; known: {', '.join(COMMANDS)}")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        doc = json.loads(payload)
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"payload is not JSON: {exc.msg} at char {exc.pos}") from None
    except RecursionError:
        # json.loads recurses per nesting level; thousands of '[' fit in 16 KiB.
        raise CommandError("payload is nested too deeply") from None
    command_id = _loose_text(doc, "command_id", MAX_COMMAND_ID_LEN)
    order_id = _loose_text(doc, "order_id", MAX_ID_LEN)
    if not isinstance(doc, dict):
        raise CommandError(f"payload must be a JSON object, got {type(doc).__name__}")
    try:
        # JSON mode: strict types, yet RFC 3339 strings are accepted for datetimes.
        command = model.model_validate_json(payload)
    except ValidationError as exc:
        raise CommandError(_describe(exc), command_id=command_id, order_id=order_id) from None
    return command.to_tracker()


def encode_response(
    result: CommandResult,
    *,
    command: str,
    machine: str,
    command_id: str | None,
    order_id: str | None,
    now: float,
) -> bytes:
    """JSON answer to a command (:class:`CommandResponse`), compact UTF-8 like all payloads."""
    body = {
        "schema": schema_id("command-response"),
        "command_id": command_id or None,
        "command": command,
        "machine": machine,
        "order_id": order_id,
        "accepted": result.accepted,
        "reason": result.reason,
        "time": format_time(now),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_response(error: CommandError, *, command: str, machine: str, now: float) -> bytes:
    """Answer for a command payload that could not be decoded (never accepted)."""
    return encode_response(
        CommandResult(False, str(error)),
        command=command,
        machine=machine,
        command_id=error.command_id,
        order_id=error.order_id,
        now=now,
    )


def event_data_model(event_type: str) -> type[BaseModel] | None:
    """Data model of a short or full (``io.shopfloor.``) event type; None when unknown."""
    return EVENT_TYPES.get(event_type.removeprefix(EVENT_TYPE_PREFIX))


def parse_event(payload: bytes | str) -> tuple[EventEnvelope, BaseModel | None]:
    """Validate an event payload strictly (envelope and known data); ``ValueError`` if not."""
    try:
        envelope = EventEnvelope.model_validate_json(payload)
        model = event_data_model(envelope.type)
        # Through JSON again so the strict JSON-mode rules apply (enums from strings).
        data = None if model is None else model.model_validate_json(json.dumps(envelope.data))
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None
    return envelope, data
