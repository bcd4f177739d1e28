"""No secret in any log line at any level, nor in any MQTT payload.

A full scenario at debug level: the broker requires a password (given to the gateway through
``${ENV}``), a station produces, a platform sends commands (with a customer name, which stays
inside the gateway), the broker restarts under the gateway, the config is reloaded, and the
gateway stops. Every log line and every message on the broker is searched for the canaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
from pathlib import Path

import aiomqtt

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker
from tests.gatewayproc import start_gateway

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "canary-Pw-5f3a9c"  # a canary, not a credential
CUSTOMER = "canary-Customer-77e1"
USER = "gw-user"
PREFIX = "sec"
SITE = "plant-s"


def _config(path: Path, broker_port: int, station_port: int) -> None:
    path.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-sec, site: {SITE}, topic_prefix: {PREFIX}}}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                "broker:",
                "  host: 127.0.0.1",
                f"  port: {broker_port}",
                f"  username: {USER}",
                "  password: ${SF_TEST_MQTT_PASSWORD}",
                "  keepalive: 5",
                "logging: {level: debug, format: json}",
                "machines:",
                "  - id: sew-01",
                "    area: sewing",
                "    line: line-1",
                "    profile: sewing-station",
                "    poll_interval: 0.1",
                f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {station_port}}}",
            ]
        )
        + "\n"
    )


def _password_file(path: Path) -> Path:
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(path), USER, PASSWORD],
        check=True,
        capture_output=True,
    )
    path.chmod(0o600)
    return path


async def test_no_secret_in_logs_or_payloads(tmp_path: Path) -> None:
    pwfile = _password_file(tmp_path / "passwd")
    broker = MosquittoBroker(
        tmp_path / "mosquitto", extra_config=f"allow_anonymous false\npassword_file {pwfile}"
    )
    broker.start()
    seen: list[tuple[str, bytes]] = []
    got = asyncio.Event()

    async def collect() -> None:
        # A platform with the same credentials, reconnecting through the broker restart.
        while True:
            try:
                async with aiomqtt.Client(
                    broker.host,
                    broker.port,
                    username=USER,
                    password=PASSWORD,
                    identifier="sec-platform",
                    clean_session=False,
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                ) as client:
                    await client.subscribe("#", qos=1)
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        seen.append((str(m.topic), payload))
                        got.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)  # reconnect pause while the broker restarts

    async def wait_for(pred: object, timeout: float = 15) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not pred():  # type: ignore[operator]
                got.clear()
                await got.wait()

    station = StationSpec(
        "sew-01",
        free_port(),
        StationModel([RunOrder("PO-9", target=10**6, piece_seconds=0.3)], seed=1, name="sew-01"),
    )
    config = tmp_path / "gw.yaml"
    _config(config, broker.port, station.port)
    log_path = tmp_path / "gw.log"
    collector = asyncio.create_task(collect())
    try:
        async with SimulatedFloor([station]):
            proc = await start_gateway(config, log_path, {"SF_TEST_MQTT_PASSWORD": PASSWORD})
            try:
                await wait_for(lambda: any("/event/" in t for t, _ in seen))
                cmd = f"{PREFIX}/{SITE}/sewing/line-1/sew-01/cmd/assign-order"
                async with aiomqtt.Client(
                    broker.host, broker.port, username=USER, password=PASSWORD
                ) as platform:
                    for i, body in enumerate(
                        [
                            {"order_id": "PO-S1", "target": 5, "customer": CUSTOMER},
                            {"order_id": "PO-S2", "target": 0, "customer": CUSTOMER},
                            {"bogus": PASSWORD},
                        ]
                    ):
                        doc = {**body, "command_id": f"c-{i}"}
                        await platform.publish(cmd, json.dumps(doc).encode(), qos=1)
                await wait_for(lambda: sum(t.endswith("/response") for t, _ in seen) >= 3)

                # The broker goes away and comes back: reconnect paths log too.
                before = len(seen)
                broker.stop()
                broker.start()
                await wait_for(lambda: len(seen) > before + 3, timeout=30)

                # A reload (unchanged file) and a clean stop.
                proc.send_signal(signal.SIGHUP)
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(15):
                    await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        broker.stop()

    log_text = log_path.read_text(errors="replace")
    lines = log_text.splitlines()
    levels = {json.loads(line).get("level") for line in lines if line.startswith("{")}
    assert "debug" in levels, "the scenario ran at debug level"
    assert '"gateway.stopped"' in log_text
    for canary in (PASSWORD, CUSTOMER):
        hits = [line for line in lines if canary in line]
        assert not hits, f"{canary!r} appears in the log: {hits[:3]}"
        # The platform's own commands carry the customer; everything else is the gateway's.
        leaked = [
            t
            for t, p in seen
            if (canary.encode() in p or canary in t)
            and not ("/cmd/" in t and not t.endswith("/response"))
        ]
        assert not leaked, f"{canary!r} published on {leaked[:3]}"
    assert any(t.endswith("/response") for t, _ in seen)
