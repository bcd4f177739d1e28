"""Integration tests: the OPC UA simulator's latency probe (``--latency-probe PERIOD``).

The CNC's order id node changes on a jittered schedule to ``L<epoch ms of the change>`` with
the change's instant as its SourceTimestamp; everything else keeps following the scenario.
One server (a second of CPU to start) is shared by the live tests.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node

from shopfloor_gateway.simulators import cnc, opcua_cli
from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_server import LatencyProbe, OpcUaMachineServer, probe_value
from shopfloor_gateway.simulators.scenario import RunOrder

pytestmark = [pytest.mark.integration]
live = pytest.mark.asyncio(loop_scope="module")

PERIOD = 0.2
FROZEN = 1e-9  # scenario seconds per wall-clock second: the scenario's values stay put


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def probed() -> AsyncIterator[OpcUaMachineServer]:
    model = CncModel([RunOrder("PO-77", target=10, piece_seconds=30.0)], name="cnc-01")
    probe = LatencyProbe(cnc.K_JOB_ID, PERIOD, phase=0.25)
    async with OpcUaMachineServer(model, port=free_port(), speed=FROZEN, probe=probe) as server:
        yield server


async def node(client: Client, server: OpcUaMachineServer, key: str) -> Node:
    index = await client.get_namespace_index(server.namespace)
    return client.get_node(ua.NodeId(server.model.address_space.node_id(key), index))


def stamp_of(value: object) -> float:
    assert isinstance(value, str) and value.startswith("L"), value
    return int(value[1:]) / 1000


@live
async def test_order_id_changes_to_its_own_change_time(probed: OpcUaMachineServer) -> None:
    probe = probed.probe
    assert probe is not None
    async with Client(probed.endpoint, timeout=3) as client:
        order = await node(client, probed, cnc.K_JOB_ID)
        first = (await order.read_data_value()).Value.Value
        changes: list[tuple[str, float, float]] = []  # value, SourceTimestamp, seen at
        async with asyncio.timeout(2 + 4 * PERIOD):
            while len(changes) < 3:
                dv = await order.read_data_value()
                value = dv.Value.Value
                if value != (changes[-1][0] if changes else first):
                    assert dv.SourceTimestamp is not None
                    changes.append((value, dv.SourceTimestamp.timestamp(), time.time()))
                await asyncio.sleep(0.005)  # a reader polling the device, not a synchronisation
        # The scenario's other nodes are untouched: the running job keeps its identifier.
        job = await node(client, probed, cnc.K_JOB_IDENTIFIER)
        assert await job.read_value() == "PO-77"
    previous = stamp_of(first)
    for index, (value, source, seen) in enumerate(changes):
        stamp = stamp_of(value)
        # The value names the instant of the change, and the server stamps that instant.
        assert abs(stamp - source) <= 0.002, (value, source)
        assert previous < stamp <= seen + 0.001
        if index:
            # Changes come on the schedule (the first may follow the start-up value, which
            # is off it): never before it is due. How late a write comes depends on the
            # machine's load (the stamp carries the real instant, which is what the latency
            # bench needs), so lateness is bounded loosely.
            due = probe.next_change(previous)
            assert due - 0.001 <= stamp <= due + 1.0, (stamp, due)
        previous = stamp


@live
async def test_a_subscriber_sees_every_change_with_its_stamp(probed: OpcUaMachineServer) -> None:
    seen: asyncio.Queue[ua.DataValue] = asyncio.Queue()

    class Handler:
        def datachange_notification(self, node: Node, val: object, data: object) -> None:
            seen.put_nowait(data.monitored_item.Value)  # type: ignore[attr-defined]

    async with Client(probed.endpoint, timeout=3) as client:
        order = await node(client, probed, cnc.K_JOB_ID)
        sub = await client.create_subscription(50, Handler())
        await sub.subscribe_data_change(order)
        async with asyncio.timeout(2 + 3 * PERIOD):
            initial = await seen.get()
            later = [await seen.get(), await seen.get()]
    stamps = [stamp_of(dv.Value.Value) for dv in [initial, *later]]
    assert stamps == sorted(set(stamps))
    for dv in later:
        assert dv.SourceTimestamp is not None
        assert abs(stamp_of(dv.Value.Value) - dv.SourceTimestamp.timestamp()) <= 0.002


def test_schedule_is_jittered_and_strictly_ahead() -> None:
    probe = LatencyProbe("k", 1.0, phase=0.5, origin=1_000.0)
    t = 1_000.0
    gaps = []
    for _ in range(50):
        nxt = probe.next_change(t)
        assert t < nxt <= t + 1.5
        gaps.append(nxt - t)
        t = nxt
    assert min(gaps) >= 0.5
    assert len({round(g, 3) for g in gaps}) > 1  # not a fixed rate
    assert probe.next_change(0.0) == 1_000.5  # before the origin: the first change
    assert probe_value(1_700_000_000.1234) == "L1700000000123"


@pytest.mark.parametrize(
    ("period", "phase"), [(0.0, 0.0), (-1.0, 0.0), (math.nan, 0.0), (math.inf, 0.0), (1.0, 1.0)]
)
def test_bad_schedules_are_refused(period: float, phase: float) -> None:
    with pytest.raises(ValueError, match="latency probe"):
        LatencyProbe(cnc.K_JOB_ID, period, phase=phase)


def test_probe_needs_a_string_node_that_exists() -> None:
    model = CncModel(name="cnc-01")
    with pytest.raises(ValueError, match="not a String variable"):
        OpcUaMachineServer(model, probe=LatencyProbe(cnc.K_PARTS_GOOD, 1.0))
    with pytest.raises(ValueError, match="not a String variable"):
        OpcUaMachineServer(model, probe=LatencyProbe("No/Such/Node", 1.0))
    with pytest.raises(ValueError, match="missing"):
        OpcUaMachineServer(model, probe=LatencyProbe(cnc.K_JOB_ID, 1.0), missing=[cnc.K_JOB_ID])


@pytest.mark.parametrize("text", ["0", "-0.5", "nan", "inf", "soon"])
def test_cli_refuses_bad_periods(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    opcua_cli.add_arguments(parser, "cnc")
    with pytest.raises(SystemExit):
        parser.parse_args(["--latency-probe", text])
    assert "--latency-probe" in capsys.readouterr().err


def test_cli_probe_only_for_the_cnc() -> None:
    parser = argparse.ArgumentParser()
    opcua_cli.add_arguments(parser, "cnc")
    assert parser.parse_args(["--latency-probe", "0.5"]).latency_probe == 0.5
    assert parser.parse_args([]).latency_probe is None
    robot = argparse.ArgumentParser()
    opcua_cli.add_arguments(robot, "robot")
    with pytest.raises(SystemExit):
        robot.parse_args(["--latency-probe", "0.5"])
    with pytest.raises(ValueError, match="no order id node"):
        opcua_cli.probe_for("robot", 0.5, 4850)
    phases = {opcua_cli.probe_for("cnc", 1.0, port).phase for port in range(4840, 4850)}
    assert len(phases) == 10  # machines on neighbouring ports change at different moments
