"""MQTT contract v1: topic names and payload encoding (pure: no clock, no I/O).

Topics follow the ISA-95 location path of each machine::

    {prefix}/{site}/{area}/{line}/{machine}/event/{type}    CloudEvents JSON, QoS 1, not retained
    {prefix}/{site}/{area}/{line}/{machine}/state           retained snapshot, QoS 1
    {prefix}/{site}/{area}/{line}/{machine}/telemetry       sampled raw values, QoS 0
    {prefix}/{site}/{area}/{line}/{machine}/cmd/{command}   downlink from the platform
    {prefix}/{site}/gateway/{gateway_id}/status             retained, QoS 1, last will

Segments are validated where the config is loaded; this module only joins them.

Events use CloudEvents 1.0 in structured mode with two extension attributes:
``sequence`` (per machine, from 1, a consumer sees gaps and duplicates),
``gatewayid`` and ``epoch`` (the sequence space: a new epoch means sequences may have
been reset, e.g. after a damaged outbox file was replaced). Delivery is at least once:
consumers deduplicate by ``id``, a UUIDv7 (RFC 9562) whose text sorts by creation time.

Time rule for payloads: the tracker hands over times as float epoch seconds. On the
wire every time is an RFC 3339 UTC string with milliseconds (``2026-11-22T10:00:00.123Z``).
Inside ``data`` (events), the state snapshot and status ``extra`` fields, a value is
converted when its key ends in ``_at`` or ``_since`` or is exactly ``eta`` or ``due`` and
the value is a number (``int`` or ``float``, not ``bool``). The rule applies at every nesting depth
(mappings inside mappings and lists); other values pass through unchanged, ``None``
stays ``null``. Non-finite numbers are rejected, since JSON cannot carry them.

JSON is compact (no spaces) and UTF-8; NaN and infinity raise ``ValueError``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring
from typing import Any, Literal

from gateway.core.events import TIME_FIELDS
from gateway.core.model import Event, Location

#: CloudEvents ``type`` prefix; the topic carries the short name (``order.started``).
EVENT_TYPE_PREFIX = "io.shopfloor."
#: URN prefix of the JSON Schema of each payload (``{prefix}{event type}``).
SCHEMA_PREFIX = "urn:shopfloor:schema:v1:"
STATE_SCHEMA = SCHEMA_PREFIX + "state"
STATUS_SCHEMA = SCHEMA_PREFIX + "status"
#: CloudEvents ``source`` prefix, followed by the location path.
SOURCE_PREFIX = "/shopfloor"

#: QoS and retain flag per topic kind (contract v1).
EVENT_QOS = 1
STATE_QOS = 1
TELEMETRY_QOS = 0
STATUS_QOS = 1

_TIME_KEYS = frozenset({"eta", "due"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# 48 bits of Unix milliseconds in a UUIDv7 last until the year 10889.
_MAX_UUID_MS = (1 << 48) - 1
_REQUIRED_EVENT_FIELDS = ("id", "source", "type", "time")


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one gateway under one prefix and site."""

    prefix: str
    site: str
    gateway_id: str

    def machine_root(self, loc: Location) -> str:
        """Topic path of a machine, the parent of all its topics."""
        return f"{self.prefix}/{loc.site}/{loc.area}/{loc.line}/{loc.machine}"

    def event(self, loc: Location, type: str) -> str:
        """Topic of one event type (short name, ``order.started``) of a machine."""
        return f"{self.machine_root(loc)}/event/{type}"

    def state(self, loc: Location) -> str:
        """Retained state snapshot topic of a machine."""
        return f"{self.machine_root(loc)}/state"

    def telemetry(self, loc: Location) -> str:
        """Telemetry topic of a machine."""
        return f"{self.machine_root(loc)}/telemetry"

    def command(self, loc: Location, name: str) -> str:
        """Downlink command topic of a machine (``assign-order``, ``cancel-order``)."""
        return f"{self.machine_root(loc)}/cmd/{name}"

    def status(self) -> str:
        """Retained online/offline status topic of this gateway (also its last will)."""
        return f"{self.prefix}/{self.site}/gateway/{self.gateway_id}/status"

    def all_events_filter(self) -> str:
        """Subscription filter for every event of every machine of the site."""
        return f"{self.prefix}/{self.site}/+/+/+/event/+"

    def all_states_filter(self) -> str:
        """Subscription filter for every machine state snapshot of the site."""
        return f"{self.prefix}/{self.site}/+/+/+/state"

    def all_commands_filter(self) -> str:
        """Subscription filter for every downlink command of the site."""
        return f"{self.prefix}/{self.site}/+/+/+/cmd/+"

    def all_status_filter(self) -> str:
        """Subscription filter for the status of every gateway of the site."""
        return f"{self.prefix}/{self.site}/gateway/+/status"

    def site_filter(self) -> str:
        """Subscription filter for everything under the site."""
        return f"{self.prefix}/{self.site}/#"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A machine topic taken apart: location, kind and the trailing name if any."""

    location: Location
    kind: Literal["event", "state", "telemetry", "cmd"]
    name: str | None = None


def parse_machine_topic(prefix: str, topic: str) -> ParsedTopic | None:
    """Split a machine topic under ``prefix``; ``None`` when it is not one of the contract."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) < 5 or any(not p for p in parts):
        return None
    loc = Location(*parts[:4])
    rest = parts[4:]
    match rest:
        case ["state"]:
            return ParsedTopic(loc, "state")
        case ["telemetry"]:
            return ParsedTopic(loc, "telemetry")
        case ["event", name]:
            return ParsedTopic(loc, "event", name)
        case ["cmd", name]:
            return ParsedTopic(loc, "cmd", name)
    return None


def new_event_id(now: float, rand: int) -> str:
    """A UUIDv7 (RFC 9562) for an event created at ``now`` (epoch seconds).

    Layout: 48 bits Unix milliseconds, version 7, 12 bits of sub-millisecond time
    (RFC 9562 section 6.2, method 3, so ids from one gateway sort by creation time to
    about a quarter microsecond), variant ``10``, then the low 62 bits of ``rand``.
    """
    if not math.isfinite(now) or now < 0:
        raise ValueError(f"event id time must be a finite epoch time >= 0, got {now!r}")
    if rand < 0:
        raise ValueError("event id randomness must be a non-negative integer")
    # One multiplication then floor: monotonic in ``now``, so ids never sort backwards.
    ticks = math.floor(now * 4_096_000.0)
    ms, sub_ms = divmod(ticks, 4096)
    if ms > _MAX_UUID_MS:
        raise ValueError(f"event id time {now!r} is beyond the UUIDv7 range")
    rand_b = rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (sub_ms << 64) | (0b10 << 62) | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_time(t: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds (``2026-11-22T10:00:00.123Z``)."""
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError(f"time must be finite epoch seconds, got {t!r}")
    # Round through integer milliseconds: float seconds such as ...0.123 are often
    # ...0.12299999 in binary, and truncating would print .122.
    try:
        # A finite float can still overflow once in milliseconds (1e306 s).
        seconds, ms = divmod(round(t * 1000), 1000)
        prefix = _second_prefix(seconds)
    except OverflowError as exc:
        raise ValueError(f"time {t!r} is out of range") from exc
    return f"{prefix}{ms:03d}Z"


@functools.lru_cache(maxsize=1024)
def _second_prefix(seconds: int) -> str:
    """``2026-11-22T10:00:00.`` for whole epoch seconds (cached: every event and state
    message formats a few times, most of them in the current second)."""
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.")


def _is_time_key(key: object) -> bool:
    return isinstance(key, str) and (key.endswith(("_at", "_since")) or key in _TIME_KEYS)


def convert_times(value: Any, *, _path: str = "") -> Any:
    """Apply the module's time rule to a JSON-ready value, returning a new value."""
    try:
        return _convert(value)
    except _Unconvertible:
        # Rare: walk again, this time keeping the path, for a message that says where.
        return _convert_explained(value, _path)


class _Unconvertible(Exception):
    """A key or time value :func:`_convert` cannot take (the slow walk explains it)."""


def _convert(value: Any) -> Any:
    # The fast walk of convert_times (every event and state message goes through it): no
    # paths, and exact type checks first, since an ABC isinstance (Mapping) per value costs
    # more than the rest of the walk. Subclasses still take the isinstance branches.
    t = type(value)
    if t is dict or (t is not list and t is not tuple and isinstance(value, Mapping)):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _Unconvertible
            tv = type(v)
            if tv is str or v is None or tv is bool:
                out[k] = v
            elif k.endswith(("_at", "_since")) or k in _TIME_KEYS:
                if tv is float or tv is int or (isinstance(v, int | float) and tv is not bool):
                    try:
                        out[k] = format_time(v)
                    except ValueError:
                        raise _Unconvertible from None
                elif tv is dict or tv is list or isinstance(v, Mapping | tuple | list):
                    out[k] = _convert(v)
                else:
                    out[k] = v
            elif tv is int or tv is float:
                out[k] = v
            elif tv is dict or tv is list or isinstance(v, Mapping | tuple | list):
                out[k] = _convert(v)
            else:
                out[k] = v
        return out
    if t is list or t is tuple or isinstance(value, list | tuple):
        return [_convert(v) for v in value]
    return value


def _convert_explained(value: Any, _path: str) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"payload key {_path}{k!r} is not a string")
            path = f"{_path}{k}"
            if _is_time_key(k) and isinstance(v, int | float) and not isinstance(v, bool):
                try:
                    out[k] = format_time(v)
                except ValueError as exc:
                    raise ValueError(f"payload field {path}: {exc}") from None
            else:
                out[k] = _convert_explained(v, path + ".")
        return out
    if isinstance(value, list | tuple):
        return [_convert_explained(v, f"{_path.rstrip('.')}[{i}].") for i, v in enumerate(value)]
    return value


#: One encoder for every payload: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dumps(obj: Mapping[str, Any], what: str) -> bytes:
    try:
        text = _ENCODER.encode(obj)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None
    return text.encode("utf-8")


def _location_dict(loc: Location) -> dict[str, str]:
    return {"site": loc.site, "area": loc.area, "line": loc.line, "machine": loc.machine}


def encode_event(
    event: Event,
    loc: Location,
    *,
    gateway_id: str,
    event_id: str,
    epoch: int | None = None,
    delayed: bool = False,
) -> bytes:
    """CloudEvents 1.0 structured JSON for one tracker event at location ``loc``.

    ``epoch`` (the outbox's sequence space, :attr:`gateway.delivery.outbox.Outbox.epoch`) goes into
    the ``epoch`` extension attribute when given; ``delayed`` adds ``"delayed":true`` (the
    event is sent late: after an outage or from a previous run), as the last attribute.
    """
    if event.type not in TIME_FIELDS:
        raise ValueError(f"unknown event type {event.type!r} of {event.machine}")
    return encode_envelope(
        event.type,
        loc,
        event_id=event_id,
        time=event.time,
        sequence=event.sequence,
        gateway_id=gateway_id,
        data_json=encode_data(event.data, f"event {event.type} of {event.machine}"),
        epoch=epoch,
        delayed=delayed,
    )


def encode_data(data: Mapping[str, Any], what: str = "event data") -> str:
    """An event's ``data`` as it goes on the wire: times converted, compact JSON text.

    The time rule converts numbers under time keys only (``*_at``, ``*_since``, ``eta``,
    ``due``: the fields the typed payloads of :mod:`gateway.core.events` declare as times);
    text is never taken for a time, so an order id that looks like one stays text.
    """
    wire = convert_times(data, _path="data.")
    try:
        return _ENCODER.encode(wire)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def has_time_keys(data_json: str) -> bool:
    """Whether compact JSON may hold a key of the time rule (never false for one that does).

    A payload without one encodes on the wire exactly as its typed JSON text.
    """
    return _TIME_KEY_TEXT.search(data_json) is not None


_TIME_KEY_TEXT = re.compile(r'_at"|_since"|"eta"|"due"')


@functools.lru_cache(maxsize=4096)
def _envelope_parts(type_: str, loc: Location) -> tuple[str, str]:
    """The attributes around ``time`` that only depend on the type and the location."""
    enc = _ENCODER.encode
    source = f"{SOURCE_PREFIX}/{loc.site}/{loc.area}/{loc.line}/{loc.machine}"
    head = f',"source":{enc(source)},"type":{enc(EVENT_TYPE_PREFIX + type_)},"time":"'
    tail = (
        f'","subject":{enc(loc.machine)},"datacontenttype":"application/json"'
        f',"dataschema":{enc(SCHEMA_PREFIX + type_)},"sequence":'
    )
    return head, tail


def encode_envelope(
    type_: str,
    loc: Location,
    *,
    event_id: str,
    time: float,
    sequence: int,
    gateway_id: str,
    data_json: str,
    epoch: int | None = None,
    delayed: bool = False,
) -> bytes:
    """The structured CloudEvent of an event whose ``data`` is already wire JSON text.

    The same bytes as a JSON encoding of the envelope dict (attribute order: specversion,
    id, source, type, time, subject, datacontenttype, dataschema, sequence, gatewayid, data,
    epoch, delayed); ``data_json`` must be compact JSON with times converted
    (:func:`encode_data`).
    """
    # Exact type checks first (a bool is an int subclass and must not pass).
    if type(sequence) is not int:
        raise ValueError(f"event sequence must be an int, got {sequence!r}")
    if epoch is not None and (type(epoch) is not int or epoch < 1):
        raise ValueError(f"event epoch must be an int >= 1, got {epoch!r}")
    head, tail = _envelope_parts(type_, loc)
    # The JSON string encoder the envelope encoder uses for str values (ensure_ascii off).
    enc = encode_basestring
    end = _ENDS[epoch is not None, delayed]
    return (
        f'{{"specversion":"1.0","id":{enc(event_id)}{head}{format_time(time)}{tail}'
        f'{sequence},"gatewayid":{enc(gateway_id)},"data":{data_json}'
        f"{end.format(epoch)}"
    ).encode()


#: The envelope's end after ``data`` (``str.format`` templates of the epoch): with or
#: without ``epoch`` and ``delayed``.
_ENDS = {
    (False, False): "}}",
    (True, False): ',"epoch":{}}}',
    (False, True): ',"delayed":true}}',
    (True, True): ',"epoch":{},"delayed":true}}',
}


def encode_state(
    snapshot: Mapping[str, Any], loc: Location, *, gateway_id: str, now: float
) -> bytes:
    """Retained state payload: the tracker's snapshot plus location, gateway and time.

    ``schema``, ``time``, ``gateway_id`` and ``location`` are set here and win over
    snapshot keys of the same name.
    """
    body: dict[str, Any] = {
        "schema": STATE_SCHEMA,
        "time": format_time(now),
        "gateway_id": gateway_id,
        "location": _location_dict(loc),
    }
    for k, v in convert_times(snapshot, _path="state.").items():
        body.setdefault(k, v)
    return _dumps(body, f"state of {loc.machine}")


def encode_status(
    status: Literal["online", "offline"],
    *,
    gateway_id: str,
    version: str,
    started_at: float,
    now: float,
    reason: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Retained gateway status payload (also used as the last will).

    For the will, ``now`` is when the will was registered (the broker sends it
    unchanged later); consumers should read ``reason`` rather than ``time`` for it.
    ``extra`` fields never replace the fixed ones.
    """
    if status not in ("online", "offline"):
        raise ValueError(f"status must be 'online' or 'offline', got {status!r}")
    body: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "status": status,
        "gateway_id": gateway_id,
        "version": version,
        "started_at": format_time(started_at),
        "time": format_time(now),
    }
    if reason is not None:
        body["reason"] = reason
    if extra:
        for k, v in convert_times(extra, _path="extra.").items():
            body.setdefault(k, v)
    return _dumps(body, "gateway status")


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    """An event read back from its CloudEvents JSON, times as epoch seconds again."""

    event: Event
    location: Location
    gateway_id: str
    event_id: str
    epoch: int | None


def parse_times(value: Any) -> Any:
    """The inverse of :func:`convert_times`: time strings at time keys become epoch seconds.

    Only values under the keys the time rule names (``*_at``, ``*_since``, ``eta``, ``due``)
    that are RFC 3339 UTC strings as :func:`format_time` writes them are converted; any other
    value is kept, so converting the result again gives the original text.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if _is_time_key(k) and isinstance(v, str) and (t := _parse_time(v)) is not None:
                out[k] = t
            else:
                out[k] = parse_times(v)
        return out
    if isinstance(value, list):
        return [parse_times(v) for v in value]
    return value


def _parse_time(text: str) -> float | None:
    if len(text) != 24 or text[-1] != "Z" or text[19] != ".":
        return None
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00").timestamp()
    except ValueError:
        return None
    # Only the exact text format_time writes: anything else stays a string.
    return t if format_time(t) == text else None


def read_event(payload: bytes, machine: str) -> DecodedEvent:
    """The event, location, gateway, id and epoch of an :func:`encode_event` payload.

    ``machine`` is the gateway's machine id (the envelope carries only the location);
    ``ValueError`` says what is wrong with a payload that is not such an event.
    """
    doc = decode_event(payload)
    source = doc["source"]
    head = SOURCE_PREFIX + "/"
    parts = source[len(head) :].split("/") if source.startswith(head) else []
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"event source {source!r} is not {SOURCE_PREFIX}/site/area/line/machine")
    time_ = _parse_time(doc["time"])
    if time_ is None:
        raise ValueError(f"event time {doc['time']!r} is not RFC 3339 UTC with milliseconds")
    gateway_id = doc.get("gatewayid")
    if not isinstance(gateway_id, str):
        raise ValueError("event field 'gatewayid' must be a string")
    epoch = doc.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise ValueError(f"event field 'epoch' must be an integer >= 1, got {epoch!r}")
    type_ = doc["type"].removeprefix(EVENT_TYPE_PREFIX)
    data = parse_times(doc.get("data", {}))
    event = Event(machine, type_, time_, doc["sequence"], data)
    return DecodedEvent(event, Location(*parts), gateway_id, doc["id"], epoch)


def decode_event(payload: bytes) -> dict[str, Any]:
    """Parse and minimally validate a v1 event envelope; ``ValueError`` says what is wrong."""
    try:
        obj = json.loads(payload)
    except UnicodeDecodeError:
        raise ValueError("event payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"event payload is not JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"event payload must be a JSON object, got {type(obj).__name__}")
    if obj.get("specversion") != "1.0":
        raise ValueError(f"unsupported CloudEvents specversion {obj.get('specversion')!r}")
    for name in _REQUIRED_EVENT_FIELDS:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"event field {name!r} must be a non-empty string")
    if not obj["type"].startswith(EVENT_TYPE_PREFIX):
        raise ValueError(f"event type {obj['type']!r} does not start with {EVENT_TYPE_PREFIX!r}")
    seq = obj.get("sequence")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"event field 'sequence' must be an integer >= 1, got {seq!r}")
    if "data" in obj and not isinstance(obj["data"], dict):
        raise ValueError("event field 'data' must be a JSON object")
    return obj
