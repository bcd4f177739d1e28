"""Integration tests: the OPC UA simulator samples like a PLC (``--plc-sampling FASTEST``).

The latency probe changes the CNC's order id every 0.2 s. A monitored item sees a change only
at its own sampling ticks, so the client's sampling interval adds latency as on a real
controller; without the option a change is reported as it is written.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.client.client import Client

from shopfloor_gateway.simulators import cnc, opcua_cli
from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_server import LatencyProbe, OpcUaMachineServer
from shopfloor_gateway.simulators.scenario import RunOrder

pytestmark = [pytest.mark.integration]
live = pytest.mark.asyncio(loop_scope="module")

PERIOD = 0.2
FROZEN = 1e-9  # scenario seconds per wall-clock second: the scenario's values stay put


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc() -> AsyncIterator[OpcUaMachineServer]:
    model = CncModel([RunOrder("PO-77", target=10, piece_seconds=30.0)], name="cnc-01")
    probe = LatencyProbe(cnc.K_JOB_ID, PERIOD, phase=0.25)
    async with OpcUaMachineServer(
        model, port=free_port(), speed=FROZEN, probe=probe, plc_sampling=0.01
    ) as server:
        yield server


class Arrivals:
    """Data-change notifications of the probe node: (arrival, change instant) each."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []
        self.more = asyncio.Event()

    def datachange_notification(self, node: object, val: object, data: object) -> None:
        if isinstance(val, str) and val.startswith("L"):
            self.seen.append((time.time(), int(val[1:]) / 1000))
            self.more.set()


async def watch(server: OpcUaMachineServer, sampling_ms: float, count: int) -> list[float]:
    """Seconds between the first ``count`` + 1 probe notifications after the first read."""
    arrivals = Arrivals()
    async with Client(server.endpoint, timeout=3) as client:
        index = await client.get_namespace_index(server.namespace)
        node = client.get_node(ua.NodeId(server.model.address_space.node_id(cnc.K_JOB_ID), index))
        sub = await client.create_subscription(50, arrivals)
        await sub.subscribe_data_change(node, sampling_interval=sampling_ms)
        async with asyncio.timeout(10):
            while len(arrivals.seen) < count + 2:
                arrivals.more.clear()
                await arrivals.more.wait()
        await sub.delete()
    times = [arrival for arrival, _ in arrivals.seen[1 : count + 2]]
    return [b - a for a, b in itertools.pairwise(times)]


@live
async def test_a_slow_sampling_interval_is_honoured(plc: OpcUaMachineServer) -> None:
    # The probe changes every 0.2 s; sampled every 0.6 s, the item sees one change per tick
    # (the newest), so notifications come about 0.6 s apart (publishing: 50 ms).
    gaps = await watch(plc, 600, 3)
    assert min(gaps) > 0.45, gaps


@live
async def test_sampling_at_the_fastest_rate_sees_every_change(plc: OpcUaMachineServer) -> None:
    gaps = await watch(plc, 0, 4)
    assert max(gaps) < 0.45, gaps


@pytest.mark.parametrize("text", ["0", "-1", "nan", "fast"])
def test_the_fastest_sampling_interval_is_checked(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
        opcua_cli.sampling_floor(text)
    with pytest.raises(ValueError, match="plc_sampling"):
        OpcUaMachineServer(
            CncModel([RunOrder("PO-1", target=1, piece_seconds=1.0)], name="cnc-01"),
            plc_sampling=-1.0,
        )
