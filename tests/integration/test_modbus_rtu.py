"""Modbus RTU over a pseudo-terminal pair, and shared lines (several unit ids, one connection)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import pytest

from gateway.core.model import Quality, Sample
from shopfloor_gateway.adapters.base import ConnectionLost
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.line import LinePool
from shopfloor_gateway.simulators.modbus_server import LineStation, SimulatedLine
from shopfloor_gateway.simulators.scenario import Changeover, RunOrder
from shopfloor_gateway.simulators.serial_link import PtyLink
from shopfloor_gateway.simulators.sewing import StationModel

pytestmark = pytest.mark.integration

SIGNALS = {
    "state": ModbusSignalConfig(address=0, type="uint16"),
    "good_count": ModbusSignalConfig(address=1, type="uint32"),
    "scrap_count": ModbusSignalConfig(address=3, type="uint32"),
    "target_count": ModbusSignalConfig(address=5, type="uint32"),
    "order_id": ModbusSignalConfig(address=10, type="string", length=20),
}


def rtu(port: str, unit_id: int, timeout: float = 0.3) -> ModbusConnectionConfig:
    """An RTU connection on a pty end at a fast baud rate."""
    return ModbusConnectionConfig(
        transport="rtu",
        serial={"port": port, "baudrate": 115200, "parity": "N"},  # type: ignore[arg-type]
        unit_id=unit_id,
        timeout=timeout,
    )


def values(batch: Sequence[Sample]) -> dict[str, object]:
    """Signal -> value of one batch (all samples good)."""
    assert all(s.quality is Quality.GOOD for s in batch), batch
    return {s.signal: s.value for s in batch}


async def test_full_order_over_rtu_on_a_pty() -> None:
    model = StationModel(
        [RunOrder("PO-RTU-1", target=6, piece_seconds=0.5, scrap_every=3), Changeover(30)],
        name="sew-rtu",
    )
    async with (
        PtyLink() as link,
        SimulatedLine(
            [LineStation("sew-rtu", 7, model)],
            transport="rtu",
            serial_port=link.ends[0],
            baudrate=115200,
            speed=20,
            tick=0.02,
        ),
    ):
        adapter = ModbusAdapter("sew-rtu", rtu(link.ends[1], 7), SIGNALS, 0.02)
        seen: list[dict[str, object]] = []
        async with adapter, asyncio.timeout(10):
            async for batch in adapter.samples():
                seen.append(values(batch))
                if seen[-1]["state"] == 4:  # changeover: the order is done
                    break
        assert link.forwarded[0] > 0 and link.forwarded[1] > 0  # real frames over the tty
        last = seen[-1]
        assert last["order_id"] == "PO-RTU-1"
        assert last["good_count"] == 6
        assert last["scrap_count"] == model.truth["PO-RTU-1"].scrap
        goods = [int(v["good_count"]) for v in seen if v["order_id"] == "PO-RTU-1"]  # type: ignore[call-overload]
        assert goods == sorted(goods)  # counts never go backwards
        assert any(v["state"] == 1 for v in seen)  # running was observed


async def test_silent_unit_costs_one_timeout_per_cycle_and_others_stay_on_schedule() -> None:
    stations = [
        LineStation("a", 1, StationModel(name="a")),
        LineStation("b", 2, StationModel(name="b")),
    ]
    timeout = 0.2
    pool = LinePool()
    async with (
        PtyLink() as link,
        SimulatedLine(stations, transport="rtu", serial_port=link.ends[0], baudrate=115200),
    ):
        good = [
            ModbusAdapter(name, rtu(link.ends[1], unit, timeout), SIGNALS, 0.1, lines=pool)
            for name, unit in (("a", 1), ("b", 2))
        ]
        ghost = ModbusAdapter("ghost", rtu(link.ends[1], 9, timeout), SIGNALS, 0.1, lines=pool)
        stamps: dict[str, list[float]] = {"a": [], "b": []}
        ghost_failures = 0

        async def poll(adapter: ModbusAdapter) -> None:
            async with adapter:
                async for _ in adapter.samples():
                    stamps[adapter.machine].append(time.monotonic())

        async def haunt() -> None:
            # What the runtime's supervisor does: re-enter after every ConnectionLost.
            nonlocal ghost_failures
            while True:
                async with ghost:
                    with pytest.raises(ConnectionLost, match="no response"):
                        async for _ in ghost.samples():
                            pass
                ghost_failures += 1

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(poll(a)) for a in good] + [tg.create_task(haunt())]
            async with asyncio.timeout(10):
                while min(len(v) for v in stamps.values()) < 12:  # noqa: ASYNC110 (polls a condition under a timeout)
                    await asyncio.sleep(0.02)
            assert pool.open_lines() == {f"rtu://{link.ends[1]}": 3}  # one shared line
            for task in tasks:
                task.cancel()
        assert ghost_failures >= 3  # reported offline again and again, never a sample
        for name, times in stamps.items():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            # The poll interval is 0.1 s; the silent unit may hold the line for at most
            # its timeout once per cycle (plus slack for a busy test machine).
            assert max(gaps) < 0.1 + timeout + 0.3, (name, gaps)
    assert pool.open_lines() == {}  # the last adapter out closed the line


async def test_rtu_over_tcp_shares_one_connection_between_units() -> None:
    stations = [
        LineStation("a", 1, StationModel(name="a")),
        LineStation("b", 2, StationModel(name="b")),
    ]
    pool = LinePool()
    async with SimulatedLine(stations, transport="rtu_over_tcp") as sim:
        conns = [
            ModbusConnectionConfig(
                transport="rtu_over_tcp", host="127.0.0.1", port=sim.port, unit_id=u
            )
            for u in (1, 2)
        ]
        adapters = [
            ModbusAdapter(f"m{u}", c, SIGNALS, 0.02, lines=pool)
            for u, c in zip((1, 2), conns, strict=True)
        ]
        async with adapters[0], adapters[1]:
            assert pool.open_lines() == {f"rtu+tcp://127.0.0.1:{sim.port}": 2}
            for adapter in adapters:
                async with asyncio.timeout(5):
                    async for batch in adapter.samples():
                        assert all(s.quality is Quality.GOOD for s in batch)
                        break
