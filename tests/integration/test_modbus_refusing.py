"""A device that answers every read with a Modbus exception is failing, not "running".

The fault proxy answers each request with an exception (a PLC in STOP, a converter whose
serial side is dead) in front of a simulated sewing station over real TCP. Each such poll is
a read error; after three in a row the machine is offline with the exception as the reason,
and it stays offline across reconnects until the device answers again. The read plan is
not cut into single-register reads by a device that refuses everything.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core.model import Quality
from shopfloor_gateway.adapters.base import ConnectionLost
from shopfloor_gateway.adapters.modbus.adapter import REFUSED_POLLS_OFFLINE, ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.simulators.faultproxy import FaultProxy, parse_command
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import gateway_process
from tests.integration.test_operations import wait_http

pytestmark = pytest.mark.integration

PREFIX = "refuse"


def _station() -> StationSpec:
    script = [RunOrder("PO-9001", target=1_000_000, piece_seconds=0.5)]
    return StationSpec("sew-01", free_port(), StationModel(script, name="sew-01"))


async def test_every_read_refused_is_a_failure_then_offline() -> None:
    station = _station()
    signals = {
        "state": ModbusSignalConfig(address=0, type="uint16"),
        "good_count": ModbusSignalConfig(address=1, type="uint32"),
        "order_id": ModbusSignalConfig(address=10, type="string", length=20),
    }
    async with (
        SimulatedFloor([station]),
        FaultProxy("127.0.0.1", station.port, framing="modbus") as proxy,
    ):
        conn = ModbusConnectionConfig(
            protocol="modbus", host="127.0.0.1", port=proxy.port, timeout=0.5, max_gap=16
        )
        adapter = ModbusAdapter("sew-01", conn, signals, poll_interval=0.05)
        plan = adapter.plan
        assert len(plan) == 1, "one block bridging a gap: what a refusal would split"
        async with adapter:
            polls = adapter.samples()
            first = await anext(polls)
            assert all(s.quality is Quality.GOOD for s in first)
            proxy.inject(parse_command("exception 4"))
            async with asyncio.timeout(5):
                batch = await anext(polls)
                assert all(s.quality is Quality.BAD for s in batch)
                per_poll = proxy.state.excepted
                for _ in range(REFUSED_POLLS_OFFLINE - 2):
                    batch = await anext(polls)
                    assert all(s.quality is Quality.BAD for s in batch)
                with pytest.raises(ConnectionLost, match=r"exception 4 \(server device failure\)"):
                    await anext(polls)
        assert adapter.plan == plan, "a device refusing everything must not split the plan"
        # Reconnected, still refusing: offline at once, not after three more polls.
        refused = proxy.state.excepted
        async with adapter:
            with pytest.raises(ConnectionLost, match="every read"):
                async with asyncio.timeout(5):
                    await anext(adapter.samples())
        assert proxy.state.excepted - refused == per_poll
        proxy.inject(parse_command("heal"))
        async with adapter:
            batch = await anext(adapter.samples())
            assert all(s.quality is Quality.GOOD for s in batch)
        assert adapter.plan == plan


def _metric(text: str, name: str, machine: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'machine="{machine}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {machine} not in /metrics")


def _connection(ms: list[Received]) -> list[dict[str, Any]]:
    return [
        json.loads(m.payload)["data"]
        for m in ms
        if m.topic.endswith("/event/machine.connection.changed")
    ]


async def test_the_gateway_counts_refused_reads_and_reports_the_machine_offline(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    station = _station()
    health = free_port()
    async with (
        SimulatedFloor([station]),
        FaultProxy("127.0.0.1", station.port, framing="modbus") as proxy,
    ):
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            f"gateway: {{id: gw-ref, site: plant-1, topic_prefix: {PREFIX}}}\n"
            f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
            "logging: {level: info, format: json}\n"
            f"health: {{listen: '127.0.0.1:{health}'}}\n"
            "machines:\n"
            "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
            " poll_interval: 0.1, connection: {protocol: modbus, host: 127.0.0.1,"
            f" port: {proxy.port}, timeout: 0.5}}}}\n"
        )
        metrics = f"http://127.0.0.1:{health}/metrics"
        async with (
            Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
            gateway_process(cfg, tmp_path / "gw.log"),
        ):
            await sub.wait_for(lambda ms: any(c["connected"] for c in _connection(ms)), 15)
            before = _metric(
                await wait_http(metrics, 200), "shopfloor_device_read_errors_total", "sew-01"
            )
            proxy.inject(parse_command("exception 4"))
            await sub.wait_for(
                lambda ms: any(not c["connected"] for c in _connection(ms)), timeout=10
            )
            [down] = [c for c in _connection(sub.messages) if not c["connected"]]
            assert "exception 4 (server device failure)" in down["reason"]
            text = await wait_http(metrics, 200)
            assert _metric(text, "shopfloor_device_read_errors_total", "sew-01") >= before + 3
            assert _metric(text, "shopfloor_device_connected", "sew-01") == 0
            proxy.inject(parse_command("heal"))
            await sub.wait_for(
                lambda ms: (
                    [c["connected"] for c in _connection(ms)][-1:] == [True]
                    and len(_connection(ms)) >= 3
                ),
                timeout=15,
            )
