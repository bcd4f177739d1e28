"""Platform orders over real MQTT: assign/cancel to stations that only count pieces.

The gateway runs as its own process against real Mosquitto and simulated stations whose
profile maps no order id: the platform tells the gateway which order runs where, as it would
for a cheap counter box on a sewing table.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder, Step
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.contract_check import assert_valid
from tests.gatewayproc import by_machine, events, gateway_process, short

PREFIX = "cmdtest"
SITE = "plant-1"

# The counter box counts pieces; order ids on the device are ignored by the profile. The
# station first sews fast, then slows down (a new operator, a thread break) so the order's
# ETA moves past its due time.
SCRIPT: Sequence[Step] = [
    Idle(3.0),
    RunOrder("dev-job", target=1000, piece_seconds=0.2, pieces=6),
    RunOrder("dev-job", target=1000, piece_seconds=1.0, pieces=7),
    Idle(60.0),
]


def config(path: Path, broker_port: int, ports: dict[str, int]) -> Path:
    machines = "\n".join(
        f"  - id: {name}\n"
        "    area: sewing\n"
        "    line: line-1\n"
        "    profile: sewing-station\n"
        "    poll_interval: 0.1\n"
        f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}\n"
        "    signals: {order_id: null, target_count: null}\n"
        for name, port in ports.items()
    )
    path.write_text(
        f"gateway: {{id: gw-cmd, site: {SITE}, topic_prefix: {PREFIX}}}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        f"broker: {{host: 127.0.0.1, port: {broker_port}}}\n"
        "logging: {level: debug, format: json}\n"
        "tracker:\n"
        "  order_source: platform\n"
        "  progress_step_percent: 10\n"
        "  progress_interval: 1\n"
        "  rate_window: 2.5\n"
        "  rate_min_span: 0.5\n"
        f"machines:\n{machines}"
    )
    return path


def cmd_topic(machine: str, command: str, line: str = "line-1") -> str:
    return f"{PREFIX}/{SITE}/sewing/{line}/{machine}/cmd/{command}"


async def send_until_answered(
    client: aiomqtt.Client,
    replies: Subscriber,
    topic: str,
    body: dict[str, Any],
    *,
    give_up_after: float = 15.0,
) -> dict[str, Any]:
    """Publish a command and resend it each second until its response arrives.

    This is what the contract tells platforms to do: the gateway answers a repeated
    command_id with its first verdict, so resending is safe.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    cid = body.get("command_id")
    while True:
        await client.publish(topic, json.dumps(body), qos=1)
        try:
            got = await replies.wait_for(
                lambda ms: any(json.loads(m.payload).get("command_id") == cid for m in ms),
                timeout=1.0,
            )
        except AssertionError:
            assert loop.time() < deadline, f"no answer to {cid} on {topic}"
            continue
        return next(
            json.loads(m.payload) for m in got if json.loads(m.payload)["command_id"] == cid
        )


async def test_platform_assigns_orders_and_sees_them_through(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ports = {"box-01": free_port(), "box-02": free_port()}
    cfg = config(tmp_path / "gw.yaml", mosquitto.port, ports)
    stations = [
        StationSpec(name, port, StationModel(SCRIPT, seed=3, name=name))
        for name, port in ports.items()
    ]
    async with (
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/+/+/+/+/cmd/+/response") as replies,
        SimulatedFloor(stations) as floor,
        gateway_process(cfg, tmp_path / "gw.log"),
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="platform-a") as platform,
    ):
        due = time.time() + 3.0 + 4.0  # the fast phase alone would make it
        first = await send_until_answered(
            platform,
            replies,
            cmd_topic("box-01", "assign-order"),
            {
                "command_id": "c-1",
                "order_id": "SO-77",
                "target": 12,
                "due": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(due)) + ".000Z",
                "customer": "acme",
            },
        )
        assert first["accepted"] is True, first
        queued = await send_until_answered(
            platform,
            replies,
            cmd_topic("box-01", "assign-order"),
            {"command_id": "c-2", "order_id": "SO-78", "target": 50},
        )
        assert queued["accepted"] is True, queued
        withdrawn = await send_until_answered(
            platform,
            replies,
            cmd_topic("box-01", "cancel-order"),
            {"command_id": "c-3", "order_id": "SO-78"},
        )
        assert withdrawn["accepted"] is True, withdrawn

        # ---- bad commands: each rejected with a reason, nothing else changes
        bad: list[tuple[str, bytes | str, str]] = [
            (cmd_topic("box-02", "assign-order"), b"{not json", "not JSON"),
            (
                cmd_topic("box-02", "assign-order"),
                json.dumps({"command_id": "b-2", "order_id": "X", "target": -5}),
                "target",
            ),
            (
                cmd_topic("box-02", "assign-order"),
                json.dumps({"command_id": "b-3", "target": 5}),
                "order_id",
            ),
            (
                cmd_topic("box-99", "assign-order"),
                json.dumps({"command_id": "b-4", "order_id": "X", "target": 5}),
                "unknown machine",
            ),
            (
                cmd_topic("box-01", "assign-order"),
                json.dumps({"command_id": "b-5", "order_id": "SO-77", "target": 5}),
                "SO-77",
            ),
            (
                cmd_topic("box-02", "assign-order"),
                b"x" * 20_000,
                "exceeds",
            ),
            (cmd_topic("box-02", "launch-rocket"), b"{}", "unknown command"),
        ]
        before = len(replies.messages)
        for topic, payload, _ in bad:
            await platform.publish(topic, payload, qos=1)
        await replies.wait_for(lambda ms: len(ms) >= before + len(bad), timeout=10)
        answers = [json.loads(m.payload) for m in replies.messages[before:]]
        for (topic, _, needle), answer in zip(bad, answers, strict=True):
            assert answer["accepted"] is False, (topic, answer)
            assert needle in answer["reason"], (needle, answer["reason"])

        # ---- the order runs: progress with an ETA, at risk when the station slows down,
        # completed at its target
        def completed(ms: list[Received]) -> bool:
            return any(
                short(e) == "order.completed" and e["data"]["order_id"] == "SO-77"
                for e in events(ms)
            )

        await sub.wait_for(completed, timeout=30)
        box = by_machine(events(sub.messages))["box-01"]
        kinds = [short(e) for e in box]
        assert kinds.count("order.started") == 1
        started = next(e["data"] for e in box if short(e) == "order.started")
        assert started["order_id"] == "SO-77" and started["source"] == "platform"
        progress = [e["data"] for e in box if short(e) == "order.progress"]
        assert any(p["eta"] for p in progress), "progress carries an ETA once a rate is known"
        assert "order.at_risk" in kinds, kinds
        risk = next(e["data"] for e in box if short(e) == "order.at_risk")
        assert risk["order_id"] == "SO-77" and risk["late_by_s"] > 0
        done = next(e["data"] for e in box if short(e) == "order.completed")
        assert done["reason"] == "target_reached"
        assert done["good"] == 12
        # SO-78 was withdrawn before it started, so no other order ran on box-01.
        assert {e["data"].get("order_id") for e in box if "order." in short(e)} == {"SO-77"}
        # The customer named in the assignment stays inside the gateway.
        assert all(b"acme" not in m.payload for m in sub.messages if "/cmd/" not in m.topic)
        # box-02 got only bad commands: no order ever started there.
        box2 = by_machine(events(sub.messages)).get("box-02", [])
        assert not [e for e in box2 if short(e) == "order.started"]
        assert floor.stations[0].model.truth  # the station really produced pieces

        assert_valid(sub.messages)


async def test_mqtt5_response_topic_and_correlation_data(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ports = {"box-01": free_port()}
    cfg = config(tmp_path / "gw.yaml", mosquitto.port, ports)
    stations = [StationSpec("box-01", ports["box-01"], StationModel([Idle(60)], name="box-01"))]
    async with (
        SimulatedFloor(stations),
        gateway_process(cfg, tmp_path / "gw.log"),
        aiomqtt.Client(
            mosquitto.host,
            mosquitto.port,
            identifier="platform-v5",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as platform,
    ):
        mine = cmd_topic("box-01", "assign-order") + "/response/platform-v5"
        await platform.subscribe(mine, qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = mine
        props.CorrelationData = b"corr-42"
        body = json.dumps({"order_id": "SO-1", "target": 3})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        answer = None
        while answer is None:
            assert loop.time() < deadline, "no answer on the MQTT 5 response topic"
            await platform.publish(
                cmd_topic("box-01", "assign-order"), body, qos=1, properties=props
            )
            try:
                async with asyncio.timeout(1.0):
                    async for message in platform.messages:
                        answer = message
                        break
            except TimeoutError:
                continue
        assert str(answer.topic) == mine
        assert answer.properties is not None
        assert answer.properties.CorrelationData == b"corr-42"
        doc = json.loads(answer.payload)  # type: ignore[arg-type]
        assert doc["accepted"] is True
        assert doc["order_id"] == "SO-1"
