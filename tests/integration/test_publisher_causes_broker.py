"""Why the broker cannot be reached, told once per cause and outage, against a real Mosquitto.

A rotated password ("not authorized") and a second client with the gateway's client id
(session takeovers) must each be named at warning once; their repeats go to debug, and the
recovery is logged at info.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from gateway.delivery.mqtt.publisher import Message, MqttPublisher
from tests.brokers import MosquittoBroker
from tests.integration.test_publisher import running, settings, until

pytestmark = pytest.mark.integration

USER = "gw"


def _passwords(path: Path, password: str) -> None:
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(path), USER, password],
        check=True,
        capture_output=True,
        timeout=30,
    )
    path.chmod(0o600)


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Path]]:
    """A broker that wants a password; not started."""
    pwfile = tmp_path / "passwd"
    _passwords(pwfile, "old-password")
    broker = MosquittoBroker(
        tmp_path / "mosquitto", extra_config=f"allow_anonymous false\npassword_file {pwfile}"
    )
    try:
        yield broker, pwfile
    finally:
        broker.stop()


def _at(logs: list[dict[str, Any]], level: str, cause: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == level and e.get("cause") == cause]


async def test_each_change_of_cause_is_a_warning_once_per_outage(
    locked_broker: tuple[MosquittoBroker, Path],
) -> None:
    broker, pwfile = locked_broker
    pub = MqttPublisher(settings(broker.port, username=USER, password="old-password"))
    with structlog.testing.capture_logs() as logs:
        async with running(pub):
            pub.submit(Message("t/ev", b"m0"))
            # The broker is down: refused, retried.
            await until(lambda: len(_at(logs, "debug", "refused")) >= 2)
            # It comes back after a password rotation the gateway was not told of.
            _passwords(pwfile, "new-password")
            broker.start()
            await until(lambda: len(_at(logs, "debug", "not-authorized")) >= 2)
            # The old password is restored: a restart in between is refused again (a
            # cause this outage already reported), then the gateway gets through.
            _passwords(pwfile, "old-password")
            broker.stop()
            broker.start()
            await until(lambda: pub.connected and pub.pending == 0)
    [refused] = _at(logs, "warning", "refused")
    [denied] = _at(logs, "warning", "not-authorized")
    assert denied["event"] == "mqtt.broker_unreachable"
    assert "Not authorized" in denied["error"] and "password" in denied["error"]
    assert logs.index(refused) < logs.index(denied)
    assert [e["log_level"] for e in logs if e["event"] == "mqtt.broker_reconnected"] == ["info"]
    assert all(e["log_level"] != "warning" for e in logs[logs.index(denied) + 1 :])


async def test_a_client_id_collision_is_named_once(mosquitto: MosquittoBroker) -> None:
    pub = MqttPublisher(settings(mosquitto.port))
    client_id = f"pub-{mosquitto.port}"
    takeovers = 0
    with structlog.testing.capture_logs() as logs:
        async with running(pub):
            await until(lambda: pub.connected)
            # A second client with the same id: each connect takes the session over, and
            # the gateway's reconnect takes it back.
            for _ in range(6):
                # Each takeover hits an established link (not a reconnect still waiting for
                # its CONNACK, which is a failed connect, not a link closed early): under load
                # the rogue's next connect could otherwise outrun the gateway's handshake.
                await until(lambda: pub.connected)
                async with aiomqtt.Client(
                    mosquitto.host, mosquitto.port, identifier=client_id
                ) as rogue:
                    takeovers += 1
                    async with asyncio.timeout(5):
                        with pytest.raises(aiomqtt.MqttError):
                            async for _ in rogue.messages:
                                pass
            await until(lambda: pub.connected)
            pub.submit(Message("t/ev", b"after"))
            await until(lambda: pub.pending == 0)
    [named] = _at(logs, "warning", "session-taken-over")
    assert client_id in named["error"] and "client_id" in named["error"]
    # How many of the six takeovers the gateway sees as separate closes depends on how
    # the reconnects interleave with the rogue's connects; after the one warning every
    # further takeover it saw is a debug line.
    assert len(_at(logs, "debug", "session-taken-over")) >= 1
    warnings = [e for e in logs if e["log_level"] == "warning"]
    # The first close could be anything (a broker restart looks the same); the second in
    # a row is named, and nothing after that is a warning.
    assert [e.get("cause") for e in warnings] == ["closed", "session-taken-over"]
    assert takeovers == 6
