"""The PLC simulator end to end: every decoder, a hole that forces a split, all four areas."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from structlog.testing import capture_logs

from gateway.core.model import Quality
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.simulators.plc import PLC_SIGNALS, PlcModel, SimulatedPlc
from shopfloor_gateway.simulators.serial_link import PtyLink

pytestmark = pytest.mark.integration

SIGNALS = {name: ModbusSignalConfig.model_validate(body) for name, body in PLC_SIGNALS.items()}


@pytest.mark.parametrize("t", [12.0, 65.0])  # running, then in the fault phase
async def test_every_signal_decodes_to_the_model_value(t: float) -> None:
    async with SimulatedPlc(PlcModel(), tick=3600) as plc:
        await plc.set_time(t)
        conn = ModbusConnectionConfig(host="127.0.0.1", port=plc.port)
        adapter = ModbusAdapter("plc", conn, SIGNALS, 0.02)
        with capture_logs() as logs:
            async with adapter, asyncio.timeout(5):
                batches = []
                async for batch in adapter.samples():
                    batches.append(batch)
                    if len(batches) == 2:
                        break
        expected = dataclasses.asdict(plc.values)
        for batch in batches:
            got = {s.signal: s.value for s in batch if s.quality is Quality.GOOD}
            assert set(got) == set(expected)
            for name, value in expected.items():
                if isinstance(value, float):
                    assert got[name] == pytest.approx(value, rel=1e-6), name
                else:
                    assert got[name] == value, name
        # The default max_gap bridges the hole at 16..19; the PLC refuses it once, the plan
        # drops the bridge for good.
        splits = [e for e in logs if e["event"] == "modbus.block_split"]
        assert len(splits) == 1 and "illegal data address" in splits[0]["exception"]
        assert all(not (r.start < 20 and r.start + r.count > 16) for r in adapter.plan)


async def test_plc_over_rtu_on_a_pty() -> None:
    async with (
        PtyLink() as link,
        SimulatedPlc(transport="rtu", serial_port=link.ends[0], baudrate=115200, tick=3600) as plc,
    ):
        await plc.set_time(5.0)
        conn = ModbusConnectionConfig(
            transport="rtu",
            serial={"port": link.ends[1], "baudrate": 115200, "parity": "N"},  # type: ignore[arg-type]
            max_gap=0,
            timeout=0.5,
        )
        adapter = ModbusAdapter("plc", conn, SIGNALS, 0.02)
        async with adapter, asyncio.timeout(5):
            async for batch in adapter.samples():
                got = {s.signal: s.value for s in batch}
                assert all(s.quality is Quality.GOOD for s in batch)
                assert got["part_count"] == plc.values.part_count
                assert got["program"] == "PRG-4711-FLANGE"
                break
