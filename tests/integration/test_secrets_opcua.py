"""No OPC UA user password in any log line at any level, nor in any MQTT payload.

A CNC simulator that only accepts user ``gw`` with a canary password; the gateway process
gets the password through ``${SF_TEST_OPCUA_PASSWORD}`` and runs at debug level (asyncua's
own debug logging included) until events flow, then stops on SIGTERM. Every log line and
every message on the broker is searched for the canary, as text and as the bytes a
``repr`` or a hex dump of the identity token would show. With a wrong password the log says
the server refused the user, and names neither password.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_server import OpcUaMachineServer
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import events, gateway_process

CANARY = "canary-OpcUa-Pw-2b7d41"  # a canary, not a credential
WRONG = "canary-Wrong-Pw-90c3e8"
SITE = "plant-u"


def _config(path: Path, prefix: str, broker_port: int, server_port: int) -> None:
    path.write_text(
        f"gateway: {{id: gw-secua, site: {SITE}, topic_prefix: {prefix}}}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        f"broker: {{host: 127.0.0.1, port: {broker_port}}}\n"
        "logging: {level: debug, format: json}\n"
        "machines:\n"
        "  - id: cnc-01\n"
        "    area: machining\n"
        "    line: line-3\n"
        "    profile: machine-tool-umati\n"
        "    connection:\n"
        "      protocol: opcua\n"
        f"      url: opc.tcp://127.0.0.1:{server_port}/\n"
        "      username: gw\n"
        "      password: ${SF_TEST_OPCUA_PASSWORD}\n"
        "      publishing_interval: 0.1\n"
        "      timeout: 2.0\n"
    )


def _forms(secret: str) -> list[str]:
    """The secret as text, as bytes in a repr, and hex-dumped."""
    raw = secret.encode()
    return [secret, repr(raw)[2:-1], raw.hex(), raw.hex().upper()]


def _assert_absent(secret: str, log_text: str, seen: list[Received]) -> None:
    for form in _forms(secret):
        hits = [line for line in log_text.splitlines() if form in line]
        assert not hits, f"{form!r} appears in the log: {hits[:3]}"
    leaked = [m.topic for m in seen if secret.encode() in m.payload or secret in m.topic]
    assert not leaked, f"the password was published on {leaked[:3]}"


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        await proc.wait()


async def test_opcua_password_stays_out_of_logs_and_payloads(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    model = CncModel(
        [Idle(0.5), RunOrder("JOB-S1", target=50, piece_seconds=0.3), Idle(60.0)],
        seed=3,
        name="cnc-01",
    )
    cfg = tmp_path / "gw.yaml"
    _config(cfg, "secua", mosquitto.port, port)
    log_path = tmp_path / "gw.log"
    async with (
        Subscriber(mosquitto.host, mosquitto.port, "secua/#") as sub,
        OpcUaMachineServer(model, port=port, tick=0.05, users={"gw": CANARY}),
        gateway_process(cfg, log_path, {"SF_TEST_OPCUA_PASSWORD": CANARY}) as proc,
    ):

        def producing(ms: list[Received]) -> bool:
            return any(
                e["type"].endswith("order.progress") and e["data"]["good"] >= 2 for e in events(ms)
            )

        await sub.wait_for(producing, timeout=30)
        await _stop(proc)
    assert proc.returncode == 0, proc.returncode
    log_text = log_path.read_text(errors="replace")
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert "debug" in {e.get("level") for e in lines}, "the scenario ran at debug level"
    assert any(e.get("event") == "gateway.stopped" for e in lines)
    assert not any(e.get("event") == "opcua.auth_refused" for e in lines)
    _assert_absent(CANARY, log_text, sub.messages)


async def test_a_wrong_opcua_password_is_refused_without_naming_it(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    _config(cfg, "secua-wrong", mosquitto.port, port)
    log_path = tmp_path / "gw.log"
    async with (
        Subscriber(mosquitto.host, mosquitto.port, "secua-wrong/#") as sub,
        OpcUaMachineServer(CncModel(seed=4, name="cnc-01"), port=port, users={"gw": CANARY}),
        gateway_process(cfg, log_path, {"SF_TEST_OPCUA_PASSWORD": WRONG}) as proc,
    ):
        # The gateway publishes the machine as offline once the connect failed; the log
        # is read after the process has stopped, so every line is in the file.
        def offline(ms: list[Received]) -> bool:
            return any(
                e["type"].endswith("machine.connection.changed") and not e["data"]["connected"]
                for e in events(ms)
            )

        await sub.wait_for(offline, timeout=30)
        await _stop(proc)
    log_text = log_path.read_text(errors="replace")
    refusals = [
        json.loads(line)
        for line in log_text.splitlines()
        if line.startswith("{") and '"opcua.auth_refused"' in line
    ]
    assert refusals and "user 'gw'" in refusals[0]["error"], refusals[:1]
    assert refusals[0]["level"] == "warning"
    for secret in (WRONG, CANARY):
        _assert_absent(secret, log_text, sub.messages)
