"""The Modbus adapter against a real pymodbus server (and bare TCP servers) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice
from structlog.testing import capture_logs

from gateway.core.model import Quality, Sample
from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter, create
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.decode import encode
from shopfloor_gateway.adapters.modbus.plan import ReadRequest

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def signal(**kw: Any) -> ModbusSignalConfig:
    """A signal config from keywords (keeps the tables below short)."""
    return ModbusSignalConfig(**kw)


def regs(value: Any, sig: ModbusSignalConfig) -> list[int]:
    """Registers holding ``value`` as ``sig`` decodes it."""
    return encode(value, sig)


def registers(address: int, values: Sequence[int]) -> SimData:
    """A run of plain registers for the simulator."""
    return SimData(address, values=list(values), datatype=DataType.REGISTERS)


def bits() -> list[SimData]:
    """Coils or discrete inputs the tests do not use (the simulator wants them defined)."""
    return [SimData(0, values=[False] * 16, datatype=DataType.BITS)]


@asynccontextmanager
async def modbus_server(
    holding: list[SimData], inputs: list[SimData] | None = None, action: SimAction | None = None
) -> AsyncIterator[tuple[ModbusTcpServer, int]]:
    """A pymodbus server on a free loopback port, shut down on exit."""
    device = SimDevice(
        id=1,
        simdata=(bits(), bits(), holding, inputs or [registers(0, [0])]),
        action=action,
    )
    server = ModbusTcpServer(context=device, address=(HOST, 0))
    await server.serve_forever(background=True)
    listener = cast(asyncio.Server, server.transport)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


@asynccontextmanager
async def tcp_server(handler: Any) -> AsyncIterator[int]:
    """A plain asyncio TCP server on a free loopback port; it and its connections close on exit."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(tracked, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


def conn(port: int, **kw: Any) -> ModbusConnectionConfig:
    """Connection settings for a loopback test server."""
    return ModbusConnectionConfig(host=HOST, port=port, **{"timeout": 0.5, **kw})


async def take(adapter: ModbusAdapter, n: int, limit: float = 5.0) -> list[list[Sample]]:
    """The first ``n`` batches, within ``limit`` seconds."""
    batches: list[list[Sample]] = []
    async with asyncio.timeout(limit):
        async for batch in adapter.samples():
            batches.append(batch)
            if len(batches) == n:
                break
    return batches


def by_signal(batch: Sequence[Sample]) -> dict[str, Sample]:
    return {s.signal: s for s in batch}


def quality(batch: Sequence[Sample]) -> Mapping[str, Quality]:
    return {s.signal: s.quality for s in batch}


SIGNALS = {
    "state": signal(address=0, type="uint16"),
    "good_count": signal(address=1, type="uint32"),
    "rate": signal(address=10, type="float32", word_order="CDAB"),
    "order_id": signal(address=20, type="string", length=4),
    "temperature": signal(address=0, type="int16", area="input", scale=0.1),
}


async def test_reads_and_decodes_every_type() -> None:
    holding = [
        registers(0, [2, *regs(123456, SIGNALS["good_count"])]),
        registers(10, regs(12.5, SIGNALS["rate"])),
        registers(20, regs("ORD-42", SIGNALS["order_id"])),
    ]
    inputs = [registers(0, regs(-55, SIGNALS["temperature"]))]
    async with modbus_server(holding, inputs) as (server, port):
        clock_calls: list[float] = []

        def clock() -> float:
            clock_calls.append(1_700_000_000.0 + len(clock_calls))
            return clock_calls[-1]

        adapter = ModbusAdapter("sew-01", conn(port), SIGNALS, 0.02, clock=clock)
        async with adapter:
            # holding 0..23 bridges the gaps (<= 16); input is its own request.
            assert [(r.area, r.start, r.count) for r in adapter.plan] == [
                ("holding", 0, 24),
                ("input", 0, 1),
            ]
            [first] = await take(adapter, 1)
            assert [s.signal for s in first] == list(SIGNALS)  # config order
            assert {s.signal: s.value for s in first} == {
                "state": 2,
                "good_count": 123456,
                "rate": 12.5,
                "order_id": "ORD-42",
                "temperature": -55,  # raw: scaling is the mapping's job
            }
            assert all(s.quality is Quality.GOOD and s.machine == "sew-01" for s in first)
            assert {s.source_time for s in first} == {clock_calls[0]}

            # A live change on the device shows up in a later cycle.
            await server.async_setValues(1, 3, 1, regs(123457, SIGNALS["good_count"]))
            async with asyncio.timeout(5):
                async for batch in adapter.samples():
                    if by_signal(batch)["good_count"].value == 123457:
                        break


async def test_missing_register_is_bad_and_the_rest_good() -> None:
    signals = {
        "state": signal(address=0, type="uint16"),
        "good_count": signal(address=1, type="uint32"),
        "missing": signal(address=8, type="uint16"),  # the device has 0..4 only
    }
    async with modbus_server([registers(0, [1, 0, 7, 3, 4])]) as (_, port):
        adapter = create("sew-02", conn(port), signals, 0.02)
        assert len(adapter.plan) == 1  # one bridged block 0..8
        with capture_logs() as logs:
            async with adapter:
                batches = await take(adapter, 3)
        for batch in batches:  # the very first cycle already has the split's results
            assert quality(batch) == {
                "state": Quality.GOOD,
                "good_count": Quality.GOOD,
                "missing": Quality.BAD,
            }
            assert by_signal(batch)["missing"].value is None
            assert by_signal(batch)["good_count"].value == 7
        # The split is remembered: later cycles do not try the bridged block again. The
        # gap-free run 0..2 stays one read; only the bridged hole is dropped.
        assert adapter.plan == (
            ReadRequest(
                "holding",
                0,
                3,
                (("state", 0, 1), ("good_count", 1, 2)),  # type: ignore[arg-type]
            ),
            ReadRequest("holding", 8, 1, (("missing", 0, 1),)),  # type: ignore[arg-type]
        )
        splits = [e for e in logs if e["event"] == "modbus.block_split"]
        assert len(splits) == 1
        assert "2 (illegal data address)" in splits[0]["exception"]
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [(e["event"], e["signal"]) for e in warnings] == [("modbus.signal_bad", "missing")]
        assert "illegal data address" in warnings[0]["reason"]


async def test_exception_episodes_are_logged_once_each() -> None:
    refuse = {"on": True}

    async def action(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # Refuse reads touching register 3 while switched on (a module that is offline).
        if set_values is None and refuse["on"] and address <= 3 < address + count:
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    signals = {"a": signal(address=0, type="uint16"), "b": signal(address=3, type="uint16")}
    async with modbus_server([registers(0, [10, 11, 12, 13])], action=action) as (_, port):
        adapter = ModbusAdapter("cnc-1", conn(port), signals, 0.01)
        seen: list[Quality] = []
        with capture_logs() as logs:
            async with adapter, asyncio.timeout(5):
                async for batch in adapter.samples():
                    assert by_signal(batch)["a"].quality is Quality.GOOD
                    seen.append(by_signal(batch)["b"].quality)
                    # bad x3, good x2, bad x2: two episodes of trouble.
                    refuse["on"] = len(seen) < 3 or len(seen) >= 5
                    if len(seen) == 7:
                        break
        assert seen == [Quality.BAD] * 3 + [Quality.GOOD] * 2 + [Quality.BAD] * 2
        events = [
            (e["event"], e["log_level"])
            for e in logs
            if e["event"] in {"modbus.signal_bad", "modbus.signal_recovered"}
        ]
        assert events == [
            ("modbus.signal_bad", "warning"),
            ("modbus.signal_recovered", "info"),
            ("modbus.signal_bad", "warning"),
        ]


async def test_transient_exception_marks_block_bad_without_splitting() -> None:
    busy = {"left": 1}

    async def action(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is None and busy["left"]:
            busy["left"] -= 1
            return ExcCodes.DEVICE_BUSY
        return None

    signals = {"a": signal(address=0, type="uint16"), "b": signal(address=2, type="uint16")}
    async with modbus_server([registers(0, [5, 6, 7])], action=action) as (_, port):
        adapter = ModbusAdapter("cnc-2", conn(port), signals, 0.01)
        async with adapter:
            first, second = await take(adapter, 2)
        assert quality(first) == {"a": Quality.BAD, "b": Quality.BAD}
        assert quality(second) == {"a": Quality.GOOD, "b": Quality.GOOD}
        assert len(adapter.plan) == 1


async def test_undecodable_value_is_bad_only_for_that_signal() -> None:
    signals = {
        "program": signal(address=0, type="string", length=2),
        "state": signal(address=2, type="uint16"),
    }
    async with modbus_server([registers(0, [0x41C3, 0xA900, 1])]) as (_, port):
        adapter = ModbusAdapter("sew-03", conn(port), signals, 0.02)
        async with adapter:
            [batch] = await take(adapter, 1)
    assert quality(batch) == {"program": Quality.BAD, "state": Quality.GOOD}
    assert by_signal(batch)["state"].value == 1


async def test_dead_port_is_a_quick_connect_error() -> None:
    # A bound socket that does not listen: connections to it are refused, and no other
    # process can take the port while the test runs.
    with socket.socket() as blocker:
        blocker.bind((HOST, 0))
        port = blocker.getsockname()[1]
        adapter = ModbusAdapter("sew-04", conn(port, timeout=2.0), SIGNALS, 1.0)
        started = time.monotonic()
        with pytest.raises(ConnectError, match=rf"{HOST}:{port}.*refused"):
            async with adapter:
                pass
        assert time.monotonic() - started < 1.0


async def test_silent_device_is_connection_lost_after_timeout() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Accepts the connection and reads requests, never answers.
        while await reader.read(256):
            pass
        writer.close()

    async with tcp_server(swallow) as port:
        adapter = ModbusAdapter("sew-05", conn(port, timeout=0.2), SIGNALS, 0.05)
        async with adapter:
            started = time.monotonic()
            with pytest.raises(ConnectionLost, match=r"no response .* within 0.2 s"):
                await take(adapter, 1)
            assert 0.15 < time.monotonic() - started < 1.5


async def test_device_closing_mid_request_is_connection_lost_at_once() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(256)  # the first request arrives, then the device hangs up
        writer.close()

    async with tcp_server(hang_up) as port:
        adapter = ModbusAdapter("sew-06", conn(port, timeout=5.0), SIGNALS, 0.05)
        async with adapter:
            started = time.monotonic()
            with pytest.raises(ConnectionLost, match="closed"):
                await take(adapter, 1)
            # Far below the 5 s timeout: the drop itself ends the read.
            assert time.monotonic() - started < 2.0


async def test_server_stopped_mid_run_is_connection_lost() -> None:
    signals = {"state": signal(address=0, type="uint16")}
    async with modbus_server([registers(0, [1])]) as (server, port):
        adapter = ModbusAdapter("sew-07", conn(port), signals, 0.02)
        async with adapter:
            good = 0
            with pytest.raises(ConnectionLost):
                async with asyncio.timeout(5):
                    async for _ in adapter.samples():
                        good += 1
                        if good == 2:
                            await server.shutdown()  # type: ignore[no-untyped-call]
            assert good == 2


async def test_polling_cadence_is_fixed_rate() -> None:
    signals = {"state": signal(address=0, type="uint16")}
    interval, n = 0.05, 11
    async with modbus_server([registers(0, [1])]) as (_, port):
        adapter = ModbusAdapter("sew-08", conn(port), signals, interval)
        stamps: list[float] = []
        async with adapter, asyncio.timeout(5):
            async for _ in adapter.samples():
                stamps.append(time.monotonic())
                if len(stamps) == n:
                    break
    elapsed = stamps[-1] - stamps[0]
    expected = (n - 1) * interval
    assert 0.8 * expected <= elapsed <= 2 * expected


async def test_polls_sit_on_the_phase_grid_of_the_loop_clock() -> None:
    # The first read comes at once after connecting; the next ones land on offset + k *
    # interval of the loop's clock, whenever the adapter connected, so devices sharing a
    # phase wake the loop once.
    signals = {"state": signal(address=0, type="uint16")}
    interval, phase = 0.2, 0.06
    async with modbus_server([registers(0, [1])]) as (_, port):
        adapter = create("sew-09", conn(port), signals, interval, phase)
        loop = asyncio.get_running_loop()
        async with adapter, asyncio.timeout(5):
            started = loop.time()
            stamps: list[float] = []
            async for _ in adapter.samples():
                stamps.append(loop.time())
                if len(stamps) == 4:
                    break
    assert stamps[0] - started < 0.05  # one loopback round trip
    # At least half an interval to the second read, at most one and a half.
    assert interval / 2 - 0.001 <= stamps[1] - stamps[0] <= 1.5 * interval + 0.05
    for t in stamps[1:]:
        # Late by the read itself at most (loopback: well under 50 ms), never early.
        assert 0 <= (t - phase) % interval < 0.05 or (t - phase) % interval > interval - 0.001


async def test_request_delay_spaces_the_requests() -> None:
    signals = {"a": signal(address=0, type="uint16"), "b": signal(address=50, type="uint16")}
    async with modbus_server([registers(0, [1]), registers(50, [2])]) as (_, port):
        adapter = ModbusAdapter("sew-10", conn(port, request_delay=0.1), signals, 0.01)
        assert len(adapter.plan) == 2  # the gap of 49 is wider than max_gap
        async with adapter:
            started = time.monotonic()
            [batch] = await take(adapter, 1)
            assert time.monotonic() - started >= 0.08
    assert {s.value for s in batch} == {1, 2}


async def test_adapter_reconnects_after_exit() -> None:
    signals = {"state": signal(address=0, type="uint16")}
    async with modbus_server([registers(0, [4])]) as (_, port):
        adapter = ModbusAdapter("sew-11", conn(port), signals, 0.01)
        for _ in range(2):  # the supervisor re-enters the same adapter after a drop
            async with adapter:
                [batch] = await take(adapter, 1)
                assert batch[0].value == 4
        with pytest.raises(RuntimeError, match="async with"):
            await take(adapter, 1)
