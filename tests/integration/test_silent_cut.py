"""A silent network cut between the gateway and its broker: packets stop, TCP stays open.

The fault proxy forwards the gateway's MQTT connection and then stalls it: nothing is
forwarded either way, nothing is closed, as when a switch or a cellular uplink dies. The
gateway must notice within two keepalive intervals, reconnect once the link is back, and
lose nothing in between.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from shopfloor_gateway.simulators.faultproxy import FaultProxy, FaultStep
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import by_machine, events, gateway_process, short

KEEPALIVE = 5


def log_events(log: Path, name: str) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [rec for rec in lines if rec.get("event") == name]


async def test_silent_cut_is_noticed_and_loses_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    script = [Idle(1.0), RunOrder("PO-CUT", target=60, piece_seconds=0.25), Idle(60.0)]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    log = tmp_path / "gw.log"
    async with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "gateway: {id: gw-cut, site: plant-1, topic_prefix: cut}\n"
            "health: {listen: null}\n"  # 9108 may be taken: run would refuse
            f"broker: {{host: 127.0.0.1, port: {proxy.port}, keepalive: {KEEPALIVE}}}\n"
            "logging: {level: info, format: json}\n"
            "tracker: {progress_step_percent: 5, progress_interval: 1}\n"
            "machines:\n"
            "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
            " poll_interval: 0.1,"
            f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}\n"
        )
        async with (
            Subscriber(mosquitto.host, mosquitto.port, "cut/#") as sub,
            SimulatedFloor(stations) as floor,
            gateway_process(cfg, log),
        ):
            await sub.wait_for(
                lambda ms: any(short(e) == "order.progress" for e in events(ms)), timeout=20
            )
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            proxy.inject(FaultStep(fault="stall"))
            while not log_events(log, "mqtt.broker_connection_lost"):
                assert loop.time() - cut_at < 2 * KEEPALIVE + 3, "the cut went unnoticed"
                await asyncio.sleep(0.1)
            noticed = loop.time() - cut_at
            assert noticed <= 2 * KEEPALIVE + 1, f"noticed after {noticed:.1f} s"
            proxy.inject(FaultStep(fault="heal"))

            def completed(ms: list[Received]) -> bool:
                return any(short(e) == "order.completed" for e in events(ms))

            await sub.wait_for(completed, timeout=60)
            truth = floor.stations[0].model.truth["PO-CUT"]
            received = list(sub.messages)
    stream = by_machine(events(received))["sew-01"]
    ids = [e["id"] for e in stream]
    unique = {e["id"]: e for e in stream}
    seqs = sorted(e["sequence"] for e in unique.values())
    assert seqs == list(range(1, len(seqs) + 1)), "every event arrived, none missing"
    duplicates = len(ids) - len(unique)
    assert duplicates <= 100, duplicates  # only within the in-flight window
    done = next(e["data"] for e in unique.values() if short(e) == "order.completed")
    assert done["good"] == truth.good
    delayed = [e for e in unique.values() if e.get("delayed")]
    assert delayed, "events held during the cut are marked delayed"
