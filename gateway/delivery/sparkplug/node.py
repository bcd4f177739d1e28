"""The Sparkplug B 3.0 edge node's state, without I/O: what to publish, and when.

One :class:`EdgeNode` per ``format: sparkplug`` destination; each machine is a Sparkplug
device. The MQTT session (:mod:`gateway.delivery.sparkplug.client`) drives it:

* :meth:`EdgeNode.new_session` before every CONNECT: ``bdSeq`` goes up by one (0-255,
  wrapping) and the NDEATH that carries it becomes the last will.
* :meth:`EdgeNode.go_live` once the session may publish (connected, and the primary host
  application ``online`` when one is configured): NBIRTH (``seq`` 0, ``bdSeq``, the
  ``Node Control/Rebirth`` metric), one DBIRTH per machine that is talking, then what was
  held while not live, as DDATA with ``is_historical`` (store and forward).
* :meth:`EdgeNode.go_offline` when the session ends or the primary host goes offline:
  from then on changes are held (bounded; the oldest are dropped first and counted).
* :meth:`EdgeNode.rebirth` on the ``Node Control/Rebirth`` NCMD: NBIRTH and every DBIRTH
  again, ``seq`` from 0, same ``bdSeq``.

Machines feed it with :meth:`observe` (mapped samples; only changes are published, report
by exception), :meth:`order_state` (the tracker's snapshot: ``Machine/State`` and the
``Order/...`` metrics) and :meth:`device_lost` (DDEATH). Every message after NBIRTH carries
the next ``seq`` (0-255, wrapping). Aliases are numbered per edge node in the order metrics
are first seen and never change while the process runs; a metric whose value changes type
(an integer register that starts reading fractions) gets a new datatype and its machine a
new DBIRTH.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.core.model import Quality, Sample
from gateway.core.routing import OPERATOR_KEY, OperatorPolicy, pseudonym
from gateway.delivery.sparkplug import codec
from gateway.delivery.sparkplug.codec import DataType, MetricValue

NAMESPACE: Final = "spBv1.0"
REBIRTH: Final = "Node Control/Rebirth"
BDSEQ: Final = "bdSeq"

#: The order metrics of every device, with their fixed datatypes.
ORDER_METRICS: Final[Mapping[str, DataType]] = {
    "Machine/State": DataType.STRING,
    "Order/Id": DataType.STRING,
    "Order/Status": DataType.STRING,
    "Order/Good": DataType.INT64,
    "Order/Scrap": DataType.INT64,
    "Order/Target": DataType.INT64,
    "Order/ETA": DataType.DATETIME,
}

#: Metrics per DDATA message when held data is replayed.
REPLAY_CHUNK: Final = 500


def valid_id(value: str) -> str | None:
    """Why ``value`` is not a Sparkplug id (group, edge node, device, host), or ``None``."""
    if not value:
        return "is empty"
    bad = sorted({c for c in value if c in "+#/"})
    if bad:
        return f"contains {' '.join(repr(c) for c in bad)}: Sparkplug ids may not hold + # /"
    if len(value.encode()) > 256:
        return "is longer than 256 bytes"
    return None


def datatype_of(value: MetricValue) -> DataType | None:
    """The datatype a first value decides (``None`` for a null: wait for a real one)."""
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, int):
        return DataType.INT64 if -(2**63) <= value < 2**63 else DataType.DOUBLE
    if isinstance(value, float):
        return DataType.DOUBLE
    if isinstance(value, str):
        return DataType.STRING
    return None


def _fits(datatype: int, value: MetricValue) -> bool:
    if value is None:
        return True
    if datatype == DataType.DOUBLE:
        return isinstance(value, int | float)
    if datatype == DataType.INT64 or datatype == DataType.DATETIME:
        return isinstance(value, int) and -(2**63) <= value < 2**63
    if datatype == DataType.BOOLEAN:
        return isinstance(value, bool)
    return isinstance(value, str)


def ms(seconds: float) -> int:
    """Wall-clock seconds to Sparkplug's milliseconds since the epoch."""
    return int(seconds * 1000.0)


def _no_fast_encoder(value: MetricValue) -> bytes:
    raise TypeError("encoded on the slow path")


class _Metric:
    __slots__ = ("alias", "datatype", "encode", "head", "name")

    def __init__(self, name: str, alias: int, datatype: int) -> None:
        self.name = name
        self.alias = alias
        self.set_datatype(datatype)

    def set_datatype(self, datatype: int) -> None:
        self.datatype = datatype
        self.head = codec.data_head(self.alias, datatype)
        self.encode = codec.ENCODERS.get(datatype, _no_fast_encoder)  # type: ignore[call-overload]


class _Device:
    __slots__ = ("born", "id", "metrics", "talking", "values")

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.metrics: dict[str, _Metric] = {}
        #: Last value and its time (ms) per metric name.
        self.values: dict[str, tuple[MetricValue, int]] = {}
        #: Whether this session published its DBIRTH (and no DDEATH since).
        self.born = False
        #: Whether the machine answers: only a talking machine is born.
        self.talking = False


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish (QoS 0, not retained, as Sparkplug has BIRTH and DATA)."""

    topic: str
    payload: bytes
    kind: str


class EdgeNode:
    """Sparkplug B edge node state: aliases, ``seq``, ``bdSeq``, births and held data."""

    def __init__(
        self,
        group_id: str,
        edge_node_id: str,
        *,
        operator: OperatorPolicy = "drop",
        secret: bytes | None = None,
        max_held: int = 100_000,
    ) -> None:
        for what, value in (("group_id", group_id), ("edge_node_id", edge_node_id)):
            problem = valid_id(value)
            if problem:
                raise ValueError(f"{what} {value!r} {problem}")
        self.group_id = group_id
        self.edge_node_id = edge_node_id
        self._operator = operator
        self._secret = secret
        self._max_held = max_held
        base = f"{NAMESPACE}/{group_id}"
        self.topic_nbirth = f"{base}/NBIRTH/{edge_node_id}"
        self.topic_ndeath = f"{base}/NDEATH/{edge_node_id}"
        self.topic_ncmd = f"{base}/NCMD/{edge_node_id}"
        self._dbirth = f"{base}/DBIRTH/{edge_node_id}/"
        self._ddata = f"{base}/DDATA/{edge_node_id}/"
        self._ddeath = f"{base}/DDEATH/{edge_node_id}/"
        #: ``bdSeq`` of the current session; -1 before the first.
        self.bd_seq = -1
        self._seq = 0
        self._next_alias = 1
        self._devices: dict[str, _Device] = {}
        #: Whether messages go out now (else changes are held).
        self.live = False
        #: Messages to publish, in order.
        self.outgoing: deque[Outgoing] = deque()
        #: Changes made while not live: (device, metric, value, time ms).
        self._held: deque[tuple[str, str, MetricValue, int]] = deque()
        self.held_dropped = 0
        self.births = 0

    # ------------------------------------------------------------------ session

    def new_session(self, now: float) -> bytes:
        """Start a new MQTT session: next ``bdSeq``; returns the NDEATH (the last will)."""
        self.bd_seq = (self.bd_seq + 1) % 256
        return self.ndeath(now)

    def ndeath(self, now: float) -> bytes:
        """The NDEATH payload of the current session (``bdSeq`` only, no ``seq``)."""
        bd = codec.metric(name=BDSEQ, timestamp=ms(now), datatype=DataType.INT64, value=self.bd_seq)
        return codec.payload(ms(now), None, [bd])

    def go_live(self, now: float) -> None:
        """The session may publish: births, then what was held (historical)."""
        self.live = True
        self._births(now)
        self._replay(now)

    def go_offline(self) -> int:
        """The session ended or may not publish: hold changes; returns unsent messages lost."""
        self.live = False
        lost = len(self.outgoing)
        self.outgoing.clear()
        for d in self._devices.values():
            d.born = False
        return lost

    def rebirth(self, now: float) -> None:
        """Answer a rebirth request: NBIRTH and every DBIRTH again (``seq`` from 0)."""
        if self.live:
            self._births(now)

    def _births(self, now: float) -> None:
        t = ms(now)
        self._seq = 0
        metrics = [
            codec.metric(name=BDSEQ, timestamp=t, datatype=DataType.INT64, value=self.bd_seq),
            codec.metric(name=REBIRTH, timestamp=t, datatype=DataType.BOOLEAN, value=False),
        ]
        self.outgoing.append(Outgoing(self.topic_nbirth, codec.payload(t, 0, metrics), "NBIRTH"))
        self.births += 1
        for d in self._devices.values():
            d.born = False
            if d.talking and d.values:
                self._dbirth_of(d, t)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def _dbirth_of(self, d: _Device, t: int) -> None:
        metrics = []
        for name, m in d.metrics.items():
            value, at = d.values.get(name, (None, t))
            metrics.append(
                codec.metric(
                    name=name, alias=m.alias, timestamp=at, datatype=m.datatype, value=value
                )
            )
        payload = codec.payload(t, self._next_seq(), metrics)
        self.outgoing.append(Outgoing(self._dbirth + d.id, payload, "DBIRTH"))
        d.born = True

    def _replay(self, now: float) -> None:
        """Held changes as historical DDATA, per device, in the order they happened."""
        if not self._held:
            return
        t = ms(now)
        by_device: dict[str, list[bytes]] = {}
        for device_id, name, value, at in self._held:
            d = self._devices.get(device_id)
            m = d.metrics.get(name) if d is not None else None
            if d is None or m is None or not d.born or not _fits(m.datatype, value):
                continue
            chunk = by_device.setdefault(device_id, [])
            chunk.append(codec.data_metric(m.head, at, codec.value_field(m.datatype, value), True))
            if len(chunk) >= REPLAY_CHUNK:
                self._ddata_of(device_id, t, chunk)
                by_device[device_id] = []
        for device_id, chunk in by_device.items():
            if chunk:
                self._ddata_of(device_id, t, chunk)
        self._held.clear()

    def _ddata_of(self, device_id: str, t: int, metrics: list[bytes]) -> None:
        payload = codec.payload(t, self._next_seq(), metrics)
        self.outgoing.append(Outgoing(self._ddata + device_id, payload, "DDATA"))

    def _hold(self, device_id: str, name: str, value: MetricValue, at: int) -> None:
        held = self._held
        if len(held) >= self._max_held:
            held.popleft()
            self.held_dropped += 1
        held.append((device_id, name, value, at))

    @property
    def held(self) -> int:
        """Changes held for a later historical replay."""
        return len(self._held)

    # ------------------------------------------------------------------ machines

    def _device(self, machine: str) -> _Device:
        d = self._devices.get(machine)
        if d is None:
            problem = valid_id(machine)
            if problem:
                raise ValueError(f"machine id {machine!r} {problem}")
            d = self._devices[machine] = _Device(machine)
            for name, datatype in ORDER_METRICS.items():
                self._define(d, name, datatype)
        return d

    def _define(self, d: _Device, name: str, datatype: int) -> _Metric:
        m = d.metrics.get(name)
        if m is None:
            m = d.metrics[name] = _Metric(name, self._next_alias, datatype)
            self._next_alias += 1
        else:
            m.set_datatype(datatype)
        return m

    def observe(self, machine: str, samples: Iterable[Sample]) -> None:
        """Mapped samples of one machine: changes go out as DDATA (or DBIRTH, or are held)."""
        d = self._devices.get(machine) or self._device(machine)
        d.talking = True
        if not (self.live and d.born):
            self._observe_slow(d, samples)
            return
        # The hot path (a born device, known metrics, values of their datatype): each
        # change is encoded right here, and a reading's timestamp field once.
        metrics = d.metrics
        values = d.values
        out: list[bytes] = []
        slow: list[Sample] = []
        seen_t = -1.0
        at = 0
        ts = b""
        good = Quality.GOOD
        null = codec.NULL_FIELD
        for s in samples:
            name = s[1]
            value = s[2] if s[4] is good else None
            last = values.get(name)
            if last is not None and last[0] == value and type(last[0]) is type(value):
                continue
            m = metrics.get(name)
            if m is None or name == OPERATOR_KEY:
                slow.append(s)
                continue
            try:
                field = null if value is None else m.encode(value)
            except TypeError:
                slow.append(s)
                continue
            t = s[3]
            if t != seen_t:
                seen_t = t
                at = int(t * 1000.0)
                ts = codec.timestamp_field(at)
            values[name] = (value, at)
            out.append(codec.wrap_metric(m.head + ts + field))
        if slow:
            self._observe_slow(d, slow)
            if not d.born or self._last_was_birth(d):
                return  # the DBIRTH just sent carries these values too
        if out:
            payload = codec.payload(at, self._next_seq(), out)
            self.outgoing.append(Outgoing(self._ddata + d.id, payload, "DDATA"))

    def _last_was_birth(self, d: _Device) -> bool:
        return bool(self.outgoing) and self.outgoing[-1].topic == self._dbirth + d.id

    def _observe_slow(self, d: _Device, samples: Iterable[Sample]) -> None:
        changes: list[tuple[str, MetricValue, int]] = []
        values = d.values
        for s in samples:
            name = s.signal
            value: MetricValue = s.value if s.quality is Quality.GOOD else None
            if name == OPERATOR_KEY and value is not None:
                if self._operator == "drop" or (
                    self._operator == "pseudonymise" and self._secret is None
                ):
                    continue
                if self._operator == "pseudonymise" and self._secret is not None:
                    value = pseudonym(self._secret, value)
            last = values.get(name)
            if last is not None and last[0] == value and type(last[0]) is type(value):
                continue
            changes.append((name, value, ms(s.source_time)))
        if changes:
            self._apply(d, changes)

    def order_state(self, machine: str, snapshot: Mapping[str, Any]) -> None:
        """The tracker's snapshot of one machine: ``Machine/State`` and ``Order/...``."""
        d = self._device(machine)
        order = snapshot.get("order")
        order = order if isinstance(order, Mapping) else {}
        eta = order.get("eta")
        updated = snapshot.get("updated_at")
        at = ms(updated) if isinstance(updated, int | float) else 0
        wanted: dict[str, MetricValue] = {
            "Machine/State": _str(snapshot.get("state")),
            "Order/Id": _str(order.get("order_id")),
            "Order/Status": _str(order.get("status")),
            "Order/Good": _int(order.get("good")),
            "Order/Scrap": _int(order.get("scrap")),
            "Order/Target": _int(order.get("target")),
            "Order/ETA": ms(eta) if isinstance(eta, int | float) else None,
        }
        values = d.values
        changes = [
            (name, value, at or values.get(name, (None, 0))[1])
            for name, value in wanted.items()
            if name not in values or values[name][0] != value
        ]
        if changes:
            self._apply(d, changes)

    def device_lost(self, machine: str, now: float) -> None:
        """The machine stopped answering: DDEATH (once), no DBIRTH until it talks again."""
        d = self._devices.get(machine)
        if d is None:
            return
        d.talking = False
        if d.born and self.live:
            payload = codec.payload(ms(now), self._next_seq(), [])
            self.outgoing.append(Outgoing(self._ddeath + d.id, payload, "DDEATH"))
        d.born = False

    def _apply(self, d: _Device, changes: list[tuple[str, MetricValue, int]]) -> None:
        metrics = d.metrics
        values = d.values
        rebirth = False
        for name, value, at in changes:
            m = metrics.get(name)
            if m is None:
                datatype = datatype_of(value)
                if datatype is None:
                    continue  # a null before any value: the datatype is not known yet
                self._define(d, name, datatype)
                rebirth = True
            elif not _fits(m.datatype, value):
                datatype = datatype_of(value)
                if datatype is None:
                    continue
                self._define(d, name, datatype)
                rebirth = True
            values[name] = (value, at)
        if not self.live:
            for name, value, at in changes:
                if name in metrics:
                    self._hold(d.id, name, value, at)
            return
        if not d.talking:
            return
        if rebirth or not d.born:
            self._dbirth_of(d, max(at for _, _, at in changes))
            return
        out = []
        for name, value, at in changes:
            m = metrics[name]
            out.append(codec.data_metric(m.head, at, codec.value_field(m.datatype, value), False))
        self._ddata_of(d.id, max(at for _, _, at in changes), out)


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)
