"""What the adapters report about each batch for the metrics: poll or notification, the
poll's duration, and the poll deadlines missed (real servers on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import pytest

from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.opcua.adapter import OpcUaAdapter
from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig, OpcUaSignalConfig
from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_server import OpcUaMachineServer
from tests.integration.test_modbus_adapter import conn, modbus_server, registers, signal

pytestmark = pytest.mark.integration


async def test_modbus_polls_that_overrun_count_missed_deadlines() -> None:
    # Two requests 0.1 s apart make every poll longer than the 0.05 s interval.
    signals = {"a": signal(address=0, type="uint16"), "b": signal(address=50, type="uint16")}
    async with modbus_server([registers(0, [1]), registers(50, [2])]) as (_, port):
        adapter = ModbusAdapter("sew-20", conn(port, request_delay=0.1), signals, 0.05)
        durations: list[float | None] = []
        async with adapter, asyncio.timeout(10):
            async for _ in adapter.samples():
                assert adapter.acquisition.kind == "poll"
                durations.append(adapter.acquisition.seconds)
                if len(durations) == 4:
                    break
    assert all(d is not None and d >= 0.09 for d in durations), durations
    # Each of the first three polls overran at least one deadline (the fourth's is counted
    # only after it was consumed).
    assert adapter.acquisition.missed_deadlines >= 3


async def test_modbus_polls_on_time_miss_nothing() -> None:
    signals = {"a": signal(address=0, type="uint16")}
    async with modbus_server([registers(0, [1])]) as (_, port):
        adapter = ModbusAdapter("sew-21", conn(port), signals, 0.05)
        n = 0
        async with adapter, asyncio.timeout(10):
            async for _ in adapter.samples():
                n += 1
                if n == 5:
                    break
    assert adapter.acquisition.missed_deadlines == 0
    assert adapter.acquisition.seconds is not None and adapter.acquisition.seconds < 0.05


async def test_opcua_subscription_batches_are_notifications() -> None:
    port = free_port()
    async with OpcUaMachineServer(CncModel(seed=2, name="cnc-20"), port=port):
        cfg = OpcUaConnectionConfig(
            url=f"opc.tcp://127.0.0.1:{port}/", timeout=2.0, publishing_interval=0.1
        )
        # ServerStatus/CurrentTime: the server updates it every second.
        signals = {"now": OpcUaSignalConfig(node_id="i=2258")}
        kinds: list[tuple[str, bool]] = []
        async with OpcUaAdapter("cnc-20", cfg, signals, 0.1) as adapter, asyncio.timeout(10):
            async for _ in adapter.samples():
                acq = adapter.acquisition
                kinds.append((acq.kind, acq.seconds is not None))
                if len(kinds) == 2:
                    break
    # The full Read after connecting is a poll (timed); then the subscription's changes.
    assert kinds == [("poll", True), ("notification", False)]
