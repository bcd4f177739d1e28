"""OPC UA end to end: a simulated umati CNC machine → the gateway process → real Mosquitto.

The CNC server is restarted in the middle of an order: the gateway must report the gap
(connection events on both edges), re-create its subscription, and finish the order with
the counts the machine really produced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_server import OpcUaMachineServer
from shopfloor_gateway.simulators.scenario import Changeover, Idle, RunOrder
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.contract_check import assert_valid
from tests.gatewayproc import by_machine, events, gateway_process, short

PREFIX = "opcua"
SITE = "plant-1"


async def test_cnc_order_survives_a_server_restart(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    script = [
        Idle(3.0),
        RunOrder("JOB-881", target=12, piece_seconds=0.5, scrap_every=5),
        Changeover(2.0),
        Idle(60.0),
    ]
    model = CncModel(script, seed=1, name="cnc-01")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"gateway: {{id: gw-opcua, site: {SITE}, topic_prefix: {PREFIX}}}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
        "logging: {level: debug, format: json}\n"
        "tracker: {progress_step_percent: 10, progress_interval: 2}\n"
        "machines:\n"
        "  - id: cnc-01\n"
        "    area: machining\n"
        "    line: line-3\n"
        "    profile: machine-tool-umati\n"
        "    connection:\n"
        "      protocol: opcua\n"
        f"      url: opc.tcp://127.0.0.1:{port}/\n"
        "      publishing_interval: 0.1\n"
        "      sampling_interval: 0.05\n"
        "      timeout: 2.0\n"
    )
    async with (
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
        OpcUaMachineServer(model, port=port, tick=0.05) as server,
        gateway_process(cfg, tmp_path / "gw.log"),
    ):

        def progressing(ms: list[Received]) -> bool:
            return any(short(e) == "order.progress" and e["data"]["good"] >= 2 for e in events(ms))

        await sub.wait_for(progressing, timeout=30)
        # The controller reboots mid-order; it keeps counting while it is away (the
        # scenario runs on), as a real machine finishing its cycle would.
        await server.stop()
        await sub.wait_for(
            lambda ms: any(
                short(e) == "machine.connection.changed" and not e["data"]["connected"]
                for e in events(ms)
            ),
            timeout=15,
        )
        await asyncio.sleep(1.0)  # the outage itself: the machine is away for a second
        await server.start()

        def completed(ms: list[Received]) -> bool:
            return any(short(e) == "order.completed" for e in events(ms))

        await sub.wait_for(completed, timeout=40)
        truth = model.truth["JOB-881"]
        received = list(sub.messages)

    stream = by_machine(events(received))["cnc-01"]
    kinds = [short(e) for e in stream]
    conn = [e["data"]["connected"] for e in stream if short(e) == "machine.connection.changed"]
    assert conn[:3] == [True, False, True], conn
    assert kinds.count("order.started") == 1 and kinds.count("order.completed") == 1
    done = next(e["data"] for e in stream if short(e) == "order.completed")
    assert done["order_id"] == "JOB-881"
    assert done["reason"] == "target_reached"
    # RunsPlanned counts scrap runs too (OPC 40501): the order completes when the job's runs
    # are done, at once, and its percent reaches 100.
    assert done["rule"] == "total_reached"
    assert (done["good"], done["scrap"]) == (truth.good, truth.scrap)
    percents = [e["data"]["percent"] for e in stream if short(e) == "order.progress"]
    assert percents[-1] == 100.0
    goods = [e["data"]["good"] for e in stream if short(e) == "order.progress"]
    assert goods == sorted(goods)
    seqs = [e["sequence"] for e in stream]
    assert seqs == list(range(1, len(seqs) + 1))
    assert_valid(received)
    log = (tmp_path / "gw.log").read_text()
    assert "Traceback" not in log
