"""Two platforms on two brokers command one machine: ids, verdicts and order ids stay apart.

Each platform picks its own command ids, so two platforms may use the same id; neither may
get, or cause, the other's verdict. A refusal must not tell a platform that another
platform's order exists, nor how long the queue is. A platform that queues many orders keeps
receiving the events of its running order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.core.tracker import ORDER_ID_TAKEN
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import events, gateway_process, short
from tests.integration.test_commands import send_until_answered

PREFIX = "iso"
SITE = "plant-1"
CMD = f"{PREFIX}/{SITE}/sewing/line-1/box-01/cmd"
REPLIES = f"{PREFIX}/+/+/+/+/cmd/+/response"
#: More than the 64 finished orders whose customers are remembered.
QUEUED = 70


def write_config(tmp_path: Path, acme: MosquittoBroker, zeta: MosquittoBroker, port: int) -> Path:
    def destination(name: str, broker: MosquittoBroker) -> str:
        return json.dumps(
            {
                "name": name,
                "host": broker.host,
                "port": broker.port,
                "routing": {"customers": [name]},
            }
        )

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-iso, site: {SITE}, topic_prefix: {PREFIX}}}",
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                "tracker: {order_source: platform, progress_step_percent: 10}",
                "destinations:",
                f"  - {destination('acme', acme)}",
                f"  - {destination('zeta', zeta)}",
                "machines:",
                "  - {id: box-01, area: sewing, line: line-1, profile: sewing-station,"
                " poll_interval: 0.1,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}},"
                " signals: {order_id: null, target_count: null, state: null}}",
            ]
        )
        + "\n"
    )
    return cfg


async def test_command_ids_verdicts_and_order_ids_stay_with_their_platform(
    tmp_path: Path,
) -> None:
    acme = MosquittoBroker(tmp_path / "acme")
    zeta = MosquittoBroker(tmp_path / "zeta")
    port = free_port()
    script = [Idle(1.0), RunOrder("dev", target=100_000, piece_seconds=0.1), Idle(60)]
    cfg = write_config(tmp_path, acme, zeta, port)
    acme.start()
    zeta.start()
    try:
        async with (
            Subscriber(acme.host, acme.port, f"{PREFIX}/+/+/+/+/event/#") as sub_a,
            Subscriber(acme.host, acme.port, REPLIES) as replies_a,
            Subscriber(zeta.host, zeta.port, REPLIES) as replies_z,
            Subscriber(zeta.host, zeta.port, f"{PREFIX}/+/+/+/+/state") as state_z,
            SimulatedFloor([StationSpec("box-01", port, StationModel(script, name="box-01"))]),
            gateway_process(cfg, tmp_path / "gw.log"),
            aiomqtt.Client(acme.host, acme.port, identifier="platform-acme") as platform_a,
            aiomqtt.Client(zeta.host, zeta.port, identifier="platform-zeta") as platform_z,
        ):

            async def ask_a(command: str, body: dict[str, Any]) -> dict[str, Any]:
                return await send_until_answered(platform_a, replies_a, f"{CMD}/{command}", body)

            async def ask_z(command: str, body: dict[str, Any]) -> dict[str, Any]:
                return await send_until_answered(platform_z, replies_z, f"{CMD}/{command}", body)

            started = await ask_a(
                "assign-order", {"command_id": "a-1", "order_id": "ACME-1", "target": 500}
            )
            assert started == {**started, "accepted": True, "reason": "started"}

            # zeta happens to pick acme's command id: its own command runs, with its own
            # verdict, and no queue position (the queue holds acme's orders too).
            own = await ask_z(
                "assign-order", {"command_id": "a-1", "order_id": "ZETA-1", "target": 5}
            )
            assert own == {**own, "accepted": True, "reason": "queued"}, own

            # zeta cancels its own order with an id acme will use next ...
            gone = await ask_z("cancel-order", {"command_id": "a-2", "order_id": "ZETA-1"})
            assert gone == {**gone, "accepted": True, "reason": "removed from queue"}, gone
            # ... and acme's command with that id is still run, not answered with zeta's verdict.
            queued = await ask_a(
                "assign-order", {"command_id": "a-2", "order_id": "ACME-2", "target": 5}
            )
            assert queued == {**queued, "accepted": True, "reason": "queued"}, queued

            # zeta guesses acme's order ids: the same neutral words for a running and a
            # queued order, never "already running" or "already queued".
            for i, order_id in enumerate(["ACME-1", "ACME-2"]):
                guess = await ask_z(
                    "assign-order", {"command_id": f"z-g{i}", "order_id": order_id, "target": 5}
                )
                assert guess == {**guess, "accepted": False, "reason": ORDER_ID_TAKEN}, guess
                assert order_id not in guess["reason"]

            # acme fills the queue beyond what the customer lookup kept before.
            for i in range(QUEUED):
                more = await ask_a(
                    "assign-order", {"command_id": f"a-q{i}", "order_id": f"ACME-Q{i}", "target": 5}
                )
                assert more["accepted"] is True, more
                assert "position" not in more["reason"]

            # acme still owns its running order: it may cancel it, and it sees it end.
            cancelled = await ask_a("cancel-order", {"command_id": "a-c", "order_id": "ACME-1"})
            assert cancelled == {**cancelled, "accepted": True, "reason": "cancelled"}, cancelled

            def completed(ms: list[Received]) -> bool:
                return any(
                    short(e) == "order.completed" and e["data"]["order_id"] == "ACME-1"
                    for e in events(ms)
                )

            await sub_a.wait_for(completed, timeout=15)
            # Every event of ACME-1 from start to end reached acme, gap-free in sequence.
            mine = [e for e in events(sub_a.messages) if e["data"].get("order_id") == "ACME-1"]
            assert short(mine[0]) == "order.started"
            assert short(mine[-1]) == "order.completed"
            # Nothing of zeta's orders ever reached acme.
            assert all("ZETA" not in json.dumps(e["data"]) for e in events(sub_a.messages))

            # zeta's retained state counts only zeta's waiting orders (none by now), never
            # acme's 70: not even the length of the queue tells of another platform.
            last = mine[-1]["sequence"]

            def states(ms: list[Received]) -> list[dict[str, Any]]:
                return [json.loads(m.payload) for m in ms if m.payload]

            got = await state_z.wait_for(
                lambda ms: any(st["sequence"] >= last for st in states(ms)), timeout=10
            )
            assert all(st["queued"] <= 1 for st in states(got)), [
                st["queued"] for st in states(got)
            ]
            assert states(got)[-1]["queued"] == 0
    finally:
        acme.stop()
        zeta.stop()


async def test_two_destinations_on_one_broker_answer_each_command_once(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-one, site: {SITE}, topic_prefix: {PREFIX}}}",
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                "tracker: {order_source: platform}",
                "destinations:",
                f"  - {{name: mes, host: 127.0.0.1, port: {mosquitto.port}}}",
                f"  - {{name: audit, host: 127.0.0.1, port: {mosquitto.port}}}",
                "machines:",
                "  - {id: box-01, area: sewing, line: line-1, profile: sewing-station,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}},"
                " signals: {order_id: null, target_count: null}}",
            ]
        )
        + "\n"
    )
    async with (
        Subscriber(mosquitto.host, mosquitto.port, REPLIES) as replies,
        SimulatedFloor([StationSpec("box-01", port, StationModel([Idle(60)], name="box-01"))]),
        gateway_process(cfg, tmp_path / "gw.log"),
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="platform") as platform,
    ):
        first = await send_until_answered(
            platform,
            replies,
            f"{CMD}/assign-order",
            {"command_id": "c-1", "order_id": "SO-1", "target": 5},
        )
        assert first == {**first, "accepted": True, "reason": "started"}, first
        # A second command, answered once, marks the point by which a second listener's
        # answer to the first would have arrived as well.
        await send_until_answered(
            platform,
            replies,
            f"{CMD}/assign-order",
            {"command_id": "c-2", "order_id": "SO-2", "target": 5},
        )
        answers = [json.loads(m.payload) for m in replies.messages]
        ids = [a["command_id"] for a in answers]
        assert ids == ["c-1", "c-2"], answers

        # A retained command published while the gateway listens is refused, not run: the
        # subscription keeps the retain flag of live messages (retain as published).
        await platform.publish(
            f"{CMD}/assign-order",
            json.dumps({"command_id": "c-3", "order_id": "SO-3", "target": 5}),
            qos=1,
            retain=True,
        )
        got = await replies.wait_for(
            lambda ms: any(json.loads(m.payload)["command_id"] == "c-3" for m in ms), timeout=10
        )
        retained = next(json.loads(m.payload) for m in got if b'"c-3"' in m.payload)
        assert retained["accepted"] is False, retained
        assert "retained commands are not accepted" in retained["reason"]
        await platform.publish(f"{CMD}/assign-order", b"", qos=1, retain=True)
    log = (tmp_path / "gw.log").read_text()
    assert "destination audit: takes no commands" in log
