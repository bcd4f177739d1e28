"""Typed outbox records: what the outbox stores for an event, and how sinks encode it.

A :class:`Record` is one event as the gateway emitted it, before any wire format: its type,
the machine's location, the per-machine ``sequence`` and the outbox ``epoch`` it belongs to,
its time, the typed payload (the event's ``data``, times as epoch seconds, never strings),
its ``id`` and gateway, and the routing bits that decided where it goes (order and customer
for order scoping). The outbox stores these fields in columns of their own
(:mod:`gateway.delivery.outbox`, schema 2) and hands them back to each destination as it
reads; nothing in a record depends on who reads it.

Each sink encodes a record on read, the way it needs:

* MQTT destinations: CloudEvents JSON (:func:`wire_payload`, via
  :func:`gateway.contract.envelope.encode_event`), after the destination's operator policy
  (drop / pseudonymise / pass, :func:`gateway.core.routing.redact`) was applied to the typed
  payload. :class:`WireEncodings` memoises the bytes per row, policy and ``delayed`` flag, so
  destinations that encode a row the same way (the common case: all of them) share one
  encoding.
* The history sink: a point from the typed fields (``gateway.delivery.influx.sink``,
  :func:`~gateway.delivery.influx.sink.record_point`), no parsing of another sink's format.

A sink plugs in by taking :class:`Record` items (``Outbox.record_queue``) and encoding them
itself; :class:`WireEncodings` is the pattern to follow when several destinations of one
kind would encode the same record the same way.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from gateway.contract.envelope import encode_data, encode_envelope, has_time_keys
from gateway.core.model import Event, Location
from gateway.core.routing import OperatorPolicy, redact


class Record:
    """One stored event, typed: the same fields whatever sink reads it.

    ``machine`` is the gateway's machine id (``location.machine`` is its topic segment);
    ``data`` is JSON-ready with times as float epoch seconds; ``epoch`` is ``None`` only for
    events emitted before the outbox had one. A record read from the outbox keeps its
    payload as the stored JSON text and decodes it on first use of :attr:`data` (an MQTT
    destination whose payload has no time keys never needs it). Treat records as immutable.
    """

    __slots__ = (
        "_data",
        "_json",
        "_wire",
        "customer",
        "epoch",
        "event_id",
        "gateway_id",
        "location",
        "machine",
        "order_id",
        "sequence",
        "time",
        "type",
    )

    def __init__(
        self,
        machine: str,
        type: str,
        location: Location,
        sequence: int,
        time: float,
        data: Mapping[str, Any] | None,
        event_id: str,
        gateway_id: str,
        epoch: int | None = None,
        order_id: str | None = None,
        customer: str | None = None,
        *,
        data_json: str | None = None,
        data_wire: str | None = None,
    ) -> None:
        """A record; give ``data`` or its compact JSON text ``data_json`` (decoded lazily).

        ``data_wire`` is the payload as the CloudEvents encoding writes it, when known.
        """
        if data is None and data_json is None:
            raise ValueError("a record needs its data or the data's JSON text")
        self.machine = machine
        self.type = type
        self.location = location
        self.sequence = sequence
        self.time = time
        self.event_id = event_id
        self.gateway_id = gateway_id
        self.epoch = epoch
        self.order_id = order_id
        self.customer = customer
        self._data = data
        self._json = data_json
        self._wire = data_wire

    @property
    def data(self) -> Mapping[str, Any]:
        """The typed payload (times as epoch seconds)."""
        data = self._data
        if data is None:
            assert self._json is not None
            data = self._data = json.loads(self._json)
        return data

    def data_json(self) -> str:
        """The typed payload as compact JSON text (as the outbox stores it)."""
        text = self._json
        if text is None:
            wire = self._wire
            if wire is not None and not has_time_keys(wire):
                text = wire  # no time to convert: the wire text is the typed text
            else:
                text = _DATA_ENCODER.encode(self._data)
            self._json = text
        return text

    def data_wire(self) -> str:
        """The payload as it goes on the wire: compact JSON, times as RFC 3339 text.

        Kept with the record once made (the outbox stores it next to the typed payload), so
        a backlog is not converted again on every read. ``ValueError`` if it cannot be made.
        """
        text = self._wire
        if text is None:
            stored = self._json
            if stored is not None and not has_time_keys(stored):
                # Nothing to convert: the typed text is the wire text (same encoder settings).
                text = stored
            else:
                text = encode_data(self.data, f"event {self.type} of {self.machine}")
            self._wire = text
        return text

    def with_data(self, data: Mapping[str, Any]) -> Record:
        """The same record with another payload (a redacted one)."""
        return Record(
            self.machine,
            self.type,
            self.location,
            self.sequence,
            self.time,
            data,
            self.event_id,
            self.gateway_id,
            self.epoch,
            self.order_id,
            self.customer,
        )

    def event(self) -> Event:
        """The domain event this record stores."""
        return Event(self.machine, self.type, self.time, self.sequence, self.data)

    def _key(self) -> tuple[Any, ...]:
        return (
            self.machine,
            self.type,
            self.location,
            self.sequence,
            self.time,
            self.data,
            self.event_id,
            self.gateway_id,
            self.epoch,
            self.order_id,
            self.customer,
        )

    def __eq__(self, other: object) -> bool:
        """Records are equal when every field and the payload are."""
        if not isinstance(other, Record):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        """The fields, for test output and logs."""
        return (
            f"Record({self.machine!r}, {self.type!r}, seq={self.sequence}, epoch={self.epoch},"
            f" time={self.time!r}, data={self.data!r})"
        )

    def __getstate__(self) -> tuple[Any, ...]:
        """Pickled as its fields (the payload as data)."""
        return self._key()

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        """Restored from :meth:`__getstate__`."""
        (
            self.machine,
            self.type,
            self.location,
            self.sequence,
            self.time,
            self._data,
            self.event_id,
            self.gateway_id,
            self.epoch,
            self.order_id,
            self.customer,
        ) = state
        self._json = None
        self._wire = None


#: Typed payloads as compact JSON, as strict as the envelope's encoder.
_DATA_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def wire_payload(
    record: Record,
    policy: OperatorPolicy = "pass",
    secret: bytes | None = None,
    *,
    delayed: bool = False,
) -> bytes:
    """CloudEvents JSON of ``record`` as a destination with operator ``policy`` receives it.

    Redaction acts on the typed payload before it is encoded; ``ValueError`` when the
    payload cannot be encoded (a non-finite number, a time out of range).
    """
    if policy != "pass":
        what = f"event {record.type} of {record.machine}"
        data_json = encode_data(redact(record.data, policy, secret), what)
    else:
        data_json = record.data_wire()
    return encode_envelope(
        record.type,
        record.location,
        event_id=record.event_id,
        time=record.time,
        sequence=record.sequence,
        gateway_id=record.gateway_id,
        data_json=data_json,
        epoch=record.epoch,
        delayed=delayed,
    )


#: Marks a payload that can name an operator (``"operator"`` and ``"operators"`` keys).
_OPERATOR = b'"operator'


class WireEncodings:
    """CloudEvents bytes of stored rows, memoised per (seq, policy, secret, delayed).

    Bounded: the oldest encodings go first, so a long backlog drained by several
    destinations at once still shares them while the destinations read near each other.
    A record whose plain encoding names no operator is encoded once for every policy.
    """

    def __init__(self, size: int = 8192) -> None:
        """An empty memo of at most ``size`` encodings."""
        if size < 1:
            raise ValueError("the encoding memo needs room for at least one encoding")
        self._size = size
        # An OrderedDict: evicting the oldest of a plain dict scans the holes that earlier
        # deletions left at its front (next(iter(d)) grows with them).
        self._memo: OrderedDict[tuple[int, str, bytes | None, bool], bytes] = OrderedDict()
        #: Encodings handed out from the memo, and encodings made.
        self.hits = 0
        self.encoded = 0

    def prime(self, seq: int, payload: bytes, *, delayed: bool = False) -> None:
        """Remember ``payload`` as the plain (``pass``) encoding of row ``seq``."""
        self._put((seq, "pass", None, delayed), payload)

    def encode(
        self,
        seq: int,
        record: Record,
        policy: OperatorPolicy,
        secret: bytes | None,
        *,
        delayed: bool = False,
    ) -> bytes:
        """The bytes of row ``seq`` (holding ``record``) for a destination's ``policy``."""
        key = (seq, policy, secret if policy == "pseudonymise" else None, delayed)
        memo = self._memo
        got = memo.get(key)
        if got is not None:
            self.hits += 1
            return got
        plain_key = (seq, "pass", None, delayed)
        plain = memo.get(plain_key)
        if plain is None:
            plain = wire_payload(record, delayed=delayed)
            self.encoded += 1
            self._put(plain_key, plain)
        elif policy == "pass" or _OPERATOR not in plain:
            self.hits += 1
        if policy == "pass" or _OPERATOR not in plain:
            # Every policy sends these bytes: remembered once, under the plain key.
            return plain
        payload = wire_payload(record, policy, secret, delayed=delayed)
        self.encoded += 1
        self._put(key, payload)
        return payload

    def _put(self, key: tuple[int, str, bytes | None, bool], payload: bytes) -> None:
        memo = self._memo
        if key not in memo and len(memo) >= self._size:
            memo.popitem(last=False)
        memo[key] = payload

    def __len__(self) -> int:
        """Encodings held."""
        return len(self._memo)
