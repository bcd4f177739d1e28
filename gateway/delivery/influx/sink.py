"""Optional history sink: telemetry and order/state events as points in InfluxDB (v2 API).

Three layers:

* **Points** (pure): :func:`event_point`, :func:`record_point` (a typed outbox record:
  nothing is parsed) and :func:`telemetry_point` turn domain data into
  :class:`Point` (measurement, tags ``site area line machine``, plus ``order`` on events
  and, with ``order_tag``, on telemetry; fields, time);
  :func:`to_line` renders InfluxDB line protocol.
* **Writer**: anything with ``write(batch) -> None`` that raises on failure
  (:class:`SinkRejected` when the server refuses the data itself, anything else when it is
  worth retrying). :class:`InfluxSink` writes through influxdb-client's v2 write API.
* **Sink**: :class:`HistorySink` makes a writer one implementation of the output interface
  (:class:`gateway.delivery.sink.Sink`); :func:`history_runner` puts it behind the one
  :class:`~gateway.delivery.sink.SinkRunner`, which takes items from a queue (a memory queue
  or an outbox cursor), writes them in batches of ``batch_size`` or every
  ``flush_interval`` seconds, and retries with jittered backoff. An item leaves the queue
  only after the writer accepted it, so an InfluxDB outage loses nothing the queue can
  hold; give it an outbox cursor and it loses nothing at all.

Measurements: ``shopfloor_telemetry`` (one point per device read, a field per signal, the
order as the ``order_id`` field so orders do not multiply its series; a tag with
``order_tag: true``, see docs/scaling.md),
``shopfloor_machine`` (``machine.*`` events) and ``shopfloor_order`` (``order.*`` events),
tagged with ``type`` as well. Numbers are written as floats (InfluxDB refuses a field that
changes type between int and float, and ``percent`` is 50 in one event and 42.5 in the next);
machine states are also written as ``state_code`` (the index in :data:`STATE_CODES`) because
some line-protocol stores (VictoriaMetrics) keep numbers only.

Failures are logged once per episode (``influx.write_failed``) and the recovery once with
the number of failed attempts (``influx.write_recovered``).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog

from gateway.config.influx import InfluxConfig
from gateway.core.model import Event, Location, Quality, Sample
from gateway.core.vocabulary import MachineState
from gateway.delivery.records import Record
from gateway.delivery.sendqueue import MemorySinkQueue, SinkQueue
from gateway.delivery.sink import (
    Accepts,
    Cause,
    RunnerCallbacks,
    RunnerSettings,
    SinkLog,
    SinkRunner,
    describe,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
FieldValue = bool | int | float | str

#: The history sink's name: its outbox position, its label in /metrics, its logs' destination.
SINK_NAME = "influxdb"
MEASUREMENT_TELEMETRY = "shopfloor_telemetry"
MEASUREMENT_MACHINE = "shopfloor_machine"
MEASUREMENT_ORDER = "shopfloor_order"

#: Stable numeric codes for machine states (append only: dashboards depend on them).
STATE_CODES: Mapping[str, int] = {
    s.value: i
    for i, s in enumerate(
        [
            MachineState.OFFLINE,
            MachineState.STOPPED,
            MachineState.IDLE,
            MachineState.SETUP,
            MachineState.RUNNING,
            MachineState.FAULT,
            MachineState.MAINTENANCE,
        ]
    )
}


# ---------------------------------------------------------------------------- config


# ---------------------------------------------------------------------------- points (pure)


@dataclass(frozen=True, slots=True)
class Point:
    """One line-protocol point; ``time`` is epoch seconds."""

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    time: float


def _location_tags(loc: Location, order_id: Any) -> dict[str, str]:
    tags = {"site": loc.site, "area": loc.area, "line": loc.line, "machine": loc.machine}
    if isinstance(order_id, str) and order_id:
        tags["order"] = order_id
    return tags


def field_value(value: Any) -> FieldValue | None:
    """A value as a line-protocol field, or ``None`` when it cannot be one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, str):
        return value
    return None


def _fields(data: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, FieldValue]:
    out: dict[str, FieldValue] = {}
    for key, value in data.items():
        if key in skip:
            continue
        v = field_value(value)
        if v is not None:
            out[key] = v
    state = out.get("state")
    if isinstance(state, str) and state in STATE_CODES:
        out["state_code"] = float(STATE_CODES[state])
    return out


def event_point(event: Event, location: Location) -> Point:
    """An event as a point: ``shopfloor_order`` or ``shopfloor_machine``, tagged by type."""
    measurement = MEASUREMENT_ORDER if event.type.startswith("order.") else MEASUREMENT_MACHINE
    tags = _location_tags(location, event.data.get("order_id"))
    tags["type"] = event.type
    fields = _fields(event.data, skip=frozenset({"order_id"}))
    fields["sequence"] = float(event.sequence)
    if event.type == "machine.connection.changed" and "connected" in event.data:
        # Offline is a state for the history too: graphs show the gap as a state.
        fields.setdefault("state_code", float(STATE_CODES["offline"]))
    return Point(measurement, tags, fields, event.time)


#: The telemetry field that carries the order while it is not a tag (``order_tag: false``).
ORDER_FIELD = "order_id"


def telemetry_point(
    location: Location,
    samples: Sequence[Sample],
    order_id: str | None = None,
    *,
    order_tag: bool = False,
) -> Point | None:
    """One point for one device read: a field per good sample; ``None`` when none is.

    The order is the ``order_id`` string field (the series key stays one per machine and
    signal), or with ``order_tag`` a tag (a new series per order).
    """
    values: dict[str, Any] = {}
    newest = 0.0
    for s in samples:
        if s.quality is Quality.BAD or s.value is None:
            continue
        values[s.signal] = s.value
        newest = max(newest, s.source_time)
    fields = _fields(values)
    if not fields:
        return None
    if not order_tag and order_id and ORDER_FIELD not in fields:
        fields[ORDER_FIELD] = order_id
    tags = _location_tags(location, order_id if order_tag else None)
    return Point(MEASUREMENT_TELEMETRY, tags, fields, newest)


def record_point(record: Record) -> Point:
    """A stored event record as a point: the same point :func:`event_point` makes of it.

    The record is typed (location, times as epoch seconds), so nothing is parsed or guessed.
    """
    return event_point(record.event(), record.location)


def _escape(text: str, chars: str) -> str:
    # Line protocol has no way to write a newline in a key or tag: it would end the line.
    text = text.replace("\\", "\\\\").replace("\n", " ").replace("\r", " ")
    for c in chars:
        text = text.replace(c, "\\" + c)
    return text


#: Escaped names and tag values: the same few hundred strings come back with every poll, and
#: escaping them was a third of :func:`to_line`. Bounded, since order ids as tags are an open
#: set; the stdlib's cache is also safe from the sink's worker threads.
_escape_cached = functools.lru_cache(maxsize=10_000)(_escape)


def to_line(point: Point) -> str:
    """InfluxDB line protocol, millisecond precision; ``ValueError`` for an unwritable point."""
    if not point.measurement:
        raise ValueError("point has no measurement")
    if not math.isfinite(point.time):
        raise ValueError(f"point time is not finite: {point.time!r}")
    escape = _escape_cached
    fields = []
    for key in sorted(point.fields):
        value = point.fields[key]
        if isinstance(value, float) and not math.isfinite(value):
            continue
        fields.append(f"{escape(key, ',= ')}={_field_text(value)}")
    if not fields:
        raise ValueError(f"point {point.measurement} has no fields")
    return f"{_head(point.measurement, point.tags)} {','.join(fields)} {round(point.time * 1000)}"


def _head(measurement: str, tags: Mapping[str, str]) -> str:
    """A line's measurement and tags."""
    escape = _escape_cached
    parts = [escape(measurement, ", ")]
    for key in sorted(tags):
        tag = tags[key]
        if key and tag:  # empty tag values are not allowed; leaving the tag out is the same
            parts.append(f"{escape(key, ',= ')}={escape(tag, ',= ')}")
    return ",".join(parts)


#: In a :class:`TelemetryLine` layout, the place of the ``state_code`` field derived from
#: ``state`` (not a sample of its own), and of the ``order_id`` field.
_STATE_CODE = -1
_ORDER = -2


class TelemetryLine:
    """One machine's telemetry as line protocol, built straight from a poll's samples.

    The same text as ``to_line(telemetry_point(location, samples, order_id))`` with the
    ``skip`` signals left out, for a fraction of the cost, and no point in between. Every
    poll repeats the measurement and tags, the escaped field names and their sorted order,
    so those are worked out once per machine, again only when the order, the location or
    the signals change. One per machine, used on the event loop.
    """

    __slots__ = ("_head", "_key", "_layout", "_names", "_order_tag", "_skip")

    def __init__(self, skip: frozenset[str] = frozenset(), *, order_tag: bool = False) -> None:
        """A line builder that leaves the ``skip`` signals out (e.g. personal data).

        ``order_tag``: the order as a tag (see :func:`telemetry_point`), else a field.
        """
        self._skip = skip
        self._order_tag = order_tag
        self._key: tuple[Location, str | None] | None = None
        self._head = ""
        self._names: list[str] | None = None
        #: (index of the sample in the batch, or _STATE_CODE; escaped name and "="), by name.
        self._layout: list[tuple[int, str]] = []

    def line(
        self, location: Location, samples: Sequence[Sample], order_id: str | None = None
    ) -> str | None:
        """The poll's line; ``None`` when no sample has a value a field can hold."""
        tagged = order_id if self._order_tag else None
        key = (location, tagged)
        if key != self._key:
            self._head = _head(MEASUREMENT_TELEMETRY, _location_tags(location, tagged))
            self._key = key
        names = [s[1] for s in samples]
        if names != self._names:
            if (
                "state_code" in names
                or (not self._order_tag and ORDER_FIELD in names)
                or len(set(names)) != len(names)
            ):
                # A signal of that name or a repeated one: the general path settles it.
                point = telemetry_point(
                    location,
                    [s for s in samples if s[1] not in self._skip],
                    order_id,
                    order_tag=self._order_tag,
                )
                return to_line(point) if point is not None else None
            self._plan(names)
        fields: list[str] = []
        append = fields.append
        newest = 0.0
        state: Any = None
        bad = Quality.BAD
        isfinite = math.isfinite
        order_field = 0
        for index, name in self._layout:
            if index < 0:
                if index == _STATE_CODE:
                    if isinstance(state, str) and state in STATE_CODES:
                        append(f"{name}{float(STATE_CODES[state])!r}")
                elif order_id:
                    append(name + _quoted(order_id))
                    order_field = 1
                continue
            s = samples[index]
            value: Any = s[2]
            if value is None or s[4] is bad:
                continue
            if s[3] > newest:
                newest = s[3]
            # field_value() and _field_text() inlined for the exact types a device gives:
            # calling them per field costs as much as the general path this replaces.
            kind = type(value)
            if kind is int:
                number = float(value)
                if isfinite(number):
                    append(f"{name}{number!r}")
            elif kind is float:
                if isfinite(value):
                    append(f"{name}{value!r}")
            elif kind is str:
                if name == "state=":
                    state = value
                append(name + _quoted(value))
            elif kind is bool:
                append(f"{name}{'true' if value else 'false'}")
            else:
                # Subclasses (an IntEnum, a str enum): as field_value() sees them.
                field = field_value(value)
                if isinstance(field, str) and name == "state=":
                    state = field
                if field is not None:
                    append(f"{name}{_field_text(field)}")
        if len(fields) == order_field or newest == math.inf:
            # A source clock at infinity has no line (the general path's sink refuses it).
            return None
        return f"{self._head} {','.join(fields)} {round(newest * 1000)}"

    def _plan(self, names: list[str]) -> None:
        escape = _escape_cached
        keyed = [(name, i) for i, name in enumerate(names) if name not in self._skip]
        if any(name == "state" for name, _ in keyed):
            keyed.append(("state_code", _STATE_CODE))
        if not self._order_tag:
            keyed.append((ORDER_FIELD, _ORDER))
        keyed.sort()
        # state_code comes after state in sorted order, so state is known when it is due.
        self._layout = [(i, escape(name, ",= ") + "=") for name, i in keyed]
        self._names = names


def _field_text(value: FieldValue) -> str:
    """A field value in line protocol (a float must be finite)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return f"{value}i"
    return _quoted(value)


def _quoted(text: str) -> str:
    """A string field value: quoted, with a newline (which would end the line) as a space."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


# ---------------------------------------------------------------------------- sinks


class SinkRejected(Exception):
    """The server refused the data itself (bad or conflicting points): retrying won't help."""


class Writer(Protocol[T_contra]):
    """Writes a batch somewhere; returns normally only when all of it is stored."""

    def write(self, batch: Sequence[T_contra]) -> None:
        """Store the batch or raise (``SinkRejected`` for data the server refuses)."""
        ...


class InfluxSink:
    """Writes points through the InfluxDB v2 write API (``/api/v2/write``), synchronously."""

    def __init__(self, config: InfluxConfig) -> None:
        """Create the client; nothing is sent until the first write."""
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.config = config
        kwargs: dict[str, Any] = {"verify_ssl": config.verify_tls}
        if config.token is not None:
            kwargs["token"] = config.token.get_secret_value()
        if config.ca_file:
            kwargs["ssl_ca_cert"] = config.ca_file
        self._client = InfluxDBClient(
            url=config.url,
            org=config.org,
            timeout=int(config.timeout * 1000),
            # Retries belong to the runner (backoff, outbox); the client must fail fast.
            retries=False,
            **kwargs,
        )
        self._write = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, batch: Sequence[Point | str]) -> None:
        """Write a batch of points or finished lines (:class:`TelemetryLine`).

        ``SinkRejected`` on HTTP 400/413/422, the HTTP error otherwise.
        """
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        lines = []
        for p in batch:
            if isinstance(p, str):
                lines.append(p)
                continue
            try:
                lines.append(to_line(p))
            except ValueError as exc:
                raise SinkRejected(str(exc)) from None
        try:
            self._write.write(
                bucket=self.config.bucket,
                org=self.config.org,
                record="\n".join(lines),
                # The generated enum class types its members as plain str.
                write_precision=WritePrecision.MS,  # type: ignore[arg-type]
            )
        except ApiException as exc:
            if exc.status in (400, 413, 422):
                raise SinkRejected(f"HTTP {exc.status}: {_body(exc)}") from None
            raise

    def ping(self) -> bool:
        """True when the server answers (``/ping``)."""
        return bool(self._client.ping())

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()  # type: ignore[no-untyped-call]


class RecordSink:
    """Adapts a point sink to outbox records: each event record becomes its point.

    Items that are not records (opaque rows of the outbox) are skipped: the history holds
    events and telemetry, and skipping acknowledges them for this destination.
    """

    def __init__(self, sink: Writer[Point]) -> None:
        """Wrap a point sink."""
        self.sink = sink
        self.skipped = 0

    def write(self, batch: Sequence[Any]) -> None:
        """Make each record's point and write the points."""
        points = []
        for item in batch:
            if isinstance(item, Record):
                points.append(record_point(item))
            else:
                self.skipped += 1
        if points:
            self.sink.write(points)


def _body(exc: Any) -> str:
    body = getattr(exc, "body", None) or getattr(exc, "reason", "") or ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    return text[:200]


# ---------------------------------------------------------------------------- the sink


#: The log event names of the history.
INFLUX_LOG = SinkLog(
    unreachable="influx.write_failed",
    lost="influx.write_failed",
    recovered="influx.write_recovered",
    connected=None,
    overflow="influx.queue_overflow",
    overflow_ended="influx.queue_recovered",
    submit_failed="influx.submit_failed",
    close_unflushed="influx.close_unflushed",
    close_timeout="influx.close_timeout",
    closed=None,
    internal="influx.sink_error",
    rejected="influx.point_rejected",
)

#: What the history takes: events and telemetry (retained state and status are skipped).
HISTORY_ACCEPTS = Accepts(frozenset({"event", "telemetry"}))


class HistorySink(RunnerCallbacks, Generic[T]):
    """A :class:`Writer` (e.g. :class:`InfluxSink`) as a :class:`~gateway.delivery.sink.Sink`.

    Link-less: each batch is one write in a worker thread, bounded by ``write_timeout``; it
    is acknowledged whole once the writer returns. A batch the server refuses for its
    content (:class:`SinkRejected`) is written record by record, and only the records
    refused on their own are dropped (acknowledged and counted as rejected).
    """

    kind = "influxdb"
    accepts = HISTORY_ACCEPTS
    required = False
    linkless = True
    link_errors: tuple[type[Exception], ...] = (Exception,)
    log_names = INFLUX_LOG

    def __init__(self, writer: Writer[T], *, write_timeout: float = 30.0) -> None:
        """Wrap ``writer``; each write may take up to ``write_timeout`` seconds."""
        super().__init__()
        self.writer = writer
        self.write_timeout = write_timeout
        self.delivered = 0
        self._gone = asyncio.Event()

    def classify(self, exc: BaseException) -> Cause:
        """Every failed write is one cause: one warning per outage, the rest at debug."""
        return Cause("write", describe(exc))

    async def open(self) -> None:
        """Nothing to open: every write is its own HTTP request."""

    def check(self) -> None:
        """A link-less sink learns of failures from its writes."""

    async def watch(self) -> None:
        """Never returns (no link to lose); cancelled when the link ends."""
        await self._gone.wait()

    def release(self) -> None:
        """Nothing in flight outlives a write."""

    async def goodbye(self) -> None:
        """Nothing to say goodbye to."""

    def abort(self) -> None:
        """Nothing to drop."""

    async def send(self, batch: Sequence[tuple[int, T]]) -> None:
        """Write the batch; ack it whole, or record by record when the server refuses it."""
        try:
            await self._write([item for _, item in batch])
        except SinkRejected as exc:
            await self._isolate(batch, exc)
            return
        for key, _ in batch:
            self._ack(key)
        self.delivered += len(batch)
        self._progress()

    async def _write(self, items: list[T]) -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                await asyncio.to_thread(self.writer.write, items)
        except TimeoutError:
            raise TimeoutError(f"write took longer than {self.write_timeout} s") from None

    async def _isolate(self, batch: Sequence[tuple[int, T]], exc: SinkRejected) -> None:
        # The server refused the batch for its content. Retrying it whole would block the
        # queue for ever; dropping it whole would lose the good points with the bad one.
        # Write the items one by one and drop only those refused on their own.
        if len(batch) == 1:
            self._reject(batch[0][0], str(exc))
            return
        for key, item in batch:
            try:
                await self._write([item])
            except SinkRejected as single:
                self._reject(key, str(single))
                continue
            # Acknowledge each as decided, so a later transient failure only retries the rest.
            self._ack(key)
            self.delivered += 1
        self._progress()


#: Bytes an item takes beyond its text: the str object, its queue and dict entries.
ITEM_OVERHEAD = 120


def item_bytes(item: object) -> int:
    """Memory an item of a runner's queue takes, roughly: text by its length."""
    if isinstance(item, str | bytes):
        return len(item) + ITEM_OVERHEAD
    return 1000 + ITEM_OVERHEAD


def history_runner(
    writer: Writer[T],
    *,
    name: str = SINK_NAME,
    settings: RunnerSettings | None = None,
    queue: SinkQueue[T] | None = None,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> SinkRunner[T]:
    """The one runner feeding ``writer`` in batches; a memory queue bounded by the settings
    (count and, with ``max_bytes``, bytes) unless ``queue`` is given."""
    s = settings or RunnerSettings()
    if queue is None:
        queue = MemorySinkQueue(
            s.max_queue,
            max_weight=s.max_bytes,
            weigh=item_bytes if s.max_bytes is not None else None,
        )
    sink = HistorySink(writer, write_timeout=s.write_timeout)
    return SinkRunner(sink, queue, name=name, settings=s, clock=clock, rng=rng)


def settings_for(config: InfluxConfig) -> RunnerSettings:
    """The runner settings an ``influxdb:`` section asks for."""
    return RunnerSettings(
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        max_queue=config.max_queue,
        max_bytes=round(config.max_queue_mib * 1024 * 1024),
        write_timeout=config.timeout * 2 + 1,
    )


def runner_for(config: InfluxConfig) -> SinkRunner[Point]:
    """A runner writing to InfluxDB as the config says (the runtime's one-liner)."""
    return history_runner(InfluxSink(config), name=SINK_NAME, settings=settings_for(config))
