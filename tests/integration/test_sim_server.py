"""Integration tests: simulated sewing stations served over real Modbus TCP on loopback."""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from gateway.core.vocabulary import MachineState
from shopfloor_gateway.simulators import cli
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Changeover, RunOrder, Step
from shopfloor_gateway.simulators.sewing import (
    REGISTER_COUNT,
    StationModel,
    StationSnapshot,
    decode_registers,
)

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


@asynccontextmanager
async def modbus_client(
    port: int, request_timeout: float = 5.0
) -> AsyncIterator[AsyncModbusTcpClient]:
    """A connected client without retries, closed on exit.

    The timeout only catches a server that never answers: the client, the servers and the
    simulator's clock share this test's event loop, so a pause of the whole process (a full
    collection of the suite's heap, see ``no_gc_pause``; a loaded host) delays an answer that
    is on its way. With 1 s, one such pause made a late answer arrive just after pymodbus gave
    up ("received pdu without a corresponding request").
    """
    client = AsyncModbusTcpClient(
        HOST, port=port, timeout=request_timeout, retries=0, reconnect_delay=0.5
    )
    try:
        assert await client.connect(), f"no Modbus server on {HOST}:{port}"
        yield client
    finally:
        client.close()


async def read_snapshot(client: AsyncModbusTcpClient, unit_id: int = 1) -> StationSnapshot:
    """Read and decode the whole register map."""
    response = await client.read_holding_registers(0, count=REGISTER_COUNT, device_id=unit_id)
    assert not response.isError(), response
    return decode_registers(response.registers)


async def refuses(port: int) -> bool:
    """True when nothing accepts TCP connections on the port."""
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def slow_script() -> list[RunOrder]:
    """A script whose first piece takes longer than any test."""
    return [RunOrder("PO-24117", target=40, piece_seconds=10_000.0)]


async def test_floor_serves_each_station_on_its_port() -> None:
    scripted = StationModel(slow_script(), name="sew-01")
    generated = StationModel(seed=5, name="sew-02")
    specs = [
        StationSpec("sew-01", free_port(), scripted),
        StationSpec("sew-02", free_port(), generated, unit_id=3),
    ]
    # Scenario time barely moves at this speed, so the registers are the models' start values.
    async with asyncio.timeout(10), SimulatedFloor(specs, speed=1e-6) as floor:
        assert floor.stations[0].model is scripted
        async with modbus_client(specs[0].port) as client:
            snap = await read_snapshot(client)
            assert (snap.state, snap.order_id, snap.good_count, snap.target_count) == (
                MachineState.RUNNING,
                "PO-24117",
                0,
                40,
            )
            assert snap.operator.startswith("B-")
        async with modbus_client(specs[1].port) as client:
            response = await client.read_holding_registers(0, count=REGISTER_COUNT, device_id=3)
            assert response.registers == generated.registers()
            assert decode_registers(response.registers).order_id == generated.order_id


@pytest.mark.usefixtures("no_gc_pause")
async def test_live_counts_reach_the_client_and_end_equal_to_truth() -> None:
    script: list[Step] = [
        RunOrder("PO-7", target=20, piece_seconds=0.5, scrap_every=4),
        Changeover(10.0),  # long enough that a busy test machine still sees it
    ]
    model = StationModel(script, name="sew-01")
    spec = StationSpec("sew-01", free_port(), model)
    seen: list[StationSnapshot] = []
    async with (
        asyncio.timeout(15),
        SimulatedFloor([spec], speed=20.0, tick=0.01) as floor,
        modbus_client(spec.port) as client,
    ):
        while not model.finished:
            seen.append(await read_snapshot(client))
        await floor.wait_finished(timeout=5.0)
        final = await read_snapshot(client)
    goods = [s.good_count for s in seen]
    assert goods == sorted(goods), "counts never go backwards within one order"
    assert len(set(goods)) >= 3, "the client saw the count move, not only the end"
    assert MachineState.SETUP in {s.state for s in seen}
    truth = model.truth["PO-7"]
    assert (truth.good, truth.scrap, truth.completed) == (20, 6, True)
    assert (final.state, final.order_id, final.good_count, final.scrap_count) == (
        MachineState.IDLE,
        "PO-7",
        truth.good,
        truth.scrap,
    )


async def test_addresses_outside_the_map_writes_and_unknown_units_are_refused() -> None:
    spec = StationSpec("sew-01", free_port(), StationModel(slow_script()))
    async with (
        asyncio.timeout(10),
        SimulatedFloor([spec], speed=1e-6),
        modbus_client(spec.port) as client,
    ):
        for address, count in ((40, 1), (39, 2), (0, 41), (1000, 4)):
            response = await client.read_holding_registers(address, count=count, device_id=1)
            assert response.isError(), (address, count)
            assert response.exception_code == 2  # ILLEGAL DATA ADDRESS
        before = await read_snapshot(client)
        response = await client.write_register(0, 3, device_id=1)
        assert response.isError()
        assert response.exception_code == 1  # ILLEGAL FUNCTION: a read-only counter
        response = await client.write_registers(1, [0, 99], device_id=1)
        assert response.exception_code == 1
        assert await read_snapshot(client) == before
        response = await client.read_input_registers(0, count=2, device_id=1)
        assert response.exception_code == 1  # holding registers only
        response = await client.read_coils(0, count=8, device_id=1)
        assert response.exception_code == 1
        response = await client.read_holding_registers(0, count=1, device_id=9)
        assert response.exception_code == 0x0B  # gateway target device failed to respond


async def test_a_stopped_station_refuses_connections_until_started_again() -> None:
    specs = [
        StationSpec("sew-01", free_port(), StationModel(slow_script())),
        StationSpec("sew-02", free_port(), StationModel(slow_script())),
    ]
    async with asyncio.timeout(10), SimulatedFloor(specs, speed=1e-6) as floor:
        # pymodbus notices the dropped connection only when the request times out.
        async with modbus_client(specs[0].port, request_timeout=1.0) as client:
            await read_snapshot(client)
            await floor.stop_station("sew-01")
            assert not floor.is_serving("sew-01")
            # The open connection is dropped too, like a device that lost power.
            with pytest.raises(ModbusException):
                await client.read_holding_registers(0, count=1, device_id=1)
        assert await refuses(specs[0].port)
        probe = AsyncModbusTcpClient(HOST, port=specs[0].port, timeout=0.5, retries=0)
        assert not await probe.connect()
        probe.close()
        async with modbus_client(specs[1].port) as other:
            assert (await read_snapshot(other)).order_id == "PO-24117"

        await floor.start_station("sew-01")
        await floor.start_station("sew-01")  # already serving: no-op
        assert floor.is_serving("sew-01")
        async with modbus_client(specs[0].port) as client:
            assert (await read_snapshot(client)).order_id == "PO-24117"
        with pytest.raises(KeyError, match="no station named 'sew-99'"):
            await floor.stop_station("sew-99")


async def test_exit_releases_ports_and_tasks() -> None:
    specs = [
        StationSpec("sew-01", free_port(), StationModel(seed=1, name="sew-01")),
        StationSpec("sew-02", free_port(), StationModel(seed=1, name="sew-02")),
    ]
    before = asyncio.all_tasks()
    async with asyncio.timeout(10):
        async with SimulatedFloor(specs, speed=50.0):
            for spec in specs:
                async with modbus_client(spec.port) as client:
                    await read_snapshot(client)
        for spec in specs:
            assert await refuses(spec.port)
            with socket.socket() as sock:
                sock.bind((HOST, spec.port))  # the port is free for the next user
    assert asyncio.all_tasks() == before


async def test_wait_finished_times_out_while_scripts_run() -> None:
    spec = StationSpec("sew-01", free_port(), StationModel(slow_script()))
    async with asyncio.timeout(10), SimulatedFloor([spec]) as floor:
        with pytest.raises(TimeoutError):
            await floor.wait_finished(timeout=0.1)


async def test_a_failing_tick_surfaces_and_still_stops_the_servers() -> None:
    model = StationModel(slow_script())
    spec = StationSpec("sew-01", free_port(), model)
    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match="must not go backwards"):
            async with SimulatedFloor([spec], speed=1e-6) as floor:
                # Moving the model past the floor's clock is a caller's mistake the tick
                # task cannot recover from: it must not hang wait_finished or leak servers.
                model.advance(1_000.0)
                await floor.wait_finished(timeout=5.0)
        assert await refuses(spec.port)


async def test_a_busy_port_fails_the_start_and_stops_what_was_started() -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        first = free_port()
        specs = [
            StationSpec("sew-01", first, StationModel(slow_script())),
            StationSpec("sew-02", taken, StationModel(slow_script())),
        ]
        with pytest.raises(OSError, match=f"sew-02: cannot listen on 127.0.0.1:{taken}"):
            async with SimulatedFloor(specs):
                pass
        assert await refuses(first)


def test_floor_set_up_is_validated() -> None:
    model = StationModel([])
    with pytest.raises(ValueError, match="names must be unique"):
        SimulatedFloor([StationSpec("a", 5020, model), StationSpec("a", 5021, model)])
    with pytest.raises(ValueError, match="ports must be unique"):
        SimulatedFloor([StationSpec("a", 5020, model), StationSpec("b", 5020, model)])
    with pytest.raises(ValueError, match="speed must be > 0"):
        SimulatedFloor([], speed=0)
    with pytest.raises(ValueError, match=r"unit_id must be 1\.\.247"):
        StationSpec("a", 5020, model, unit_id=0)


async def wait_until_serving(port: int) -> None:
    """Poll until a TCP connection to the port succeeds (callers bound this by a timeout)."""
    while True:
        if not await refuses(port):
            return
        # No event to wait on inside another task's server start-up: poll the socket.
        await asyncio.sleep(0.01)


def cli_args(*argv: str) -> argparse.Namespace:
    """Parse simulator options as the lead's sub-command does."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


async def test_cli_serves_generated_stations_until_cancelled() -> None:
    port = free_port()
    args = cli_args("--stations", "1", "--port", str(port), "--seed", "3", "--speed", "2")
    assert (args.host, args.scenario) == ("127.0.0.1", None)
    expected = StationModel(seed=3, name=cli.station_names(1)[0]).order_id
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(cli.run(args))
        async with asyncio.timeout(10):
            await wait_until_serving(port)
            async with modbus_client(port) as client:
                assert (await read_snapshot(client)).order_id == expected
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert await refuses(port)
    serving = [e for e in logs if e["event"] == "station serving"]
    assert serving == [
        {
            "event": "station serving",
            "log_level": "info",
            "station": "sew-01",
            "address": f"127.0.0.1:{port}",
            "unit_id": 1,
        }
    ]


async def test_cli_rejects_a_bad_scenario_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- run_order: {order_id: PO-1, target: 0, piece_seconds: 1}\n")
    with structlog.testing.capture_logs() as logs:
        assert await cli.run(cli_args("--scenario", str(bad))) == 2
    assert "steps[0].run_order: target must be 1..4294967295" in logs[0]["error"]
