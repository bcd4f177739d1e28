"""The Sparkplug B edge node on the wire: one MQTT session at a time to one broker.

:class:`SparkplugNode` is the narrow interface the runtime sees: :meth:`run` /
:meth:`close`, :meth:`observe` (a machine's mapped samples), :meth:`order_state` (its
tracker snapshot), :meth:`device_lost`, and :meth:`health`. The protocol state lives in
:class:`~gateway.delivery.sparkplug.node.EdgeNode`; this module connects, subscribes and
publishes:

* CONNECT with a clean session and the NDEATH of the new ``bdSeq`` as the last will
  (QoS 1, not retained); subscribe to this node's NCMD and, with a primary host
  application configured, to ``spBv1.0/STATE/{primary_host_id}``.
* Without a primary host: births right after the CONNACK. With one: births once its
  STATE says ``{"online": true}``; a STATE ``online: false`` (or one older than the last
  seen, by its ``timestamp``, ignored) makes the node publish its NDEATH, disconnect and
  connect again, holding changes until the host is back (Sparkplug 3.0, host
  application awareness). Held changes are replayed with ``is_historical`` after the
  births.
* BIRTH, DATA and DEATH go at QoS 0, not retained; the explicit NDEATH of a clean stop at
  QoS 1. Over plain TCP the QoS 0 messages are written as whole PUBLISH packets, a batch
  per ``send``, when paho has nothing pending (:meth:`SparkplugNode._write_direct`);
  otherwise, and always over TLS, paho writes them.
* aiomqtt connects, subscribes and delivers STATE and NCMD; its paho client is used
  directly for QoS 0 (no future per message) and with ``on_publish`` off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode

from gateway.core.model import Sample
from gateway.core.routing import OperatorPolicy
from gateway.delivery.mqtt.publisher import BrokerSettings, tls_context
from gateway.delivery.sparkplug import codec
from gateway.delivery.sparkplug.node import NAMESPACE, REBIRTH, EdgeNode, valid_id

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SparkplugSettings:
    """One ``format: sparkplug`` destination, ready to run."""

    name: str
    broker: BrokerSettings
    group_id: str
    edge_node_id: str
    #: Hold publishing until this host application's STATE says online; ``None``: do not wait.
    primary_host_id: str | None = None
    operator: OperatorPolicy = "drop"
    #: Changes held at most while not live (oldest dropped first, counted).
    max_held: int = 100_000
    #: Where the last ``bdSeq`` is kept, so a restarted process goes on counting (its old
    #: session's NDEATH, published late by the broker, then never matches the new NBIRTH);
    #: ``None``: every process starts at 0.
    state_file: Path | None = None

    def __post_init__(self) -> None:
        """Reject ids Sparkplug does not allow, naming the field."""
        for what, value in (
            ("group_id", self.group_id),
            ("edge_node_id", self.edge_node_id),
            ("primary_host_id", self.primary_host_id),
        ):
            if value is None:
                continue
            problem = valid_id(value)
            if problem:
                raise ValueError(f"{what} {value!r} {problem}")


#: Messages written at once before waiting for the socket to take them.
PUMP_BATCH = 64


def publish_packet(topic: str, payload: bytes, *, v5: bool = False) -> bytes:
    """An MQTT PUBLISH packet at QoS 0, not retained (no packet id; MQTT 5: no properties)."""
    name = topic.encode()
    props = b"\x00" if v5 else b""
    rest = 2 + len(name) + len(props) + len(payload)
    # The remaining length is a base-128 varint, as protobuf's.
    return b"\x30" + codec.varint(rest) + len(name).to_bytes(2, "big") + name + props + payload


class _Restart(Exception):
    """The session ends on purpose (the primary host went offline): connect again."""


class SparkplugNode:
    """A Sparkplug B 3.0 edge node publishing the gateway's machines as devices."""

    def __init__(
        self,
        settings: SparkplugSettings,
        *,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.node = EdgeNode(
            settings.group_id,
            settings.edge_node_id,
            operator=settings.operator,
            secret=secret,
            max_held=settings.max_held,
        )
        self._clock = clock
        self.node.bd_seq = self._load_bd_seq()
        self._wake = asyncio.Event()
        #: Set whenever the session, the host's state or the held data change (for waiters).
        self.changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._client: aiomqtt.Client | None = None
        self._tls = tls_context(settings.broker.tls) if settings.broker.tls else None
        self.connected = False
        #: Whether the primary host application is online (always true without one).
        self.host_online = settings.primary_host_id is None
        self._host_timestamp = -1
        self._warned: set[str] = set()
        #: Feeding calls that failed (logged once per machine and kind).
        self.feed_errors = 0
        self.published = 0
        self.published_bytes = 0
        #: Bytes of the PUBLISH packets written (what the broker receives).
        self.wire_bytes = 0
        self.lost = 0
        self.last_error: str | None = None
        self.state_topic = (
            f"{NAMESPACE}/STATE/{settings.primary_host_id}" if settings.primary_host_id else None
        )

    # ------------------------------------------------------------------ feeding

    # The feeding calls run inside the runtime's poll handling: they never raise, so a
    # problem here costs this destination a value, never a machine its poll.

    def observe(self, machine: str, samples: Iterable[Sample]) -> None:
        """A machine's mapped samples."""
        try:
            self.node.observe(machine, samples)
        except Exception as exc:
            self._failed(machine, exc)
        self._fed()

    def order_state(self, machine: str, snapshot: Mapping[str, Any]) -> None:
        """A machine's tracker snapshot: its order metrics."""
        try:
            self.node.order_state(machine, snapshot)
        except Exception as exc:
            self._failed(machine, exc)
        self._fed()

    def device_lost(self, machine: str) -> None:
        """A machine stopped answering: DDEATH."""
        try:
            self.node.device_lost(machine, self._clock())
        except Exception as exc:
            self._failed(machine, exc)
        self._fed()

    def _fed(self) -> None:
        if self.node.outgoing:
            self._wake.set()
        self.changed.set()

    def _failed(self, machine: str, exc: Exception) -> None:
        self.feed_errors += 1
        # Once per machine and kind of problem: a bad value arrives every poll.
        key = f"{machine}:{type(exc).__name__}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "sparkplug.machine_skipped",
                destination=self.name,
                machine=machine,
                error=f"{type(exc).__name__}: {exc}",
            )

    def health(self) -> dict[str, Any]:
        """What the health endpoint and the console show about this edge node."""
        return {
            "connected": self.connected,
            "host_online": self.host_online,
            "live": self.node.live,
            "bd_seq": self.node.bd_seq,
            "published": self.published,
            "published_bytes": self.published_bytes,
            "wire_bytes": self.wire_bytes,
            "held": self.node.held,
            "held_dropped": self.node.held_dropped,
            "lost": self.lost,
            "feed_errors": self.feed_errors,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Keep a session up until :meth:`close`; reconnect with backoff."""
        self._running = True
        self._done.clear()
        try:
            await self._run()
        finally:
            self._running = False
            self._done.set()

    async def _run(self) -> None:
        attempt = 0
        backoff = self.settings.broker.backoff
        while not self._stop.is_set():
            started = self._clock()
            try:
                await self._session()
            except _Restart:
                attempt = 0
                continue
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("sparkplug.link_lost", destination=self.name, error=self.last_error)
            finally:
                self.connected = False
                self.lost += self.node.go_offline()
                self.host_online = self.settings.primary_host_id is None
                self.changed.set()
            if self._stop.is_set():
                break
            if self._clock() - started > 30.0:
                attempt = 0
            delay = backoff.delay(attempt)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def close(self, timeout: float = 3.0) -> None:  # noqa: ASYNC109 - a grace period
        """Publish the NDEATH (a clean stop announces itself) and end :meth:`run`."""
        client = self._client
        if client is not None and self.connected:
            self._publish_ndeath(client)
        self._stop.set()
        self._wake.set()
        if self._running:
            # The session's end sends the NDEATH, then the DISCONNECT.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._done.wait()

    def _make_client(self, will_payload: bytes) -> aiomqtt.Client:
        b = self.settings.broker
        v5 = b.protocol == "5"
        client = aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.password_text,
            identifier=b.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.node.topic_ndeath, will_payload, qos=1, retain=False),
            # Sparkplug 3.0: a clean session (MQTT 5: clean start, session expiry 0).
            clean_session=None if v5 else True,
            keepalive=b.keepalive,
            timeout=b.connect_timeout,
            tls_context=self._tls,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        client.pending_calls_threshold = 10_000
        return client

    def _load_bd_seq(self) -> int:
        """The last session's ``bdSeq`` (-1: none, the first session is 0)."""
        path = self.settings.state_file
        if path is None or not path.exists():
            return -1
        try:
            value = int(path.read_text().strip())
            if not 0 <= value <= 255:
                raise ValueError(f"{value} is not 0..255")
        except (OSError, ValueError) as exc:
            log.warning(
                "sparkplug.bdseq_unreadable", destination=self.name, path=str(path), error=str(exc)
            )
            return -1
        return value

    def _save_bd_seq(self) -> None:
        path = self.settings.state_file
        if path is None:
            return
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(f"{self.node.bd_seq}\n")
            os.replace(tmp, path)
        except OSError as exc:
            # Not fatal: the session still works, a restart would count from 0 again.
            log.warning(
                "sparkplug.bdseq_not_saved", destination=self.name, path=str(path), error=str(exc)
            )

    async def _session(self) -> None:
        will = self.node.new_session(self._clock())
        self._save_bd_seq()
        client = self._make_client(will)
        b = self.settings.broker
        async with asyncio.timeout(2 * b.connect_timeout + 1):
            await client.__aenter__()
        self._client = client
        # Nothing here waits for paho's on_publish (DATA goes at QoS 0, the NDEATH is
        # followed by the DISCONNECT): without the callback paho builds no ReasonCode and
        # Properties objects per message written, the largest cost per DDATA otherwise.
        client._client.on_publish = None
        try:
            await client.subscribe(self.node.topic_ncmd, qos=1)
            if self.state_topic is not None:
                await client.subscribe(self.state_topic, qos=1)
            # Connected once subscribed: no STATE or NCMD from then on is missed.
            self.connected = True
            self.last_error = None
            self.changed.set()
            log.info(
                "sparkplug.connected",
                destination=self.name,
                broker=f"{b.host}:{b.port}",
                bd_seq=self.node.bd_seq,
                primary_host=self.settings.primary_host_id,
            )
            if self.state_topic is None:
                self.node.go_live(self._clock())
                self._wake.set()
            async with asyncio.TaskGroup() as tg:
                listener = tg.create_task(self._listen(client))
                pump = tg.create_task(self._pump(client))
                await self._stop.wait()
                listener.cancel()
                pump.cancel()
        except* _Restart:
            raise _Restart() from None
        except* (aiomqtt.MqttError, OSError, TimeoutError) as group:
            raise group.exceptions[0] from None
        finally:
            self._client = None
            self.connected = False
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def _pump(self, client: aiomqtt.Client) -> None:
        out = self.node.outgoing
        paho_client = client._client
        v5 = self.settings.broker.protocol == "5"
        while True:
            await self._wake.wait()
            self._wake.clear()
            while out:
                batch = [out.popleft() for _ in range(min(len(out), PUMP_BATCH))]
                packets = [publish_packet(m.topic, m.payload, v5=v5) for m in batch]
                if not self._write_direct(paho_client, packets):
                    for m in batch:
                        info = paho_client.publish(m.topic, m.payload, 0)
                        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
                self.published += len(batch)
                self.published_bytes += sum(len(m.payload) for m in batch)
                self.wire_bytes += sum(map(len, packets))
                await self._drained(paho_client)

    def _write_direct(self, paho_client: Any, packets: list[bytes]) -> bool:
        """Write a batch of QoS 0 PUBLISH packets in one ``send``; False: paho must send it.

        One system call and no paho bookkeeping per batch instead of per message: paho's
        publish costs about 50 us a message, two thirds of the node's CPU at 500 DDATA/s
        (bench/sparkplug.py). Safe only while paho holds nothing unwritten (it may hold a
        half-written packet), and a QoS 0 packet needs no state in paho. A write that
        the socket takes only in part ends the session: the rest cannot be handed to paho,
        and anything written after it would corrupt the stream.
        """
        if self._tls is not None or paho_client.want_write():
            # Over TLS an SSL_write that would block must be retried with the same bytes,
            # which a fallback to paho would not do: TLS always goes through paho.
            return False
        sock = paho_client.socket()
        if sock is None:
            raise aiomqtt.MqttError("no socket: the connection is closed")
        data = b"".join(packets)
        try:
            sent: int = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise aiomqtt.MqttError(f"could not write to the broker: {exc}") from exc
        if sent != len(data):
            raise aiomqtt.MqttError(
                f"the socket took {sent} of {len(data)} bytes: reconnecting to resynchronise"
            )
        return True

    async def _drained(self, paho_client: Any) -> None:
        """Wait until paho wrote what it holds (its writer runs on this loop).

        What waits stays in the node's queue, not in paho's; a broker that takes nothing
        for a keepalive period ends the session.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.broker.keepalive
        await asyncio.sleep(0)
        while paho_client.want_write():
            if loop.time() > deadline:
                raise aiomqtt.MqttError("the broker took no data for a keepalive period")
            # paho has no event for "written"; its socket writer runs between these naps.
            await asyncio.sleep(0.002)

    def _publish_ndeath(self, client: aiomqtt.Client) -> None:
        """Queue the explicit NDEATH (QoS 1); the DISCONNECT that follows goes after it."""
        client._client.publish(self.node.topic_ndeath, self.node.ndeath(self._clock()), 1)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic == self.node.topic_ncmd:
                self._on_ncmd(payload)
            elif topic == self.state_topic:
                await self._on_state(client, payload)

    def _on_ncmd(self, payload: bytes) -> None:
        try:
            decoded = codec.decode(payload)
        except codec.DecodeError as exc:
            log.warning("sparkplug.ncmd_rejected", destination=self.name, reason=str(exc))
            return
        for m in decoded.metrics:
            if m.name == REBIRTH and m.value is True:
                log.info("sparkplug.rebirth_requested", destination=self.name)
                self.node.rebirth(self._clock())
                self._wake.set()
            else:
                log.info(
                    "sparkplug.ncmd_ignored",
                    destination=self.name,
                    metric=m.name,
                    reason="only Node Control/Rebirth is supported",
                )

    async def _on_state(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            state = json.loads(payload)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            online = state["online"]
            stamp = state.get("timestamp", 0)
            if not isinstance(online, bool) or not isinstance(stamp, int):
                raise ValueError("online must be a boolean and timestamp an integer")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "sparkplug.state_rejected",
                destination=self.name,
                payload=payload[:200].decode(errors="replace"),
                reason=f'expected {{"online": true|false, "timestamp": ms}}: {exc}',
            )
            return
        if stamp < self._host_timestamp:
            # An older STATE than one already seen (Sparkplug 3.0: ignore it).
            return
        self._host_timestamp = stamp
        self.changed.set()
        if online and not self.host_online:
            self.host_online = True
            log.info("sparkplug.host_online", destination=self.name, held=self.node.held)
            self.node.go_live(self._clock())
            self._wake.set()
        elif not online and self.host_online:
            self.host_online = False
            log.warning("sparkplug.host_offline", destination=self.name)
            # Sparkplug 3.0: the edge node publishes its NDEATH, disconnects and connects
            # again, then waits for the host to come back.
            self.lost += self.node.go_offline()
            self._publish_ndeath(client)
            raise _Restart()
