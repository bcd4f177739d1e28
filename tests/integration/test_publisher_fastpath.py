"""The publisher's send path: paho directly, a window of packet ids, one ack watchdog.

A small MQTT-aware TCP proxy between the publisher and Mosquitto reads the packets on the
wire, so the tests count what is really in flight (PUBLISH sent, PUBACK not yet back) and
can hold the broker's acknowledgements back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest
import structlog

from gateway.core.backoff import Backoff
from gateway.delivery.mqtt import publisher
from gateway.delivery.mqtt.publisher import (
    FAST_PATH_VERSIONS,
    BrokerSettings,
    Message,
    MqttPublisher,
)
from tests.brokers import MosquittoBroker, Subscriber
from tests.integration.test_publisher import covers, first_occurrences, numbered, running, until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

FAST = Backoff(base=0.01, cap=0.05, floor=0.005)
STATUS = "fp/gateway/status"

_PUBLISH, _PUBACK = 3, 4


def settings(port: int, **overrides: Any) -> BrokerSettings:
    """Publisher settings for a test broker: tiny backoff, a status topic and a will."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": f"fastpath-{port}",
        "status_topic": STATUS,
        "online_payload": b"online",
        "will_payload": b"offline",
        "offline_payload": b"offline",
        "backoff": FAST,
        "connect_timeout": 2.0,
    }
    values.update(overrides)
    return BrokerSettings(**values)


class _Frames:
    """Splits one direction of an MQTT byte stream into (packet type, flags, body)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        out: list[tuple[int, int, bytes]] = []
        while True:
            buf = self._buf
            if len(buf) < 2:
                return out
            length, mult, i = 0, 1, 1
            while True:
                if i >= len(buf):
                    return out
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if len(buf) < i + length:
                return out
            out.append((buf[0] >> 4, buf[0] & 0x0F, bytes(buf[i : i + length])))
            del buf[: i + length]


class MqttWindowProxy:
    """Forwards one MQTT client to a broker and counts QoS 1 packet ids in flight.

    ``hold_acks`` keeps everything the broker sends back (PUBACKs included) until
    ``release_acks``; ``in_flight`` and ``max_in_flight`` are per connection and overall.
    """

    def __init__(self, host: str, port: int) -> None:
        """Prepare; nothing listens until ``async with``."""
        self.target = (host, port)
        self.port = 0
        self.in_flight: set[int] = set()
        self.max_in_flight = 0
        #: (QoS, payload) of every PUBLISH from the client, in wire order.
        self.sent: list[tuple[int, bytes]] = []
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def hold_acks(self) -> None:
        """Stop forwarding broker → client."""
        self._open.clear()

    def release_acks(self) -> None:
        """Forward broker → client again, held bytes first."""
        self._open.set()

    async def __aenter__(self) -> Self:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening and close every forwarded connection."""
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        b_reader, b_writer = await asyncio.open_connection(*self.target)
        self._writers += [c_writer, b_writer]
        self.in_flight = set()  # packet ids are per connection
        up = asyncio.create_task(self._pipe(c_reader, b_writer, self._saw_up))
        down = asyncio.create_task(self._pipe(b_reader, c_writer, self._saw_down, gate=True))
        self._tasks |= {up, down}
        with contextlib.suppress(Exception):
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for w in (c_writer, b_writer):
            w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        saw: Callable[[int, int, bytes], None],
        *,
        gate: bool = False,
    ) -> None:
        frames = _Frames()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if gate:
                    await self._open.wait()
                for kind, flags, body in frames.feed(data):
                    saw(kind, flags, body)
                writer.write(data)
                await writer.drain()

    def _saw_up(self, kind: int, flags: int, body: bytes) -> None:
        if kind != _PUBLISH:
            return
        qos = (flags >> 1) & 3
        topic_end = 2 + int.from_bytes(body[:2])
        self.sent.append((qos, body[topic_end + (2 if qos else 0) :]))
        if qos:
            self.in_flight.add(int.from_bytes(body[topic_end : topic_end + 2]))
            self.max_in_flight = max(self.max_in_flight, len(self.in_flight))

    def _saw_down(self, kind: int, flags: int, body: bytes) -> None:
        if kind == _PUBACK:
            self.in_flight.discard(int.from_bytes(body[:2]))


async def test_window_is_never_exceeded_on_the_wire(mosquitto: MosquittoBroker) -> None:
    n, window = 3000, 8
    async with (
        MqttWindowProxy(mosquitto.host, mosquitto.port) as proxy,
        Subscriber(mosquitto.host, mosquitto.port, "fp/ev") as sub,
    ):
        pub = MqttPublisher(settings(proxy.port, window=window))
        async with running(pub):
            await until(lambda: pub.connected)
            proxy.hold_acks()
            for i in range(n):
                pub.submit(Message("fp/ev", b"m%d" % i))
            # With every PUBACK held back, exactly one window's worth goes out.
            await until(lambda: len(proxy.in_flight) == window)
            assert pub.pending == n
            proxy.release_acks()
            got = await sub.wait_for(covers(n), 10)
            assert await pub.flush(5.0)
    assert proxy.max_in_flight == window
    assert numbered(got) == list(range(n))


async def test_qos0_and_qos1_mixed_keep_their_order(mosquitto: MosquittoBroker) -> None:
    n = 3000
    async with (
        MqttWindowProxy(mosquitto.host, mosquitto.port) as proxy,
        Subscriber(mosquitto.host, mosquitto.port, "fp/mixed") as sub,
    ):
        pub = MqttPublisher(settings(proxy.port, window=20))
        async with running(pub):
            for i in range(n):
                # Runs of QoS 0 between QoS 1 messages: acked on write vs. on PUBACK.
                pub.submit(Message("fp/mixed", b"m%d" % i, qos=0 if i % 7 < 3 else 1))
            assert await pub.flush(10.0)
            got = await sub.wait_for(covers(n), 10)
    # The order on the wire is the publisher's; Mosquitto itself may deliver a QoS 0
    # message ahead of QoS 1 ones waiting for the subscriber's in-flight slots.
    wire = [(qos, int(payload[1:])) for qos, payload in proxy.sent if payload.startswith(b"m")]
    assert wire == [(0 if i % 7 < 3 else 1, i) for i in range(n)]
    assert sorted(numbered(got)) == list(range(n))
    assert pub.pending == 0


async def test_twenty_thousand_messages_arrive_exactly_once(mosquitto: MosquittoBroker) -> None:
    n = 20_000
    async with Subscriber(mosquitto.host, mosquitto.port, "fp/bulk/#") as sub:
        pub = MqttPublisher(settings(mosquitto.port, window=100, max_queue=n))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(n):
                    pub.submit(Message(f"fp/bulk/m{i % 50}", b"m%d" % i))
                assert await pub.flush(20.0)
                got = await sub.wait_for(covers(n), 20)
    assert numbered(got) == list(range(n)), "exactly once, in order"
    assert pub.dropped == 0
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


async def test_a_broker_that_stops_acking_trips_the_watchdog_and_loses_nothing(
    tmp_path: Path,
) -> None:
    ack_timeout = 0.5
    broker = MosquittoBroker(tmp_path / "broker")
    with broker:
        proc = broker._proc  # the process to freeze: the test owns this broker
        assert proc is not None
        async with Subscriber(broker.host, broker.port, "fp/stop", session="fp-stop") as sub:
            pub = MqttPublisher(
                settings(broker.port, window=10, ack_timeout=ack_timeout, connect_timeout=0.5)
            )
            with structlog.testing.capture_logs() as logs:
                async with running(pub):
                    for i in range(20):
                        pub.submit(Message("fp/stop", b"m%d" % i))
                    assert await pub.flush(5.0)
                    loop = asyncio.get_running_loop()
                    os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        stopped_at = loop.time()
                        for i in range(20, 50):
                            pub.submit(Message("fp/stop", b"m%d" % i))
                        await until(lambda: not pub.connected, timeout=5 * ack_timeout)
                        noticed = loop.time() - stopped_at
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
                    got = await sub.wait_for(covers(50), 15)
                    assert await pub.flush(10.0)
    assert ack_timeout * 0.9 <= noticed <= ack_timeout + 1.0, noticed
    lost = [e for e in logs if e["event"] == "mqtt.broker_connection_lost"]
    assert lost
    assert f"no acknowledgement within {ack_timeout} s" in lost[0]["error"]
    assert first_occurrences(numbered(got)) == list(range(50)), "nothing lost, order kept"
    assert len(numbered(got)) - 50 <= 10 + 30, "duplicates only from resending"


async def test_a_slow_steady_stream_does_not_trip_the_watchdog(mosquitto: MosquittoBroker) -> None:
    # The watchdog times the oldest message in flight, not the connection: a stream that
    # lasts many ack_timeouts with every PUBACK on time never counts as stuck.
    ack_timeout = 0.3
    async with Subscriber(mosquitto.host, mosquitto.port, "fp/slow") as sub:
        pub = MqttPublisher(settings(mosquitto.port, ack_timeout=ack_timeout))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(12):
                    pub.submit(Message("fp/slow", b"m%d" % i))
                    # Paces the producer (this is the load, not synchronisation).
                    await asyncio.sleep(ack_timeout / 3)
                assert await pub.flush(5.0)
                got = await sub.wait_for(covers(12), 5)
    assert numbered(got) == list(range(12))
    assert not [e for e in logs if e["event"] == "mqtt.broker_connection_lost"]


async def test_a_message_paho_refuses_is_dropped_not_retried(mosquitto: MosquittoBroker) -> None:
    async with Subscriber(mosquitto.host, mosquitto.port, "fp/ok") as sub:
        pub = MqttPublisher(settings(mosquitto.port))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                pub.submit(Message("fp/" + "x" * 70_000, b"too long a topic for MQTT"))
                pub.submit(Message("fp/ok", b"m0"))
                assert await pub.flush(5.0)
                await sub.wait_for(covers(1), 5)
    assert pub.dropped == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["mqtt.message_rejected"]
    assert not [e for e in logs if e["event"] == "mqtt.broker_connection_lost"]


def test_window_must_fit_the_mqtt_packet_ids() -> None:
    with pytest.raises(ValueError, match="window"):
        BrokerSettings("h", window=70_000, max_queue=100_000)


async def test_a_message_the_broker_refuses_is_kept_and_sent_again(tmp_path: Path) -> None:
    # MQTT 5: Mosquitto answers a publish its ACL denies with PUBACK reason 0x87 (not
    # authorised). That message was not delivered: it must not leave the queue, the link
    # ends with the reason in the log, and once the ACL allows it the message goes out.
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {STATUS}\ntopic readwrite fp/open/#\n")
    broker = MosquittoBroker(tmp_path / "broker", extra_config=f"acl_file {acl}")
    broker.start()
    try:
        pub = MqttPublisher(settings(broker.port, protocol="5"), name="acl")
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                await until(lambda: pub.connected)
                pub.submit(Message("fp/open/a", b"m0", qos=1))
                pub.submit(Message("fp/closed/b", b"m1", qos=1))
                await until(lambda: any("refused a message" in str(e) for e in logs), 10)
                # Not acknowledged, so not gone: still pending, and after it the rest waits.
                assert pub.pending >= 1
                # The site fixes the ACL (a broker restart reads it again): the message
                # goes out again and this time the broker accepts it.
                acl.write_text(f"topic readwrite {STATUS}\ntopic readwrite fp/#\n")
                broker.stop()
                broker.start()
                await until(lambda: pub.pending == 0, 15)
                assert pub.dropped == 0
        lost = [e for e in logs if e.get("event") == "mqtt.broker_connection_lost"]
        assert lost, logs
        assert "refused a message" in str(lost[0]["error"]), lost[0]
        assert "ACL" in str(lost[0]["error"]), lost[0]
    finally:
        broker.stop()


# --- the fast path reads private internals of paho-mqtt and aiomqtt ------------------------


def test_the_installed_libraries_are_the_ones_the_fast_path_was_written_for() -> None:
    # pyproject.toml pins exactly these; a version bump must re-check the internals.
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in FAST_PATH_VERSIONS.items():
        assert f"{name}=={version}" in pins, f"pyproject.toml must pin {name}=={version}"
        assert importlib.metadata.version(name) == version


async def test_the_fast_path_is_engaged_with_a_real_broker(mosquitto: MosquittoBroker) -> None:
    n = 200
    async with Subscriber(mosquitto.host, mosquitto.port, "fp/engaged") as sub:
        pub = MqttPublisher(settings(mosquitto.port, window=20))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(n):
                    pub.submit(Message("fp/engaged", b"m%d" % i))
                assert await pub.flush(5.0)
                await sub.wait_for(covers(n), 5)
                used = pub.fast_path()
    assert used.missing == ()
    # Every PUBACK of ours was read from paho's buffer; the online status is aiomqtt's own.
    assert used.acks == n
    assert used.reads > 0, "the reader with the quick TCP ACK was not used"
    assert used.writes > 0, "bursts were not written from the loop's thread"
    assert not [e for e in logs if e["event"] == "mqtt.fast_path_unavailable"]


async def test_without_the_internals_it_warns_once_and_falls_back(
    mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if a newer paho had renamed one of the internals the fast path keeps in step.
    monkeypatch.setattr(publisher, "_PAHO_STATE", (*publisher._PAHO_STATE, "_renamed_in_paho"))
    n = 50
    async with Subscriber(mosquitto.host, mosquitto.port, "fp/fallback") as sub:
        pub = MqttPublisher(settings(mosquitto.port, window=20))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(n):
                    pub.submit(Message("fp/fallback", b"m%d" % i))
                assert await pub.flush(5.0)
                got = await sub.wait_for(covers(n), 5)
                used = pub.fast_path()
    assert numbered(got) == list(range(n)), "the libraries' own path delivers everything"
    assert used.missing == ("paho.Client._renamed_in_paho",)
    assert used.acks == 0
    warned = [e for e in logs if e["event"] == "mqtt.fast_path_unavailable"]
    assert len(warned) == 1, warned
    assert warned[0]["log_level"] == "warning"
    assert warned[0]["missing"] == ["paho.Client._renamed_in_paho"]
    assert warned[0]["written_for"] == FAST_PATH_VERSIONS


async def test_a_renamed_aiomqtt_hook_counts_as_missing() -> None:
    # aiomqtt hands paho its socket callbacks by name; should it rename one, the gateway's
    # override would go unused without any error. Here aiomqtt's own writer is wired.
    client = publisher._Client("127.0.0.1", 1)
    assert publisher.fast_path_missing(client) == ()
    client._client.on_socket_register_write = aiomqtt.Client._on_socket_register_write.__get__(
        client
    )
    assert publisher.fast_path_missing(client) == (
        "aiomqtt.Client._on_socket_register_write (as paho's on_socket_register_write)",
    )
