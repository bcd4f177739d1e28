"""``shopfloor_destination_published_total`` counts what each destination's broker acknowledged.

Two destinations on two real brokers, one of them routed to completions only: at a quiet
moment each destination's counter equals what a subscriber on its broker received from the
gateway (events, retained state and status), and the two differ.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import events, gateway_process, short
from tests.integration.test_operations import wait_http

PREFIX = "pubm"


def published(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "shopfloor_destination_published":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["destination"]] = sample.value
    return out


async def test_published_total_counts_each_destinations_acknowledged_messages(
    tmp_path: Path,
) -> None:
    port, health = free_port(), free_port()
    script = [Idle(0.5), RunOrder("PO-M1", target=4, piece_seconds=0.1), Idle(60.0)]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    with (
        MosquittoBroker(tmp_path / "a") as broker_a,
        MosquittoBroker(tmp_path / "b") as broker_b,
    ):
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            f"gateway: {{id: gw-pub, site: plant-1, topic_prefix: {PREFIX}}}\n"
            "destinations:\n"
            f"  - {{name: all, host: 127.0.0.1, port: {broker_a.port}}}\n"
            f"  - {{name: done, host: 127.0.0.1, port: {broker_b.port},"
            " routing: {event_types: [order.completed]}}\n"
            "logging: {level: info, format: json}\n"
            f"health: {{listen: '127.0.0.1:{health}'}}\n"
            "machines:\n"
            "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
            f" poll_interval: 0.1, connection: {{protocol: modbus, host: 127.0.0.1,"
            f" port: {port}}}}}\n"
        )
        async with (
            Subscriber(broker_a.host, broker_a.port, f"{PREFIX}/#") as sub_a,
            Subscriber(broker_b.host, broker_b.port, f"{PREFIX}/#") as sub_b,
            SimulatedFloor(stations),
            gateway_process(cfg, tmp_path / "gw.log"),
        ):

            def completed(ms: list[Received]) -> bool:
                return any(short(e) == "order.completed" for e in events(ms))

            await sub_a.wait_for(completed, timeout=20)
            await sub_b.wait_for(completed, timeout=20)
            # Both counters are monotonic; once the machine idles, the metric (reported once
            # a second) catches up with what the subscribers hold.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:
                counts = published(await wait_http(f"http://127.0.0.1:{health}/metrics", 200))
                got = {"all": len(sub_a.messages), "done": len(sub_b.messages)}
                if counts == got:
                    break
                assert loop.time() < deadline, (counts, got)
                await asyncio.sleep(0.2)
    assert got["all"] > got["done"] > 0
    assert len(events(sub_b.messages)) == 1
