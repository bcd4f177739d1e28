"""Modbus lines are owned: machines of one owner share an endpoint's line, owners never do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.core.model import Quality
from shopfloor_gateway.adapters.base import ConnectionLost
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.line import LinePool
from shopfloor_gateway.adapters.registry import Adapters
from shopfloor_gateway.simulators.modbus_server import LineStation, SimulatedLine
from shopfloor_gateway.simulators.sewing import StationModel

pytestmark = pytest.mark.integration

SIGNALS = {"state": ModbusSignalConfig(address=0, type="uint16")}


def conn(port: int, unit_id: int) -> ModbusConnectionConfig:
    """Modbus TCP to the simulated line on ``port``, one unit id behind it."""
    return ModbusConnectionConfig(host="127.0.0.1", port=port, unit_id=unit_id, timeout=1.0)


def connections_to(port: int) -> int:
    """Established TCP connections from this host to 127.0.0.1:``port`` (Linux)."""
    count = 0
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Wait until ``cond()`` holds (kernel state has no change notification)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polls kernel state under a timeout
            await asyncio.sleep(0.01)


async def first_batch_good(adapter: ModbusAdapter) -> None:
    """One poll of ``adapter`` answers with good samples."""
    async with asyncio.timeout(5):
        async for batch in adapter.samples():
            assert all(s.quality is Quality.GOOD for s in batch), batch
            return


@pytest.fixture
async def line() -> AsyncIterator[SimulatedLine]:
    """Two stations (unit ids 1 and 2) behind one simulated Modbus TCP endpoint."""
    stations = [LineStation("a", 1, StationModel(name="a")), LineStation("b", 2, StationModel())]
    async with SimulatedLine(stations, transport="tcp") as sim:
        yield sim


async def test_machines_of_one_owner_share_one_connection(line: SimulatedLine) -> None:
    pool = LinePool()
    a = ModbusAdapter("a", conn(line.port, 1), SIGNALS, 0.02, lines=pool)
    b = ModbusAdapter("b", conn(line.port, 2), SIGNALS, 0.02, lines=pool)
    async with a, b:
        assert pool.open_lines() == {f"tcp://127.0.0.1:{line.port}": 2}
        await first_batch_good(a)
        await first_batch_good(b)
        assert connections_to(line.port) == 1
    # The last machine out closed the line.
    assert pool.open_lines() == {}
    await until(lambda: connections_to(line.port) == 0)


async def test_two_owners_never_share_and_closing_one_leaves_the_other(
    line: SimulatedLine,
) -> None:
    # Two gateways in one process on one event loop: each has its own lines.
    mine, theirs = LinePool(), LinePool()
    a = ModbusAdapter("a", conn(line.port, 1), SIGNALS, 0.02, lines=mine)
    b = ModbusAdapter("b", conn(line.port, 2), SIGNALS, 0.02, lines=theirs)
    async with a, b:
        await first_batch_good(a)
        await first_batch_good(b)
        assert connections_to(line.port) == 2
        mine.close()
        assert mine.open_lines() == {}
        await until(lambda: connections_to(line.port) == 1)
        # The closed owner's machine fails at once and does not reopen the line behind it.
        with pytest.raises(ConnectionLost, match="closed"):
            await first_batch_good(a)
        assert connections_to(line.port) == 1
        await first_batch_good(b)
        assert theirs.open_lines() == {f"tcp://127.0.0.1:{line.port}": 1}
    with pytest.raises(RuntimeError, match="closed"):
        await mine.acquire(conn(line.port, 1))


async def test_the_runtime_factory_shares_lines_and_closes_them(line: SimulatedLine) -> None:
    adapters = Adapters()
    a = adapters.create("modbus", "a", conn(line.port, 1), SIGNALS, 0.02, 0.0)
    b = adapters.create("modbus", "b", conn(line.port, 2), SIGNALS, 0.02, 0.0)
    assert isinstance(a, ModbusAdapter) and isinstance(b, ModbusAdapter)
    await a.__aenter__()
    await b.__aenter__()
    try:
        await first_batch_good(a)
        await first_batch_good(b)
        assert adapters.modbus_lines.open_lines() == {f"tcp://127.0.0.1:{line.port}": 2}
        assert connections_to(line.port) == 1
        # The owner stops: whatever its adapters still hold is closed with it.
        adapters.close()
        await until(lambda: connections_to(line.port) == 0)
    finally:
        await a.__aexit__(None, None, None)
        await b.__aexit__(None, None, None)
    assert adapters.modbus_lines.open_lines() == {}
