"""Integration tests of the MQTT publisher against a real Mosquitto broker."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.contract.envelope import encode_status
from gateway.core.backoff import Backoff
from gateway.delivery.mqtt.publisher import (
    BrokerSettings,
    Message,
    MqttPublisher,
    TlsSettings,
)
from gateway.delivery.sendqueue import MemorySinkQueue
from tests.brokers import MosquittoBroker, Received, Subscriber, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

STATUS = "t/site/gateway/gw-test/status"
FAST = Backoff(base=0.01, cap=0.05, floor=0.005)


def _status(status: str, reason: str | None = None) -> bytes:
    return encode_status(
        status,  # type: ignore[arg-type]
        gateway_id="gw-test",
        version="0.0.0",
        started_at=0.0,
        now=1.0,
        reason=reason,
    )


def settings(port: int, **overrides: Any) -> BrokerSettings:
    """Publisher settings for a test broker: tiny backoff, status topic and will set."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": f"pub-{port}",
        "status_topic": STATUS,
        "online_payload": _status("online"),
        "will_payload": _status("offline", "connection lost"),
        "offline_payload": _status("offline", "shutdown"),
        "backoff": FAST,
        "connect_timeout": 2.0,
        "window": 20,
    }
    values.update(overrides)
    return BrokerSettings(**values)


@asynccontextmanager
async def running(pub: MqttPublisher) -> AsyncIterator[asyncio.Task[None]]:
    """Run the publisher in a task; close it (bounded) and reap the task afterwards."""
    task = asyncio.create_task(pub.run(), name="publisher")
    try:
        yield task
    finally:
        await pub.close(timeout=2.0)
        # run() ends by itself after close().
        async with asyncio.timeout(3):
            await task


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Wait until ``cond()`` holds, re-checking every millisecond (no event to wait on)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - publisher state has no change notification
            await asyncio.sleep(0.001)


def numbered(messages: list[Received], prefix: bytes = b"m") -> list[int]:
    """The numbers of ``m<n>`` payloads in arrival order."""
    return [int(m.payload[len(prefix) :]) for m in messages if m.payload.startswith(prefix)]


def covers(n: int) -> Callable[[list[Received]], bool]:
    """A wait_for predicate: every ``m0`` .. ``m<n-1>`` arrived (incremental, O(new))."""
    seen: set[int] = set()
    done = 0

    def pred(messages: list[Received]) -> bool:
        nonlocal done
        seen.update(numbered(messages[done:]))
        done = len(messages)
        return seen >= set(range(n)) if len(seen) >= n else False

    return pred


def first_occurrences(values: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


async def test_messages_arrive_in_order_with_qos1(mosquitto: MosquittoBroker) -> None:
    n = 500
    async with Subscriber(mosquitto.host, mosquitto.port, "t/ev/#") as sub:
        pub = MqttPublisher(settings(mosquitto.port))
        async with running(pub):
            for i in range(n):
                pub.submit(Message(f"t/ev/{i % 3}", b"m%d" % i))
            assert await pub.flush(5.0)
            assert pub.pending == 0
            got = await sub.wait_for(lambda ms: len(ms) >= n)
    assert numbered(got) == list(range(n))
    assert all(not m.retain for m in got)
    assert pub.dropped == 0


async def test_online_status_first_and_offline_on_close(mosquitto: MosquittoBroker) -> None:
    async with Subscriber(mosquitto.host, mosquitto.port, "t/#") as sub:
        pub = MqttPublisher(settings(mosquitto.port))
        task = asyncio.create_task(pub.run())
        pub.submit(Message("t/ev/x", b"m0"))
        got = await sub.wait_for(lambda ms: len(ms) >= 2)
        assert [m.topic for m in got[:2]] == [STATUS, "t/ev/x"]
        assert json.loads(got[0].payload)["status"] == "online"
        assert pub.connected
        await pub.close(timeout=2.0)
        async with asyncio.timeout(2):
            await task  # run() ends by itself after close()
        assert not pub.connected
        got = await sub.wait_for(lambda ms: len(ms) >= 3)
        assert json.loads(got[2].payload)["reason"] == "shutdown"
    # The retained status a late joiner sees is the clean offline one.
    async with Subscriber(mosquitto.host, mosquitto.port, STATUS) as late:
        got = await late.wait_for(lambda ms: len(ms) >= 1)
        assert got[0].retain
        assert json.loads(got[0].payload)["reason"] == "shutdown"


async def test_retained_state_reaches_a_late_subscriber(mosquitto: MosquittoBroker) -> None:
    pub = MqttPublisher(settings(mosquitto.port))
    async with running(pub):
        for i in range(5):
            pub.submit(Message("t/m1/state", b"s%d" % i, retain=True))
        assert await pub.flush(5.0)
    async with Subscriber(mosquitto.host, mosquitto.port, "t/+/state") as late:
        got = await late.wait_for(lambda ms: len(ms) >= 1)
    assert got == [Received("t/m1/state", b"s4", True)]


async def test_broker_down_at_start(mosquitto: MosquittoBroker) -> None:
    # The subscriber's persistent session outlives the outage, so it gets everything
    # even if the publisher reconnects first.
    async with Subscriber(mosquitto.host, mosquitto.port, "t/ev", session="sub-down") as sub:
        mosquitto.stop()
        pub = MqttPublisher(settings(mosquitto.port))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(50):
                    pub.submit(Message("t/ev", b"m%d" % i))
                # Keep retrying a while: several attempts, one warning.
                await until(lambda: sum(e["event"] == "mqtt.broker_unreachable" for e in logs) >= 5)
                assert not pub.connected
                assert pub.pending == 50
                mosquitto.start()
                got = await sub.wait_for(lambda ms: len(ms) >= 50)
                assert numbered(got) == list(range(50))
                assert await pub.flush(2.0)
                assert pub.connected
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["mqtt.broker_unreachable"]
    recovered = [e for e in logs if e["event"] == "mqtt.broker_reconnected"]
    assert len(recovered) == 1
    assert recovered[0]["attempts"] >= 5
    assert recovered[0]["outage_s"] > 0


async def test_broker_restart_mid_stream_loses_nothing(mosquitto: MosquittoBroker) -> None:
    n, window = 5000, 20
    async with Subscriber(mosquitto.host, mosquitto.port, "t/ev", session="sub-restart") as sub:
        pub = MqttPublisher(settings(mosquitto.port, window=window))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(n):
                    pub.submit(Message("t/ev", b"m%d" % i))
                await until(lambda: pub.pending <= n - n // 4)
                mosquitto.stop()
                assert 0 < pub.pending < n
                mosquitto.start()
                got = await sub.wait_for(covers(n), 10)
                assert await pub.flush(5.0)
    values = numbered(got)
    assert first_occurrences(values) == list(range(n))
    assert len(values) - n <= window
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "mqtt.broker_connection_lost"
    ]
    assert sum(e["event"] == "mqtt.broker_reconnected" for e in logs) == 1


async def test_last_will_when_connection_dies_without_close(mosquitto: MosquittoBroker) -> None:
    async with Subscriber(mosquitto.host, mosquitto.port, STATUS) as sub:
        pub = MqttPublisher(settings(mosquitto.port))
        task = asyncio.create_task(pub.run())
        await sub.wait_for(lambda ms: len(ms) >= 1)
        assert json.loads(sub.messages[0].payload)["status"] == "online"
        # Cancelling run() is the crash path: no DISCONNECT, so the broker sends the will.
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await sub.wait_for(lambda ms: len(ms) >= 2)
        assert json.loads(got[1].payload)["reason"] == "connection lost"


async def test_last_will_when_the_process_is_killed(mosquitto: MosquittoBroker) -> None:
    script = (
        "import asyncio, sys\n"
        "from gateway.delivery.mqtt.publisher import BrokerSettings, MqttPublisher\n"
        f"s = BrokerSettings('127.0.0.1', {mosquitto.port}, client_id='pub-proc', "
        f"status_topic={STATUS!r}, online_payload=b'online', will_payload=b'will')\n"
        "asyncio.run(MqttPublisher(s).run())\n"
    )
    async with Subscriber(mosquitto.host, mosquitto.port, STATUS) as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=str(ROOT), stderr=asyncio.subprocess.PIPE
        )
        try:
            await sub.wait_for(lambda ms: len(ms) >= 1, timeout=10)
            proc.kill()
            await proc.wait()
            got = await sub.wait_for(lambda ms: len(ms) >= 2)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [m.payload for m in got] == [b"online", b"will"]


async def test_queue_bound_drops_oldest_and_counts(mosquitto: MosquittoBroker) -> None:
    async with Subscriber(mosquitto.host, mosquitto.port, "t/#", session="sub-bound") as sub:
        mosquitto.stop()
        pub = MqttPublisher(settings(mosquitto.port, max_queue=50, window=10))
        with structlog.testing.capture_logs() as logs:
            async with running(pub):
                for i in range(40):
                    pub.submit(Message("t/ev", b"m%d" % i, qos=1))
                for i in range(20):
                    pub.submit(Message("t/tm", b"q%d" % i, qos=0))
                for i in range(40, 70):
                    pub.submit(Message("t/ev", b"m%d" % i, qos=1))
                assert pub.pending == 50
                assert pub.dropped == 40
                mosquitto.start()
                assert await pub.flush(5.0)
                got = await sub.wait_for(lambda ms: len(numbered(ms)) >= 30)
    # The oldest unsent messages went first, whatever their QoS: the first 40 events (the
    # 20 QoS 0 ones were sent, but QoS 0 may miss a subscriber reconnecting to the broker).
    assert numbered(got) == list(range(40, 70))
    overflow = [e for e in logs if e["event"] == "mqtt.queue_overflow"]
    assert len(overflow) == 1
    assert overflow[0]["log_level"] == "warning"
    assert any(e["event"] == "mqtt.queue_overflow_ended" and e["dropped"] == 40 for e in logs)


async def test_close_without_broker_returns_in_time() -> None:
    pub = MqttPublisher(settings(free_port()))
    task = asyncio.create_task(pub.run())
    pub.submit(Message("t/ev", b"m0"))
    async with asyncio.timeout(4):
        await pub.close(timeout=1.0)
        await task
    assert pub.pending == 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="window"):
        BrokerSettings("h", window=0)
    with pytest.raises(ValueError, match="max_queue"):
        BrokerSettings("h", max_queue=5, window=10)
    with pytest.raises(ValueError, match="port"):
        BrokerSettings("h", port=70000)
    with pytest.raises(ValueError, match="username"):
        BrokerSettings("h", password="secret")
    assert "secret" not in repr(BrokerSettings("h", username="u", password="secret"))


# --- TLS -------------------------------------------------------------------------------


def _make_pki(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        cn: str, signer: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer or name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if signer is None:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                False,
            )
        return key, builder.sign(signer or key, hashes.SHA256())

    ca_key, ca = issue("test-ca", None, None)
    write("ca", ca_key, ca)
    for stem in ("server", "client"):
        key, cert = issue(stem, ca_key, ca.subject)
        write(stem, key, cert)
    other_key, other = issue("other-ca", None, None)
    write("other-ca", other_key, other)
    return {stem: str(directory / stem) for stem in ("ca", "server", "client", "other-ca")}


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, dict[str, str]]]:
    """A Mosquitto TLS listener that requires a client certificate from the test CA."""
    pki = _make_pki(tmp_path)
    broker = MosquittoBroker(
        tmp_path / "mosquitto",
        extra_config=(
            f"cafile {pki['ca']}.crt\ncertfile {pki['server']}.crt\n"
            f"keyfile {pki['server']}.key\nrequire_certificate true"
        ),
    )
    with broker:
        yield broker, pki


async def test_tls_with_client_certificate(
    tls_broker: tuple[MosquittoBroker, dict[str, str]],
) -> None:
    broker, pki = tls_broker
    tls = TlsSettings(
        ca_file=pki["ca"] + ".crt",
        cert_file=pki["client"] + ".crt",
        key_file=pki["client"] + ".key",
    )
    pub = MqttPublisher(settings(broker.port, tls=tls))
    async with running(pub):
        pub.submit(Message("t/ev", b"m0"))
        assert await pub.flush(5.0)
        assert pub.connected


async def test_tls_refuses_an_unknown_server(
    tls_broker: tuple[MosquittoBroker, dict[str, str]],
) -> None:
    broker, pki = tls_broker
    tls = TlsSettings(
        ca_file=pki["other-ca"] + ".crt",
        cert_file=pki["client"] + ".crt",
        key_file=pki["client"] + ".key",
    )
    pub = MqttPublisher(settings(broker.port, tls=tls))
    with structlog.testing.capture_logs() as logs:
        async with running(pub):
            pub.submit(Message("t/ev", b"m0"))
            await until(lambda: sum(e["event"] == "mqtt.broker_unreachable" for e in logs) >= 2)
            assert not pub.connected
            assert pub.pending == 1
    failed = [e for e in logs if e["event"] == "mqtt.broker_unreachable"]
    assert "CERTIFICATE_VERIFY_FAILED" in failed[0]["error"]


def test_tls_files_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load TLS files"):
        MqttPublisher(settings(1883, tls=TlsSettings(ca_file=str(tmp_path / "missing.crt"))))


# --- the in-memory queue (pure) --------------------------------------------------------


def _drain(q: MemorySinkQueue[Message]) -> list[bytes]:
    out = []
    while (item := q.take()) is not None:
        q.ack(item[0])
        out.append(item[1].payload)
    return out


def test_queue_keeps_order_and_requeues_in_flight_in_front() -> None:
    q: MemorySinkQueue[Message] = MemorySinkQueue(100)
    for i in range(5):
        q.push(Message("t", b"%d" % i))
    a, b = q.take(), q.take()
    assert a is not None and b is not None
    assert q.in_flight == 2
    q.ack(b[0])  # acks may come back out of order
    q.requeue()
    assert q.in_flight == 0
    assert _drain(q) == [b"0", b"2", b"3", b"4"]
    assert len(q) == 0
    assert q.oldest_key() is None


def test_queue_never_drops_in_flight_messages() -> None:
    q: MemorySinkQueue[Message] = MemorySinkQueue(3)
    for i in range(3):
        q.push(Message("e", b"e%d" % i))
    q.take()
    q.take()
    # e0 and e1 are on the wire; the oldest unsent one (e2) makes room.
    assert q.push(Message("e", b"e3")) == 1
    assert len(q) == 3
    q.requeue()
    assert _drain(q) == [b"e0", b"e1", b"e3"]


def test_invalid_submissions_are_counted_not_raised() -> None:
    pub = MqttPublisher(settings(1883))
    pub.submit(Message("", b"x"))
    pub.submit(Message("a/#", b"x"))
    pub.submit(Message("a", b"x", qos=3))
    assert pub.dropped == 3
    assert pub.pending == 0


async def test_credentials_are_used_and_never_logged(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    passwords.write_text("")
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_passwd", "-b", str(passwords), "gw", "s3cret-pw"
    )
    assert await proc.wait() == 0
    broker = MosquittoBroker(
        tmp_path / "mosquitto", extra_config=f"allow_anonymous false\npassword_file {passwords}"
    )
    with broker, structlog.testing.capture_logs() as logs:
        good = MqttPublisher(settings(broker.port, username="gw", password="s3cret-pw"))
        async with running(good):
            good.submit(Message("t/ev", b"m0"))
            assert await good.flush(5.0)
        bad = MqttPublisher(
            settings(broker.port, client_id="bad", username="gw", password="wrong-pw")
        )
        async with running(bad):
            await until(lambda: any(e["event"] == "mqtt.broker_unreachable" for e in logs))
            assert not bad.connected
    refused = next(e for e in logs if e["event"] == "mqtt.broker_unreachable")
    assert "authori" in refused["error"].lower() or "password" in refused["error"].lower()
    assert not [e for e in logs if "s3cret-pw" in repr(e) or "wrong-pw" in repr(e)]


async def test_plaintext_to_a_tls_only_listener_fails_clearly(
    tls_broker: tuple[MosquittoBroker, dict[str, str]],
) -> None:
    broker, _ = tls_broker
    pub = MqttPublisher(settings(broker.port))  # no tls: plain MQTT to a TLS port
    with structlog.testing.capture_logs() as logs:
        async with running(pub):
            pub.submit(Message("t/ev", b"m0"))
            await until(lambda: any(e["event"] == "mqtt.broker_unreachable" for e in logs))
            assert not pub.connected
            assert pub.pending == 1, "nothing is lost while the settings are wrong"
    failed = next(e for e in logs if e["event"] == "mqtt.broker_unreachable")
    assert failed["log_level"] == "warning"
    assert f"127.0.0.1:{broker.port}" in failed["broker"]
    assert failed["error"], "the log line says why"
