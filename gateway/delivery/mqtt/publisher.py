"""MQTT publisher: an ordered, bounded, at-least-once send queue to one broker.

One :class:`MqttPublisher` per destination broker: the one
:class:`~gateway.delivery.sink.SinkRunner` feeding an :class:`MqttSink` (the MQTT
implementation of the output interface). Producers call :meth:`submit` (non-blocking, never
raises); :meth:`run` keeps a connection up and drains the queue; :meth:`close` flushes,
publishes the offline status and disconnects.

Delivery contract:

* A message leaves the queue only after the broker acknowledged it (QoS 1: PUBACK;
  QoS 0: once written). An MQTT 5 PUBACK with a failure reason (0x80 and up, e.g. not
  authorised by the broker's ACL) is no acknowledgement: the link ends with the reason in
  the log and the message is sent again after the reconnect backoff. Order is kept; up to
  ``window`` publishes are in flight at once.
  When the connection drops, un-acknowledged messages are sent again after the
  reconnect, so duplicates are possible within the window (consumers deduplicate by
  event id).
* What is queued, coalesced and dropped is the queue's business: the daemon's publishers
  send from the durable outbox (:class:`gateway.delivery.outbox.OutboxQueue`, which also
  coalesces unsent retained messages per topic). Without a queue given (benchmarks, tests)
  a publisher uses an in-memory :class:`~gateway.delivery.sendqueue.MemorySinkQueue` of
  ``max_queue`` messages that drops the oldest unsent one beyond it; ``dropped`` counts
  what any queue dropped.
* On every (re)connect the last will (status topic, ``will_payload``, retained, QoS 1) is
  registered and ``online_payload`` is published retained before anything else.
* Cancelling :meth:`run` without :meth:`close` drops the connection without an MQTT
  DISCONNECT, so the broker publishes the last will and the status does not stay online.
* A message waiting longer than ``ack_timeout`` for its acknowledgement means the link is
  stuck: the connection is dropped and everything un-acknowledged is sent again.

How it sends: aiomqtt connects (TLS, last will, CONNACK) and reports the disconnect; the
queue goes to paho directly. The runner's pump hands :meth:`MqttSink.send` up to ``window``
messages; it gives them to paho, remembers packet id -> queue key, and acks the key when
paho reports the PUBACK (QoS 0: the write).
No task, future or timeout per message: one timer watches the oldest message in flight.
paho's own in-flight limit is off (the window bounds it) and a refused publish (no
connection, packet ids exhausted) counts as a lost link; a message paho rejects for good
(topic too long) is dropped and counted. A plain PUBACK of our own is read straight from
paho's packet buffer, skipping paho's per-PUBACK ReasonCode and Properties objects.

That fast path reads and overrides private internals of paho-mqtt and aiomqtt, so
pyproject.toml pins the exact versions it was written against (:data:`FAST_PATH_VERSIONS`).
Should an install lack one of them, the publisher logs ``mqtt.fast_path_unavailable``
(naming what is missing) and falls back to the libraries' own public paths;
:meth:`MqttPublisher.fast_path` reports which path the messages took.

The queue sits behind the small :class:`SendQueue` interface; a queue that fills itself
(the outbox's) calls :meth:`MqttPublisher.notify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode

from gateway.config.plans import BrokerPlan, TlsPlan
from gateway.delivery.sendqueue import MemorySinkQueue, SinkQueue
from gateway.delivery.sink import (
    Accepts,
    Cause,
    LinkLost,
    RunnerCallbacks,
    RunnerSettings,
    SinkLog,
    SinkRunner,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


#: The publisher consumes the config's broker plan; the old names stay for callers.
BrokerSettings = BrokerPlan
TlsSettings = TlsPlan


# --- the queue -------------------------------------------------------------------------


#: The queue a publisher sends from: the outbox's, or an in-memory one.
SendQueue = SinkQueue[Message]


# --- the publisher ---------------------------------------------------------------------


#: MQTT reason codes (MQTT 5 numbering; paho maps the 3.1.1 CONNACK codes onto these).
_RC_BAD_CREDENTIALS = 0x86
_RC_NOT_AUTHORIZED = 0x87
_RC_CLIENT_ID = 0x85
_RC_SESSION_TAKEN_OVER = 0x8E
#: paho error codes that mean the link went away, not that the broker refused anything.
_LINK_GONE = frozenset({MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST})


def _takeover(client_id: str, text: str) -> Cause:
    return Cause(
        "session-taken-over",
        f"session taken over: another client connects with client id {client_id!r} and the "
        f"broker keeps only one ({text}); give every client its own client_id",
    )


def classify(exc: BaseException, client_id: str) -> Cause:
    """The cause of a failed connect or a lost link, from the exception and what it wraps."""
    if isinstance(exc, LinkLost):
        if exc.cause == "session-taken-over" and not exc.args[0].startswith("session taken"):
            return _takeover(client_id, str(exc))
        return Cause(exc.cause, str(exc))
    rc = getattr(exc, "rc", None)
    if isinstance(rc, MQTTErrorCode) and rc in _LINK_GONE:
        # paho's own error codes are not the broker's answer: 4 is "not connected" (the
        # link dropped while connecting, e.g. taken over), not a CONNACK refusal.
        return Cause("closed", f"the connection closed: {paho.error_string(rc)}")
    value = getattr(rc, "value", rc)
    if isinstance(value, int) and not isinstance(exc, OSError):
        words = str(rc)
        if value in (_RC_BAD_CREDENTIALS, _RC_NOT_AUTHORIZED):
            return Cause(
                "not-authorized",
                f"{words}: the broker refuses the credentials (a rotated password? check "
                "username and password or password_file)",
            )
        if value == _RC_CLIENT_ID:
            return Cause("client-id", f"{words}: the broker refuses client id {client_id!r}")
        if value == _RC_SESSION_TAKEN_OVER:
            return _takeover(client_id, words)
        return Cause(f"refused-{value}", f"the broker refused the connection: {words}")
    # aiomqtt turns socket errors into a plain MqttError("...") raised from None; the
    # original error is still its __context__.
    inner: BaseException | None = exc
    for _ in range(4):
        if inner is None or isinstance(inner, OSError):
            break
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, ssl.SSLError):
        return Cause("tls", f"TLS handshake failed: {_describe(inner)}")
    if isinstance(inner, ConnectionRefusedError):
        return Cause("refused", "connection refused: is the broker running on that port?")
    if isinstance(inner, socket.gaierror):
        return Cause("name", f"host name not resolved: {_describe(inner)}")
    if isinstance(inner, TimeoutError) or isinstance(exc, TimeoutError):
        return Cause("timeout", "no answer from the broker within connect_timeout")
    if isinstance(inner, OSError):
        return Cause("network", _describe(inner))
    return Cause("other", _describe(exc))


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """An SSL context for the broker connection; ``ValueError`` for unusable files."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS files for the broker connection: {exc}") from None
    if tls.key_file and not tls.cert_file:
        raise ValueError("TLS key_file given without cert_file")
    ctx.check_hostname = tls.verify_hostname
    return ctx


class _Client(aiomqtt.Client):
    """aiomqtt client that writes promptly and never registers a socket paho closed.

    aiomqtt 2.5 registers a writer through ``call_soon_threadsafe`` for every burst of
    packets, then waits for the socket to be writable. From the loop's own thread (the
    publisher's pump) this writes once the burst is queued instead, and waits for
    writability only when the socket buffer is full: no self-pipe wake-up, no epoll
    registration per burst. And when the broker goes away, paho can close the socket
    before a registration runs; asyncio then logs a traceback for the stale descriptor
    (or, if the number was reused, steals the writer of the next connection).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """aiomqtt's client, made on the event loop's thread."""
        super().__init__(*args, **kwargs)
        self._loop_thread = threading.get_ident()
        #: Reads done by this class's reader (with the quick TCP ACK), not aiomqtt's.
        self.fast_reads = 0
        #: Bursts written at once from the loop's thread, without a writer registration.
        self.fast_writes = 0

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """aiomqtt's reader, plus an immediate TCP ACK of what the broker sent.

        A broker with Nagle's algorithm on (Mosquitto's default, ``set_tcp_nodelay false``)
        holds each PUBACK until its previous one is acknowledged by TCP, and Linux delays
        that acknowledgement by up to 40 ms when the gateway has nothing to send back: about
        one event in four waited 42-55 ms for its PUBACK at 100 events/s. ``TCP_QUICKACK`` after
        every read makes the kernel acknowledge at once (it is not sticky, hence each time).
        """
        if not hasattr(self, "_misc_loop") or not hasattr(self, "_disconnected"):
            # Another aiomqtt than the one this was written against: its own reader.
            super()._on_socket_open(client, userdata, sock)
            return
        quickack = getattr(socket, "TCP_QUICKACK", None)  # Linux only
        raw: Any = sock

        def read() -> None:
            try:
                while True:
                    client.loop_read()
                    # An SSL socket can hold decoded bytes that loop_read() left behind.
                    pending = getattr(client.socket(), "pending", None)
                    if pending is not None and pending() > 0:
                        continue
                    break
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)
                return
            self.fast_reads += 1
            if quickack is not None and client.socket() is raw:
                _ack_now(raw, quickack)

        def misc() -> None:
            self._misc_task = self._loop.create_task(self._misc_loop())

        # paho calls this from the thread that ran connect(): hand over to the loop.
        self._loop.call_soon_threadsafe(self._loop.add_reader, raw.fileno(), read)
        self._loop.call_soon_threadsafe(misc)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fileno = sock.fileno()

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                # Same as aiomqtt: a failed write means the connection broke.
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if client.socket() is sock:
                self._loop.add_writer(fileno, write)

        def write_now() -> None:
            if client.socket() is not sock:
                return
            self.fast_writes += 1
            write()
            # What did not fit into the socket buffer goes once it is writable again.
            if client.want_write() and client.socket() is sock:
                self._loop.add_writer(fileno, write)

        if threading.get_ident() == self._loop_thread:
            # Deferred to after the current burst of publishes: one write for all.
            self._loop.call_soon(write_now)
        else:
            self._loop.call_soon_threadsafe(register)


def _ack_now(sock: Any, option: int) -> None:
    """Ask the kernel to acknowledge what arrived without delay (``TCP_QUICKACK``)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)


_PubackHandler = Callable[[Literal["PUBACK", "PUBCOMP"]], MQTTErrorCode]

#: The versions the fast path was written against; pyproject.toml pins exactly these.
FAST_PATH_VERSIONS = {"paho-mqtt": "2.2.0", "aiomqtt": "2.5.1"}

#: paho-mqtt 2.x internals the PUBACK fast path of :class:`_Link` reads and keeps in step.
_PAHO_STATE = (
    "_handle_pubackcomp",
    "_in_packet",
    "_out_messages",
    "_out_message_mutex",
    "_inflight_messages",
)
#: aiomqtt 2.x internals :class:`_Client` overrides or reads.
_AIOMQTT_STATE = ("_client", "_loop", "_disconnected", "_misc_loop")


def fast_path_missing(client: aiomqtt.Client) -> tuple[str, ...]:
    """The library internals the fast path needs that ``client`` lacks (empty: all there).

    Besides the attributes themselves, this checks that aiomqtt still hands paho the
    socket callbacks :class:`_Client` overrides: a renamed hook in aiomqtt would otherwise
    leave the override silently unused.
    """
    missing = [f"aiomqtt.Client.{name}" for name in _AIOMQTT_STATE if not hasattr(client, name)]
    inner = getattr(client, "_client", None)
    if inner is None:
        return tuple(missing)
    missing += [f"paho.Client.{name}" for name in _PAHO_STATE if not hasattr(inner, name)]
    if isinstance(client, _Client):
        for hook in ("on_socket_open", "on_socket_register_write"):
            wired = getattr(inner, hook, None)
            if getattr(wired, "__func__", None) is not getattr(_Client, f"_{hook}", None):
                missing.append(f"aiomqtt.Client._{hook} (as paho's {hook})")
    return tuple(missing)


@dataclass(frozen=True, slots=True)
class FastPath:
    """Which path a publisher's messages took: counts since start, and what was missing."""

    #: Library internals missing at the last connect (empty: the fast path was engaged).
    missing: tuple[str, ...]
    #: PUBACKs read straight from paho's packet buffer.
    acks: int
    #: Socket reads by the gateway's own reader (with the quick TCP ACK).
    reads: int
    #: Bursts of publishes written at once from the event loop's thread.
    writes: int


class _Link:
    """One connection's messages handed to paho, by packet id, and their ack watchdog.

    paho reports a QoS 1 message acknowledged on its PUBACK (QoS 0: once written) from
    aiomqtt's reader and writer callbacks, which run on the event loop's thread. Packet
    ids of publishes this link did not make (aiomqtt's own, such as the status) go on to
    aiomqtt's handler. One timer, re-armed, watches the oldest message: the link counts
    as lost once it waited ``ack_timeout`` seconds.
    """

    __slots__ = (
        "_ack",
        "_chained",
        "_client",
        "_fast",
        "_paho_puback",
        "_progress",
        "_progress_due",
        "_thread",
        "_timeout",
        "_timer",
        "_wake",
        "acked",
        "failure",
        "failure_key",
        "fast_acked",
        "flight",
        "loop",
        "paho",
    )

    def __init__(
        self,
        client: aiomqtt.Client,
        *,
        ack_timeout: float,
        ack: Callable[[int], None],
        progress: Callable[[], None],
        wake: Callable[[], None],
    ) -> None:
        """Take over paho's publish acknowledgements of ``client`` (on the loop's thread)."""
        self._client = client
        self.paho: paho.Client = client._client
        #: Packet id -> (queue key, loop time handed to paho); insertion order is send order.
        self.flight: dict[int, tuple[int, float]] = {}
        #: Messages of this link the broker acknowledged (QoS 0: written).
        self.acked = 0
        #: Why the link counts as lost (set by the watchdog), else None.
        self.failure: str | None = None
        #: The :class:`Cause` key of ``failure``.
        self.failure_key = "link"
        self._timeout = ack_timeout
        self._ack = ack
        self._progress = progress
        self._wake = wake
        self._timer: asyncio.TimerHandle | None = None
        self._progress_due = False
        self.loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._chained: Callable[..., object] | None = self.paho.on_publish
        self.paho.on_publish = self.on_publish
        #: PUBACKs of this link handled by the fast path.
        self.fast_acked = 0
        # Without the internals it expects (another paho version), on_publish does it all.
        self._fast = all(hasattr(self.paho, name) for name in _PAHO_STATE)
        if self._fast:
            self._paho_puback: _PubackHandler = self.paho._handle_pubackcomp
            self.paho._handle_pubackcomp = self._on_pubackcomp  # type: ignore[method-assign]

    def _on_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        # paho decodes every PUBACK into ReasonCode and Properties objects and calls
        # on_publish under two locks; the plain 2-byte PUBACK of one of our messages
        # carries nothing but its packet id (MQTT 3.1.1 3.4; MQTT 5 3.4.2.1: success).
        inner = self.paho
        packet = inner._in_packet["packet"]
        if cmd == "PUBACK" and len(packet) == 2 and threading.get_ident() == self._thread:
            mid = (packet[0] << 8) | packet[1]
            entry = self.flight.pop(mid, None)
            if entry is not None:
                # paho's own bookkeeping for an acknowledged message, as in _do_on_publish.
                with inner._out_message_mutex:
                    if inner._out_messages.pop(mid, None) is not None:
                        inner._inflight_messages -= 1
                self.fast_acked += 1
                self._acked(entry[0])
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._paho_puback(cmd)

    def on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        """paho's callback: the broker acknowledged ``mid`` (QoS 0: it was written)."""
        if threading.get_ident() != self._thread:
            # aiomqtt drives paho from the loop's thread; should that change, the queue
            # (not thread-safe) is still only touched there.
            self.loop.call_soon_threadsafe(
                self.on_publish, client, userdata, mid, reason_code, properties
            )
            return
        entry = self.flight.pop(mid, None)
        if entry is not None:
            if getattr(reason_code, "is_failure", False):
                # MQTT 5: the broker refused the message (0x80 and up, e.g. 0x87 not
                # authorised, 0x97 quota exceeded): it was not delivered. Never ack it: the
                # link ends, the message is requeued and sent again after the reconnect
                # backoff; meanwhile the backlog grows where the health check sees it.
                if self.failure is None:
                    self.failure_key = "message-refused"
                    self.failure = (
                        f"the broker refused a message: {reason_code} (reason code "
                        f"{int(reason_code.value)}; check the broker's ACL for this client)"
                    )
                    self._wake()
                return
            self._acked(entry[0])
        elif self._chained is not None:
            self._chained(client, userdata, mid, reason_code, properties)

    def _acked(self, key: int) -> None:
        self._ack(key)
        self.acked += 1
        if not self._progress_due:
            # One read carries many PUBACKs: wake the pump and the flush waiters once.
            self._progress_due = True
            self.loop.call_soon(self._progressed)

    def _progressed(self) -> None:
        self._progress_due = False
        self._progress()

    def arm(self) -> None:
        """Start the watchdog for the oldest message unless it already runs."""
        if self._timer is None and self.flight:
            sent = next(iter(self.flight.values()))[1]
            self._timer = self.loop.call_at(sent + self._timeout, self._check, sent)

    def _check(self, armed_for: float) -> None:
        self._timer = None
        if not self.flight:
            return  # the pump re-arms with its next publish
        sent = next(iter(self.flight.values()))[1]
        if sent <= armed_for:
            # Still the message (or one of its burst) the timer was armed for.
            self.failure_key = "no-ack"
            self.failure = f"no acknowledgement within {self._timeout} s"
            self._wake()
            return
        self._timer = self.loop.call_at(sent + self._timeout, self._check, sent)

    def refused(self, rc: int) -> str:
        """Why paho refused a publish, with the disconnect cause when there is one."""
        text = f"publish refused: {paho.error_string(rc)}"
        if (exc := _disconnect_error(self._client)) is not None:
            text = f"{text} ({_describe(exc)})"
        return text

    def close(self) -> None:
        """Forget the messages in flight, stop the watchdog, give paho's callback back."""
        self.flight.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fast:
            del self.paho._handle_pubackcomp  # the class's method again
            self._fast = False
        if self.paho.on_publish == self.on_publish:
            self.paho.on_publish = self._chained  # type: ignore[assignment]


#: The log event names of MQTT destinations.
MQTT_LOG = SinkLog(
    unreachable="mqtt.broker_unreachable",
    lost="mqtt.broker_connection_lost",
    recovered="mqtt.broker_reconnected",
    connected="mqtt.broker_connected",
    overflow="mqtt.queue_overflow",
    overflow_ended="mqtt.queue_overflow_ended",
    submit_failed="mqtt.submit_failed",
    close_unflushed="mqtt.close_unflushed",
    close_timeout="mqtt.close_timeout",
    closed="mqtt.closed",
    internal="mqtt.publisher_error",
    rejected="mqtt.message_rejected",
)

#: What an MQTT destination takes: events, retained state and the gateway's status.
MQTT_ACCEPTS = Accepts(frozenset({"event", "state", "status"}))


class MqttSink(RunnerCallbacks):
    """One MQTT broker as a :class:`~gateway.delivery.sink.Sink` of :class:`Message`.

    A link is one aiomqtt connection: the last will is registered and the online status
    published retained on :meth:`open`; :meth:`send` hands each message to paho at once and
    the PUBACK acknowledges it (through :class:`_Link`); :meth:`goodbye` publishes the
    offline status and disconnects; :meth:`abort` drops the socket so the broker publishes
    the will.
    """

    kind = "mqtt"
    accepts = MQTT_ACCEPTS
    required = True
    linkless = False
    link_errors: tuple[type[Exception], ...] = (aiomqtt.MqttError, OSError)
    log_names = MQTT_LOG

    def __init__(self, settings: BrokerSettings, *, name: str = "default") -> None:
        """TLS files are loaded here, so mistakes show at start-up."""
        super().__init__()
        self._s = settings
        self._name = name
        self._tls = tls_context(settings.tls) if settings.tls is not None else None
        self._log = log.bind(publisher=name, broker=f"{settings.host}:{settings.port}")
        self._client: aiomqtt.Client | None = None
        self._link: _Link | None = None
        # Acknowledged by links that ended, plus the status messages.
        self._published = 0
        # The fast path: what the last client lacked, and counts of clients and links gone.
        self._fast_missing: tuple[str, ...] = ()
        self._fast_counts = [0, 0, 0]  # acks, reads, writes
        self._fast_client: _Client | None = None

    @property
    def delivered(self) -> int:
        """Messages the broker acknowledged since start (QoS 0: written), status included."""
        link = self._link
        return self._published + (link.acked if link is not None else 0)

    def fast_path(self) -> FastPath:
        """Which path the messages took: the fast one's counts since start, what was missing."""
        acks, reads, writes = self._fast_counts
        if (link := self._link) is not None:
            acks += link.fast_acked
        if (client := self._fast_client) is not None:
            reads += client.fast_reads
            writes += client.fast_writes
        return FastPath(self._fast_missing, acks, reads, writes)

    def classify(self, exc: BaseException) -> Cause:
        """Why a connect failed or a link ended."""
        return classify(exc, self._s.client_id)

    async def open(self) -> None:
        """Connect, publish the online status, take over paho's PUBACK handling."""
        client = self._make_client()
        await self._connect(client)
        self._client = client
        self._link = _Link(
            client,
            ack_timeout=self._s.ack_timeout,
            ack=self._ack,
            progress=self._progress,
            wake=self._wake,
        )

    def check(self) -> None:
        """Raise when the watchdog or a refusing broker ended the link."""
        link = self._link
        if link is not None and link.failure is not None:
            raise LinkLost(link.failure, link.failure_key)

    def send(self, batch: Sequence[tuple[int, Message]]) -> None:
        """Hand the messages to paho; each is acknowledged by its PUBACK (QoS 0: written)."""
        # The hot path: no task, future or timeout per message. paho queues the packets and
        # _Client writes the whole burst once we yield; _Link acks by packet id and one
        # timer watches the oldest message.
        link = self._link
        assert link is not None, "send() before open()"
        flight = link.flight
        publish = link.paho.publish
        now = link.loop.time()
        for key, msg in batch:
            try:
                info = publish(msg.topic, msg.payload, msg.qos, msg.retain)
            except (ValueError, TypeError) as exc:
                # paho refuses it for good (bad topic, payload too large): sending it
                # again after a reconnect would fail the same way.
                self._reject(key, f"{msg.topic}: {_describe(exc)}")
                continue
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise LinkLost(link.refused(info.rc), "closed")
            mid = info.mid
            if mid in flight:
                # paho's packet ids wrapped onto one still unacknowledged.
                raise LinkLost(f"packet id {mid} still in flight")
            flight[mid] = (key, now)
        link.arm()

    async def watch(self) -> None:
        """Raise :class:`LinkLost` when the connection drops."""
        # We subscribe to nothing: the iterator only ends, with MqttError, when the
        # connection drops, which is the one public disconnect signal aiomqtt 2 offers.
        client = self._client
        assert client is not None, "watch() before open()"
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError:
            # "Disconnected during message iteration" says nothing: the disconnect itself
            # carries the reason (an MQTT 5 DISCONNECT's code, else the socket's end).
            exc = _disconnect_error(client)
            value = getattr(getattr(exc, "rc", None), "value", None)
            if value == _RC_SESSION_TAKEN_OVER:
                raise LinkLost(str(getattr(exc, "rc", "")), "session-taken-over") from None
            raise LinkLost(
                "connection closed by the broker or the network"
                + (f" ({_describe(exc)})" if exc is not None else ""),
                "closed",
            ) from None
        raise LinkLost("message stream ended", "closed")

    def release(self) -> None:
        """Forget the messages in flight; give paho's callbacks back."""
        link, self._link = self._link, None
        if link is not None:
            link.close()
            self._published += link.acked
            self._fast_counts[0] += link.fast_acked

    def abort(self) -> None:
        """Drop the socket without DISCONNECT: the broker publishes the last will."""
        client, self._client = self._client, None
        if client is not None:
            _drop_socket(client)

    async def goodbye(self) -> None:
        """Publish the offline status and disconnect cleanly."""
        client, self._client = self._client, None
        if client is None:
            return
        s = self._s
        offline_sent = not s.status_topic
        try:
            if s.status_topic:
                async with asyncio.timeout(max(s.connect_timeout, 1.0)):
                    goodbye = s.offline_status() if s.offline_status else s.offline_payload
                    await client.publish(
                        s.status_topic, goodbye, qos=1, retain=True, timeout=math.inf
                    )
                offline_sent = True
                self._published += 1
            async with asyncio.timeout(s.connect_timeout):
                await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            self._log.warning("mqtt.goodbye_failed", error=_describe(exc))
            _drop_socket(client)
        if not offline_sent:
            # Dropped without DISCONNECT above: the broker publishes the last will instead.
            self._log.info("mqtt.offline_via_will")

    # -- connection internals --

    def _make_client(self) -> aiomqtt.Client:
        s = self._s
        will = None
        if s.status_topic:
            will = aiomqtt.Will(s.status_topic, s.will_payload, qos=1, retain=True)
        v5 = s.protocol == "5"
        client = _Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password_text,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            # The queue is ours: a fresh session each time, everything un-acked is resent.
            clean_session=None if v5 else True,
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            tls_context=self._tls,
            # Unlimited in paho: the pump never hands it more than ``window`` messages, and
            # with a limit paho scans every message in flight on each PUBACK.
            max_inflight_messages=0,
            # Small MQTT packets must not wait for Nagle's algorithm or delayed ACKs.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # aiomqtt warns per publish above 10 pending calls; the window is deliberate.
        client.pending_calls_threshold = s.window + 10
        # paho's blocking connect() runs in a thread; bound it the same way.
        client._client.connect_timeout = s.connect_timeout
        self._check_fast_path(client)
        return client

    def _check_fast_path(self, client: _Client) -> None:
        """Note the new client, and warn once should it lack what the fast path needs."""
        if (old := self._fast_client) is not None:
            self._fast_counts[1] += old.fast_reads
            self._fast_counts[2] += old.fast_writes
        self._fast_client = client
        missing = fast_path_missing(client)
        if missing and missing != self._fast_missing:
            self._log.warning(
                "mqtt.fast_path_unavailable",
                missing=list(missing),
                installed=_installed(FAST_PATH_VERSIONS),
                written_for=FAST_PATH_VERSIONS,
                effect="publishing works through the libraries' own slower paths",
            )
        self._fast_missing = missing

    async def _connect(self, client: aiomqtt.Client) -> None:
        s = self._s
        try:
            # TCP connect and CONNACK are bounded by connect_timeout each; this is a guard.
            async with asyncio.timeout(2 * s.connect_timeout + 1):
                await client.__aenter__()
        except BaseException:
            _drop_socket(client)
            raise
        try:
            if s.status_topic:
                async with asyncio.timeout(s.ack_timeout):
                    await client.publish(
                        s.status_topic, s.online_payload, qos=1, retain=True, timeout=math.inf
                    )
                self._published += 1
        except BaseException:
            _drop_socket(client)
            raise


def runner_settings(settings: BrokerSettings, *, limit: int | None = None) -> RunnerSettings:
    """How the runner feeds one broker: ``window`` in flight, sent at once, no batching."""
    return RunnerSettings(
        batch_size=settings.window,
        flush_interval=0.0,
        max_queue=settings.max_queue,
        backoff=settings.backoff,
        stable_after=settings.stable_after,
        limit=limit,
    )


class MqttPublisher(SinkRunner[Message]):
    """Keeps one broker connection up and sends submitted messages in order.

    The one :class:`~gateway.delivery.sink.SinkRunner` feeding an :class:`MqttSink`, plus
    the message checks of :meth:`submit`.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        name: str = "default",
        queue: SendQueue | None = None,
        limit: int | None = None,
    ) -> None:
        """Set up the publisher; TLS files are loaded here so mistakes show at start-up."""
        super().__init__(
            MqttSink(settings, name=name),
            queue if queue is not None else MemorySinkQueue(settings.max_queue),
            name=name,
            settings=runner_settings(settings, limit=limit),
        )
        self._log = log.bind(publisher=name, broker=f"{settings.host}:{settings.port}")

    @property
    def published(self) -> int:
        """Messages the broker acknowledged since start (QoS 0: written), status included."""
        return self.written

    def fast_path(self) -> FastPath:
        """Which path the messages took (see :meth:`MqttSink.fast_path`)."""
        sink = self.sink
        assert isinstance(sink, MqttSink)
        return sink.fast_path()

    @property
    def dropped(self) -> int:
        """Messages dropped: the queue was full, invalid, or paho refused them for good."""
        return self._dropped + self.rejected

    def submit(self, msg: Message) -> None:
        """Queue a message for sending; never blocks, never raises.

        Call it from the event loop's thread (the queue is not thread-safe).
        """
        try:
            if not msg.topic or msg.qos not in (0, 1, 2) or "+" in msg.topic or "#" in msg.topic:
                self._dropped += 1
                self._log.error("mqtt.invalid_message", topic=msg.topic, qos=msg.qos)
                return
        except Exception:
            self._dropped += 1
            self._log.exception("mqtt.submit_failed", topic=getattr(msg, "topic", None))
            return
        super().submit(msg)


def _installed(names: dict[str, str]) -> dict[str, str]:
    """The installed version of each distribution in ``names`` ("missing" if none)."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _drop_socket(client: aiomqtt.Client) -> None:
    """Close the client's socket without an MQTT DISCONNECT.

    aiomqtt 2 has no abort: its exit sends DISCONNECT (which discards the last will) and
    waits for the broker, and after a failed connect it leaves the socket open. paho's
    ``_sock_close`` also unregisters aiomqtt's reader and stops its timer task.
    """
    with contextlib.suppress(Exception):
        client._client._sock_close()
    # Mark a disconnect error as seen, or asyncio logs "exception was never retrieved".
    _disconnect_error(client)


def _disconnect_error(client: aiomqtt.Client) -> BaseException | None:
    """Why aiomqtt saw the connection end, if it did (None without that internal)."""
    gone: asyncio.Future[None] | None = getattr(client, "_disconnected", None)
    if gone is None or not gone.done() or gone.cancelled():
        return None
    return gone.exception()
