"""The load simulator: pure register model and framing, and one real read through the adapter."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.mapping import Mapper
from gateway.core.model import Quality
from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.simulators.load import (
    ADDR_TELEMETRY,
    FrameError,
    LoadDevice,
    LoadFloor,
    Request,
    build_devices,
    change_time,
    last_change,
    order_id_at,
    parse_requests,
    registers,
    respond,
    signal_map,
)
from shopfloor_gateway.simulators.modbus_server import free_port


def _frame(transaction: int, unit: int, function: int, start: int, count: int) -> bytes:
    return struct.pack(">HHHBBHH", transaction, 0, 6, unit, function, start, count)


def test_registers_follow_the_map() -> None:
    d = LoadDevice("m1", 1502, signals=20, origin=1000.0, piece_seconds=2.0)
    words = registers(d, 1000.0 + 2 * 70000 + 0.5)
    assert len(words) == d.register_count == ADDR_TELEMETRY + 17
    assert (words[1] << 16) | words[2] == 70000  # uint32 ABCD across the 16-bit boundary
    text = struct.pack(">10H", *words[3:13]).rstrip(b"\x00").decode()
    assert text == "PO-m1"
    assert words[0] in (0, 1)


def test_requests_are_split_and_partial_frames_kept() -> None:
    data = _frame(1, 1, 3, 0, 4) + _frame(2, 2, 4, 3, 10)
    reqs, rest = parse_requests(data + data[:5])
    assert reqs == [Request(1, 1, 3, 0, 4), Request(2, 2, 4, 3, 10)]
    assert rest == data[:5]
    with pytest.raises(FrameError):
        parse_requests(struct.pack(">HHHB", 1, 7, 6, 1) + b"\x03\x00\x00\x00\x01")


def test_responses_and_exceptions() -> None:
    words = list(range(100, 130))
    ok = respond(Request(9, 1, 3, 2, 3), words)
    assert ok == struct.pack(">HHHBBB3H", 9, 0, 9, 1, 3, 6, 102, 103, 104)
    beyond = respond(Request(9, 1, 3, 28, 3), words)
    assert beyond[-2:] == bytes((0x83, 2))
    write = parse_requests(struct.pack(">HHHBBHH", 1, 0, 6, 1, 6, 0, 1))[0][0]
    assert respond(write, words)[-2:] == bytes((0x86, 1))


@given(st.floats(0, 1e6), st.floats(0.01, 100), st.floats(0, 1e6))
def test_last_change_is_the_latest_change_not_after_t(
    origin: float, period: float, dt: float
) -> None:
    t = origin + dt
    at = last_change(origin, period, t)
    assert at is not None and at <= t
    k = round((at - origin) / period - 0.25)
    # The next change is after t: nothing newer was missed.
    assert change_time(origin, period, k + 1) > t or change_time(origin, period, k + 2) > t


def test_latency_probe_names_its_change_time() -> None:
    d = LoadDevice("m1", 1502, origin=500.0, change_period=0.5)
    stamp = int(order_id_at(d, 510.0)[1:]) / 1000
    assert 509.25 <= stamp <= 510.0


def test_build_devices_spreads_faults() -> None:
    devs = build_devices(20, base_port=20000, dead=0.1, stall=0.1)
    assert [d.mode for d in devs].count("dead") == 2
    assert [d.mode for d in devs].count("stall") == 2
    assert len({d.port for d in devs}) == 20
    shared = build_devices(10, base_port=20000, units_per_port=5)
    assert {(d.port, d.unit_id) for d in shared} == {(20000 + i // 5, 1 + i % 5) for i in range(10)}
    with pytest.raises(ValueError, match="port"):
        build_devices(10, base_port=65530)


async def test_the_modbus_adapter_reads_a_load_device() -> None:
    port = free_port()
    devices = build_devices(3, base_port=port, units_per_port=3, stall=1 / 3, signals=8)
    async with LoadFloor(devices) as floor:
        good = devices[1]
        signals = {k: ModbusSignalConfig.model_validate(v) for k, v in signal_map(good).items()}
        conn = ModbusConnectionConfig(host="127.0.0.1", port=port, unit_id=good.unit_id)
        adapter = ModbusAdapter(good.name, conn, signals, 0.05)
        async with asyncio.timeout(5), adapter:
            batch = await anext(aiter(adapter.samples()))
        mapped, problems = Mapper(signals).apply(batch)
        assert problems == []
        values = {s.signal: s.value for s in mapped if s.quality is Quality.GOOD}
        assert values["order_id"] == f"PO-{good.name}"
        assert values["state"] in ("idle", "running")
        assert len(values) == 8
        assert floor.stats[good.name].requests
        # The stalling unit takes the request and never answers: the adapter gives up.
        stalled = devices[0]
        conn = ModbusConnectionConfig(
            host="127.0.0.1", port=port, unit_id=stalled.unit_id, timeout=0.1
        )
        adapter = ModbusAdapter(stalled.name, conn, signals, 0.05)
        with pytest.raises(ConnectionLost):
            async with asyncio.timeout(5), adapter:
                await anext(aiter(adapter.samples()))
    # Closed floor: the port refuses.
    conn = ModbusConnectionConfig(host="127.0.0.1", port=port, timeout=0.2)
    with pytest.raises(ConnectError):
        async with ModbusAdapter("x", conn, signals, 0.05):
            pass
