"""Live view of the shop floor (``shopfloor watch``): the reference consumer of the MQTT contract.

It reads only what any platform can read: the retained machine snapshots, the CloudEvents
and the retained gateway status. If the screen needs something these topics do not carry,
the contract is missing it. Platform developers can read this module as an example of a
correct consumer:

- **Late join**: the retained ``.../state`` snapshot of every machine arrives right after
  subscribing, so the table is complete before the first event.
- **At least once**: an event may arrive twice (the gateway re-sends what the broker did
  not acknowledge). Deduplicate by CloudEvents ``id``, remembering a bounded window of ids.
- **Gaps**: ``sequence`` counts per machine from 1 without holes. A jump means events were
  lost (a subscriber queue overflowed, a broker restarted without persistence); a hole filled
  later means an event arrived late. ``sequence`` 1 after a higher one means the gateway
  started numbering afresh.
- **Newest wins**: snapshots and events both carry ``sequence``; anything older than what the
  row already shows updates the counters, never the row.
- **Tolerance**: unknown event types and unknown fields are kept or ignored, malformed
  payloads are counted and shown; nothing a publisher sends can stop the view.

Topics (contract v1)::

    {prefix}/{site}/{area}/{line}/{machine}/event/{type}   CloudEvents JSON, QoS 1
    {prefix}/{site}/{area}/{line}/{machine}/state          retained snapshot JSON
    {prefix}/{site}/gateway/{gateway_id}/status            retained {"status": "online"|...}

:class:`FloorView` is the pure part (bytes in, text out, no clock, no I/O); :func:`watch` and
:func:`snapshot` are the shell that talks to the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TextIO

import aiomqtt
import structlog

from gateway.core.backoff import Backoff

log = structlog.get_logger(__name__)

#: CloudEvents ``type`` values are ``io.shopfloor.<short type>``; topics use the short type.
TYPE_PREFIX = "io.shopfloor."
#: How many event ids are remembered for deduplication (a few minutes of a busy floor).
ID_MEMORY = 10_000
#: How many missing sequence numbers are remembered per machine to recognise late arrivals;
#: a larger jump is still counted, its holes are just not remembered one by one.
MAX_HOLES = 1_000
#: How many recent malformed messages the footer can show.
PROBLEM_MEMORY = 5

CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
_RESET = "\x1b[0m"
#: SGR colours per machine state; only used when the output is a terminal.
STATE_COLOURS: Mapping[str, str] = {
    "running": "\x1b[32m",
    "idle": "\x1b[33m",
    "setup": "\x1b[36m",
    "stopped": "\x1b[33m",
    "fault": "\x1b[1;31m",
    "maintenance": "\x1b[35m",
    "offline": "\x1b[90m",
}


#: Table columns before the progress bar, and how wide each may grow.
COLUMNS = ("MACHINE", "AREA/LINE", "STATE", "ORDER", "GOOD", "SCRAP", "TARGET")
COLUMN_CAPS = (16, 20, 12, 16, 7, 6, 7)
#: Room kept for the last-event column before the progress bar may grow.
LAST_EVENT_MIN = 22


class MalformedError(ValueError):
    """A payload that does not follow the contract (not JSON, wrong field types)."""


# --------------------------------------------------------------------------------------------
# Pure part
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MachineRow:
    """Everything the view knows about one machine, from snapshots and events."""

    site: str
    area: str
    line: str
    machine: str
    gateway_id: str | None = None
    state: str | None = None
    state_since: str | None = None
    connected: bool | None = None
    order_id: str | None = None
    good: float | None = None
    scrap: float | None = None
    target: float | None = None
    percent: float | None = None
    rate_per_hour: float | None = None
    eta: str | None = None
    due: str | None = None
    order_done: bool = False
    at_risk: bool = False
    alarm_code: str | None = None
    alarm_text: str | None = None
    last_event_type: str | None = None
    last_event_time: str | None = None
    #: Highest event ``sequence`` seen for this machine (gap detection).
    last_sequence: int | None = None
    #: Newest ``sequence`` the row's fields reflect (from an event or a snapshot).
    applied_sequence: int | None = None
    #: Sequence numbers skipped by a jump and not seen since (bounded by MAX_HOLES).
    holes: set[int] = field(default_factory=set)
    events: int = 0
    duplicates: int = 0
    gaps: int = 0

    @property
    def key(self) -> str:
        """``site/area/line/machine``: unique on the floor, the sort order of the table."""
        return f"{self.site}/{self.area}/{self.line}/{self.machine}"


@dataclass(slots=True)
class GatewayRow:
    """Retained status of one gateway."""

    site: str
    gateway_id: str
    status: str
    time: str | None = None


@dataclass(slots=True)
class Stats:
    """Counters over the whole stream, shown in the footer."""

    messages: int = 0
    #: Distinct events (after deduplication).
    events: int = 0
    duplicates: int = 0
    #: Jumps in a machine's sequence, and how many numbers they skipped in total.
    gaps: int = 0
    skipped: int = 0
    #: Events that filled an earlier hole (arrived late, not lost).
    late: int = 0
    #: Events below the machine's highest sequence that fill no known hole.
    out_of_order: int = 0
    #: A machine's sequence started again at 1 (the gateway lost its numbering).
    restarts: int = 0
    #: Snapshots older than what the row already showed.
    stale_snapshots: int = 0
    unknown_types: int = 0
    malformed: int = 0
    #: Messages on topics outside the contract (telemetry, commands, anything else).
    ignored: int = 0


class FloorView:
    """The state of the floor as seen through the MQTT contract; feed it messages, render it."""

    def __init__(self, prefix: str = "shopfloor", *, id_memory: int = ID_MEMORY) -> None:
        self.prefix = prefix.strip("/")
        self.machines: dict[str, MachineRow] = {}
        self.gateways: dict[str, GatewayRow] = {}
        self.stats = Stats()
        #: Recent malformed messages as ``topic: reason``, newest last.
        self.problems: deque[str] = deque(maxlen=PROBLEM_MEMORY)
        #: Connection status line set by the shell (``connected to ...``, ``broker unreachable``).
        self.link = "not connected"
        self._ids: deque[str] = deque(maxlen=id_memory)
        self._id_set: set[str] = set()

    # -- queries -------------------------------------------------------------------------------

    def machine(self, name: str) -> MachineRow | None:
        """The first row whose machine name (or full key) is ``name``."""
        if name in self.machines:
            return self.machines[name]
        return next((r for r in self.machines.values() if r.machine == name), None)

    @property
    def missing(self) -> int:
        """Sequence numbers currently missing over all machines (remembered holes only)."""
        return sum(len(r.holes) for r in self.machines.values())

    # -- input ---------------------------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, retained: bool) -> None:
        """Take one MQTT message; malformed ones are counted and remembered, never raised."""
        self.stats.messages += 1
        try:
            self._dispatch(topic, payload, retained)
        except MalformedError as exc:
            self._malformed(topic, str(exc))
        except Exception as exc:  # a bug here must not take the screen down
            log.exception("message could not be applied", topic=topic)
            self._malformed(topic, f"internal error: {exc!r}")

    def _malformed(self, topic: str, reason: str) -> None:
        self.stats.malformed += 1
        self.problems.append(f"{_clean(topic)}: {_clean(reason)}")

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            self.stats.ignored += 1
            return
        parts = topic[len(head) :].split("/")
        if len(parts) == 4 and parts[1] == "gateway" and parts[3] == "status":
            self._on_gateway_status(parts[0], parts[2], payload)
        elif len(parts) == 5 and parts[4] == "state":
            self._on_snapshot(parts[:4], payload)
        elif len(parts) == 6 and parts[4] == "event":
            self._on_event(parts[:4], payload)
        else:
            # Telemetry, downlink commands and future topics are someone else's business.
            self.stats.ignored += 1

    def _row(self, location: list[str]) -> MachineRow:
        site, area, line, machine = location
        key = "/".join(location)
        row = self.machines.get(key)
        if row is None:
            row = self.machines[key] = MachineRow(site, area, line, machine)
        return row

    def _on_gateway_status(self, site: str, gateway_id: str, payload: bytes) -> None:
        key = f"{site}/{gateway_id}"
        if not payload:
            # An empty retained message deletes the retained status: the gateway is gone.
            self.gateways.pop(key, None)
            return
        doc = _json_object(payload)
        status = doc.get("status")
        if not isinstance(status, str):
            raise MalformedError("gateway status needs a string 'status'")
        self.gateways[key] = GatewayRow(site, gateway_id, status, _opt_str(doc, "time"))

    def _on_snapshot(self, location: list[str], payload: bytes) -> None:
        if not payload:
            # Retained state cleared: the machine was taken out of the gateway's config.
            self.machines.pop("/".join(location), None)
            return
        doc = _json_object(payload)
        sequence = _sequence(doc)
        row = self._row(location)
        if (
            sequence is not None
            and row.applied_sequence is not None
            and sequence < row.applied_sequence
        ):
            self.stats.stale_snapshots += 1
            return
        row.gateway_id = _opt_str(doc, "gateway_id") or row.gateway_id
        row.state = _opt_str(doc, "state")
        row.state_since = _opt_str(doc, "state_since")
        connected = doc.get("connected")
        row.connected = connected if isinstance(connected, bool) else None
        order = doc.get("order")
        if isinstance(order, dict):
            _set_order(row, order)
            status = order.get("status")
            row.order_done = status == "completed" or bool(order.get("completed_at"))
            # The snapshot has no at-risk flag; a late joiner infers it from eta and due.
            eta, due = parse_time(row.eta), parse_time(row.due)
            row.at_risk = not row.order_done and eta is not None and due is not None and eta > due
        elif order is None:
            _clear_order(row)
        else:
            raise MalformedError("snapshot 'order' must be an object or null")
        alarm = doc.get("alarm")
        if isinstance(alarm, dict):
            row.alarm_code = _opt_str(alarm, "code")
            row.alarm_text = _opt_str(alarm, "text")
        elif alarm is None:
            row.alarm_code = row.alarm_text = None
        else:
            raise MalformedError("snapshot 'alarm' must be an object or null")
        if sequence is not None:
            row.applied_sequence = max(sequence, row.applied_sequence or 0)

    def _on_event(self, location: list[str], payload: bytes) -> None:
        doc = _json_object(payload)
        event_id = doc.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise MalformedError("event needs a non-empty string 'id'")
        ce_type = doc.get("type")
        if not isinstance(ce_type, str) or not ce_type:
            raise MalformedError("event needs a non-empty string 'type'")
        data = doc.get("data", {})
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MalformedError("event 'data' must be an object")
        sequence = _sequence(doc)
        # Everything validated: only now may the id count as seen, so a malformed first copy
        # does not make a good second copy look like a duplicate.
        row = self._row(location)
        if self._remember(event_id):
            self.stats.duplicates += 1
            row.duplicates += 1
            return
        self.stats.events += 1
        row.events += 1
        short = ce_type.removeprefix(TYPE_PREFIX)
        newest = self._track_sequence(row, sequence, parse_time(_opt_str(doc, "time")))
        if not newest:
            return
        row.last_event_type = short
        row.last_event_time = _opt_str(doc, "time")
        row.gateway_id = _opt_str(doc, "gatewayid") or row.gateway_id
        if sequence is not None:
            row.applied_sequence = sequence
        handler = _EVENT_HANDLERS.get(short)
        if handler is None:
            self.stats.unknown_types += 1
        else:
            handler(row, data, row.last_event_time)

    def _remember(self, event_id: str) -> bool:
        """True if the id was seen before; otherwise remember it (bounded window)."""
        if event_id in self._id_set:
            return True
        if len(self._ids) == self._ids.maxlen:
            self._id_set.discard(self._ids[0])
        self._ids.append(event_id)
        self._id_set.add(event_id)
        return False

    def _track_sequence(self, row: MachineRow, sequence: int | None, at: float | None) -> bool:
        """Update gap bookkeeping; True if the event is newer than what the row shows."""
        if sequence is None:
            return True
        last = row.last_sequence
        if last is None or sequence > last:
            if last is not None and sequence > last + 1:
                skipped = sequence - last - 1
                row.gaps += 1
                self.stats.gaps += 1
                self.stats.skipped += skipped
                room = MAX_HOLES - len(row.holes)
                row.holes.update(range(last + 1, last + 1 + min(skipped, max(room, 0))))
            row.last_sequence = sequence
            return row.applied_sequence is None or sequence >= row.applied_sequence
        if sequence in row.holes:
            row.holes.discard(sequence)
            self.stats.late += 1
            return False
        newest_at = parse_time(row.last_event_time)
        if sequence == 1 and at is not None and newest_at is not None and at > newest_at:
            # Numbering starts at 1 and never repeats: a 1 newer than everything seen means the
            # gateway lost its counter (a very late copy of the old event 1 would be older).
            # Start tracking again rather than flag every later event.
            self.stats.restarts += 1
            row.holes.clear()
            row.last_sequence = 1
            row.applied_sequence = None
            return True
        self.stats.out_of_order += 1
        return False

    # -- output --------------------------------------------------------------------------------

    def _stale(self, row: MachineRow) -> bool:
        """True if the row's gateway announced it is not online: the row is last known data."""
        gateway = self.gateways.get(f"{row.site}/{row.gateway_id}")
        return gateway is not None and gateway.status != "online"

    def render(self, width: int = 100, now: float | None = None, *, color: bool = False) -> str:
        """The floor as a plain-text table plus footer, every line at most ``width`` wide.

        With ``now`` (epoch seconds) times are relative (``eta 12m``, ``3s`` ago); without it
        they are absolute UTC clock times, so the same input always renders the same text.
        """
        width = max(width, 40)
        rows = [self.machines[k] for k in sorted(self.machines)]
        table = [_cells(r, now, self._stale(r)) for r in rows]
        # Text columns are as wide as their widest cell, up to a cap; counts align right.
        widths = [
            min(cap, max([len(title)] + [len(cells.columns[i]) for cells in table]))
            for i, (title, cap) in enumerate(zip(COLUMNS, COLUMN_CAPS, strict=True))
        ]
        eta_w = max([3] + [len(cells.eta) for cells in table])
        fixed = sum(widths) + len(widths) + eta_w + 1 + LAST_EVENT_MIN + 1
        # The progress column gets what is left: "[" + bar + "]" + " 42%" is bar + 7 wide.
        bar_w = max(4, min(20, width - fixed - 7))

        def line_of(columns: tuple[str, ...], bar: str, eta: str, last: str) -> str:
            cells = [
                _pad(c, w, right=i >= 4)
                for i, (c, w) in enumerate(zip(columns, widths, strict=True))
            ]
            return _fit(" ".join([*cells, _pad(bar, bar_w + 7), _pad(eta, eta_w), last]), width)

        lines = [
            _fit(f"Shopfloor live view  prefix {self.prefix}/#  machines {len(rows)}", width),
            line_of(COLUMNS, "PROGRESS", "ETA", "LAST EVENT"),
        ]
        if not rows:
            lines.append(_fit("(no machines yet: waiting for retained state and events)", width))
        for row, cells in zip(rows, table, strict=True):
            line = line_of(cells.columns, _bar(row, bar_w), cells.eta, cells.last)
            colour = STATE_COLOURS.get(row.state or "")
            if color and colour:
                # Colour after fitting so escape codes never count towards the width; the state
                # cell starts after the machine and area/line cells.
                start = widths[0] + widths[1] + 2
                end = start + widths[2]
                if end <= len(line):
                    line = line[:start] + colour + line[start:end] + _RESET + line[end:]
            lines.append(line)
        lines.append("")
        lines.extend(_fit(text, width) for text in self._footer(rows))
        return "\n".join(lines) + "\n"

    def _footer(self, rows: list[MachineRow]) -> list[str]:
        s = self.stats
        if self.gateways:
            gateways = ", ".join(
                f"{_clean(g.gateway_id)} {_clean(g.status)}"
                for _, g in sorted(self.gateways.items())
            )
        else:
            gateways = "none seen"
        missing = self.missing
        counts = (
            f"events {s.events}  duplicates {s.duplicates}  gaps {s.gaps}"
            + (f" ({missing} missing)" if missing else "")
            + f"  malformed {s.malformed}"
        )
        extras = [
            (s.late, "late"),
            (s.out_of_order, "out of order"),
            (s.restarts, "sequence restarts"),
            (s.stale_snapshots, "stale snapshots"),
            (s.unknown_types, "unknown types"),
        ]
        counts += "".join(f"  {label} {n}" for n, label in extras if n)
        footer = [f"gateways: {gateways}", counts, f"broker: {_clean(self.link)}"]
        legend = []
        if any(self._stale(r) for r in rows):
            legend.append("* last known state, gateway not online")
        if any(r.at_risk for r in rows):
            legend.append("! order at risk of missing its due time")
        if legend:
            footer.append("  ".join(legend))
        if self.problems:
            footer.append(f"last malformed: {self.problems[-1]}")
        return footer


# -- event handlers: one per known type, (row, data, event time) -> None -----------------------


def _on_state_changed(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    row.state = _opt_str(data, "state") or row.state
    row.state_since = when
    if "order_id" in data:
        row.order_id = _opt_str(data, "order_id")


def _on_connection_changed(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    connected = data.get("connected")
    if isinstance(connected, bool):
        row.connected = connected


def _on_order_started(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    _clear_order(row)
    row.order_id = _opt_str(data, "order_id")
    row.target = _opt_num(data, "target")
    row.good = row.scrap = row.percent = 0.0 if row.order_id else None


def _on_order_progress(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    if _opt_str(data, "order_id") != row.order_id:
        # Progress of an order whose start we missed (late join): it is now the current one.
        _clear_order(row)
    _set_order(row, data)


def _on_order_completed(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    _set_order(row, data)
    row.order_done = True
    row.at_risk = False
    row.eta = None


def _on_alarm_raised(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    row.alarm_code = _opt_str(data, "code")
    row.alarm_text = _opt_str(data, "text")


def _on_alarm_cleared(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    row.alarm_code = row.alarm_text = None


def _on_at_risk(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    row.at_risk = True
    row.eta = _opt_str(data, "eta") or row.eta
    row.due = _opt_str(data, "due") or row.due


def _on_back_on_track(row: MachineRow, data: Mapping[str, Any], when: str | None) -> None:
    row.at_risk = False
    row.eta = _opt_str(data, "eta") or row.eta


_EVENT_HANDLERS: Mapping[str, Callable[[MachineRow, Mapping[str, Any], str | None], None]] = {
    "machine.state.changed": _on_state_changed,
    "machine.connection.changed": _on_connection_changed,
    "order.started": _on_order_started,
    "order.progress": _on_order_progress,
    "order.completed": _on_order_completed,
    "machine.alarm.raised": _on_alarm_raised,
    "machine.alarm.cleared": _on_alarm_cleared,
    "order.at_risk": _on_at_risk,
    "order.back_on_track": _on_back_on_track,
}


def _set_order(row: MachineRow, order: Mapping[str, Any]) -> None:
    """Copy the order fields present in ``order`` (a snapshot's order or an event's data)."""
    if "order_id" in order:
        new_id = _opt_str(order, "order_id")
        if new_id != row.order_id:
            row.order_done = row.at_risk = False
        row.order_id = new_id
    for name in ("good", "scrap", "target", "percent", "rate_per_hour"):
        if name in order:
            setattr(row, name, _opt_num(order, name))
    for name in ("eta", "due"):
        if name in order:
            setattr(row, name, _opt_str(order, name))


def _clear_order(row: MachineRow) -> None:
    row.order_id = row.eta = row.due = None
    row.good = row.scrap = row.target = row.percent = row.rate_per_hour = None
    row.order_done = row.at_risk = False


# -- payload helpers ---------------------------------------------------------------------------


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedError(f"not JSON: {exc}") from None
    except RecursionError:
        # json.loads recurses per nesting level; thousands of '[' fit in a small message.
        raise MalformedError("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise MalformedError(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _sequence(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("sequence")
    if value is None:
        return None
    # CloudEvents allows extension attributes as strings; accept "42" as well as 42.
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedError("'sequence' must be a non-negative integer")
    return value


def _opt_str(doc: Mapping[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # an order id or alarm code sent as a number is still an id
    return None


def _opt_num(doc: Mapping[str, Any], name: str) -> float | None:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float: not a count a machine produced
        return None
    return number if math.isfinite(number) else None


def parse_time(text: str | None) -> float | None:
    """RFC 3339 text to epoch seconds; ``None`` for missing or unparseable text."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- rendering helpers -------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Replace unprintable characters: a device string must not drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _pad(text: str, width: int, *, right: bool = False) -> str:
    if len(text) > width:
        # A trailing "~" shows the cell was cut.
        text = (text[: width - 1] + "~") if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def _fit(line: str, width: int) -> str:
    return line[:width].rstrip()


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value):
        return str(int(value))
    return f"{value:.1f}"


def _span(seconds: float) -> str:
    """A short duration: ``45s``, ``12m``, ``3h05``, ``2d04``."""
    s = int(abs(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}"


def _clock(epoch: float, *, seconds: bool) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%H:%M:%SZ" if seconds else "%H:%MZ")


class _Cells(NamedTuple):
    """A row's text: the columns of COLUMNS, then ETA and last event."""

    columns: tuple[str, ...]
    eta: str
    last: str


def _cells(row: MachineRow, now: float | None, stale: bool) -> _Cells:
    """Text of every column except the progress bar (which depends on the column width)."""
    state = _clean(row.state or "?") + ("*" if stale else "")
    if row.order_done:
        eta = "done"
    else:
        eta_at = parse_time(row.eta)
        if eta_at is None:
            eta = "-"
        elif now is None:
            eta = _clock(eta_at, seconds=False)
        else:
            eta = _span(eta_at - now)
        if row.at_risk:
            eta += "!"
    last = "-"
    if row.last_event_type:
        last = _clean(row.last_event_type)
        at = parse_time(row.last_event_time)
        if at is not None:
            last += " " + (_clock(at, seconds=True) if now is None else _span(now - at))
    if row.alarm_code or row.alarm_text:
        alarm = " ".join(_clean(p) for p in (row.alarm_code, row.alarm_text) if p)
        last = f"ALARM {alarm} | {last}"
    columns = (
        _clean(row.machine),
        _clean(f"{row.area}/{row.line}"),
        state,
        _clean(row.order_id or "-"),
        _number(row.good),
        _number(row.scrap),
        _number(row.target),
    )
    return _Cells(columns, eta, last)


def _bar(row: MachineRow, bar_w: int) -> str:
    """``[#####-----]  50%``; the percent comes from the contract, else from good/target."""
    percent = row.percent
    if percent is None and row.good is not None and row.target:
        percent = 100.0 * row.good / row.target
    if percent is None:
        return " " * (bar_w + 7)
    filled = round(bar_w * min(max(percent, 0.0), 100.0) / 100.0)
    return "[" + "#" * filled + "-" * (bar_w - filled) + "]" + f"{percent:4.0f}%"


# --------------------------------------------------------------------------------------------
# Shell
# --------------------------------------------------------------------------------------------


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _client(host: str, port: int, username: str | None, password: str | None) -> aiomqtt.Client:
    return aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        # A unique id: two screens on one broker must not kick each other off.
        identifier=f"shopfloor-watch-{uuid.uuid4().hex[:12]}",
        clean_session=True,
        timeout=5.0,
        keepalive=30,
        # Bounded: if the screen ever falls behind, messages are dropped and show up as gaps.
        max_queued_incoming_messages=100_000,
    )


class _Painter:
    """Writes frames: clear+home and colours on a terminal, changed frames only otherwise."""

    def __init__(
        self, view: FloorView, stream: TextIO, color: bool | None, header: str | None = None
    ) -> None:
        self.view = view
        self.header = f"{header.rstrip()}\n\n" if header else ""
        self.stream = stream
        self.tty = _isatty(stream)
        # https://no-color.org: a set, non-empty NO_COLOR turns colours off.
        self.color = (self.tty and not os.environ.get("NO_COLOR")) if color is None else color
        self._last = ""

    def paint(self) -> None:
        if self.tty:
            width = shutil.get_terminal_size(fallback=(100, 24)).columns
            frame = self.view.render(width, time.time(), color=self.color)
            self.stream.write(CLEAR + self.header + frame)
        else:
            # A log file or pipe gets each distinct frame once, with absolute times, so it
            # does not grow by a screenful every refresh.
            frame = self.view.render(100, None, color=self.color)
            if frame == self._last:
                return
            self._last = frame
            self.stream.write(self.header + frame + "\n")
        self.stream.flush()


async def watch(
    host: str,
    port: int,
    prefix: str,
    *,
    refresh: float = 0.5,
    stream: TextIO | None = None,
    until: Callable[[FloorView], bool] | None = None,
    username: str | None = None,
    password: str | None = None,
    backoff: Backoff | None = None,
    color: bool | None = None,
    header: str | None = None,
) -> FloorView:
    """Show the floor live until cancelled or ``until(view)`` is true; return the view.

    Subscribes to ``{prefix}/#``, applies every message to a :class:`FloorView` and repaints
    ``stream`` (default ``sys.stdout``) every ``refresh`` seconds, with ``header`` text above
    the table. When the broker goes away it reconnects with jittered backoff and the footer
    says ``broker unreachable``. ``color=None`` colours states only on a terminal.
    """
    out = stream if stream is not None else sys.stdout
    view = FloorView(prefix)
    painter = _Painter(view, out, color, header)
    done = asyncio.Event()

    def check() -> None:
        if until is not None and until(view):
            done.set()

    async def receive() -> None:
        delays = backoff or Backoff(base=0.5, cap=10.0)
        attempt = 0
        while True:
            try:
                async with _client(host, port, username, password) as client:
                    if attempt:
                        log.info("broker reachable again", host=host, port=port)
                    attempt = 0
                    view.link = f"connected to {host}:{port}"
                    await client.subscribe(f"{view.prefix}/#", qos=1)
                    async for message in client.messages:
                        view.apply(
                            str(message.topic), _payload_bytes(message.payload), message.retain
                        )
                        check()
            except aiomqtt.MqttError as exc:
                delay = delays.delay(attempt)
                # First failure of an episode is worth a warning; the retries are not.
                level = log.warning if attempt == 0 else log.debug
                level("broker unreachable", host=host, port=port, error=str(exc), retry_in=delay)
                view.link = f"broker unreachable at {host}:{port} ({exc}); retrying"
                attempt += 1
                await asyncio.sleep(delay)

    async def repaint() -> None:
        while True:
            painter.paint()
            check()
            await asyncio.sleep(refresh)

    async with asyncio.TaskGroup() as tasks:
        receiver = tasks.create_task(receive(), name="watch[receive]")
        painter_task = tasks.create_task(repaint(), name="watch[paint]")
        await done.wait()
        receiver.cancel()
        painter_task.cancel()
    painter.paint()
    return view


async def snapshot(
    host: str,
    port: int,
    prefix: str,
    *,
    wait: float = 1.0,
    username: str | None = None,
    password: str | None = None,
) -> FloorView:
    """Collect what arrives within ``wait`` seconds of subscribing (the retained state).

    Raises :class:`aiomqtt.MqttError` when the broker cannot be reached: a one-shot command
    should fail rather than retry.
    """
    view = FloorView(prefix)
    async with _client(host, port, username, password) as client:
        view.link = f"connected to {host}:{port}"
        await client.subscribe(f"{view.prefix}/#", qos=1)
        # Retained messages have no end marker: collecting for a fixed time is all MQTT offers.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    view.apply(str(message.topic), _payload_bytes(message.payload), message.retain)
    return view


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


# -- command line ------------------------------------------------------------------------------


def broker_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``HOST`` (port 1883) or ``[V6ADDR]:PORT`` for argparse."""
    host, port = text, "1883"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"bad broker address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad broker address {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdecimal() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"bad broker address {text!r}: want HOST:PORT")
    return host, int(port)


def positive_seconds(text: str) -> float:
    """Parse a positive number of seconds for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``shopfloor watch`` to ``parser``."""
    parser.add_argument(
        "--broker",
        type=broker_address,
        default=("127.0.0.1", 1883),
        metavar="HOST:PORT",
        help="MQTT broker to watch (default 127.0.0.1:1883)",
    )
    parser.add_argument("--prefix", default="shopfloor", help="topic prefix (default shopfloor)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one snapshot of the retained state and exit",
    )
    parser.add_argument(
        "--wait",
        type=positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="with --once: how long to collect retained messages (default 1.0)",
    )
    parser.add_argument(
        "--refresh", type=positive_seconds, default=0.5, metavar="SECONDS", help="repaint interval"
    )
    parser.add_argument(
        "--username",
        default=os.environ.get("SHOPFLOOR_MQTT_USERNAME"),
        help="broker user name; the password comes from $SHOPFLOOR_MQTT_PASSWORD",
    )


async def run(args: argparse.Namespace) -> int:
    """Run ``shopfloor watch``; 0 on success, 2 when ``--once`` cannot reach the broker."""
    host, port = args.broker
    # Never on the command line: it would be visible to every user in `ps`.
    password = os.environ.get("SHOPFLOOR_MQTT_PASSWORD")
    out = sys.stdout
    if args.once:
        try:
            view = await snapshot(
                host, port, args.prefix, wait=args.wait, username=args.username, password=password
            )
        except aiomqtt.MqttError as exc:
            sys.stderr.write(f"shopfloor watch: broker {host}:{port} unreachable: {exc}\n")
            return 2
        tty = _isatty(out)
        width = shutil.get_terminal_size(fallback=(100, 24)).columns if tty else 100
        out.write(view.render(width, time.time(), color=tty and not os.environ.get("NO_COLOR")))
        out.flush()
        return 0
    tty = _isatty(out)
    if tty:
        out.write(HIDE_CURSOR)
    try:
        await watch(
            host,
            port,
            args.prefix,
            refresh=args.refresh,
            stream=out,
            username=args.username,
            password=password,
        )
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()
    return 0
