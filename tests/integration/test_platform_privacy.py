"""Two platforms on two brokers: each assigns its own orders and sees only its own.

A small factory sews for two platforms. Each platform's broker is a destination with a
customer filter; orders come from the platforms' commands on their own brokers. Neither
platform may see, cancel or even learn of the other's orders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import events, gateway_process, short
from tests.integration.test_commands import send_until_answered

PREFIX = "priv"
SITE = "plant-1"
CMD = f"{PREFIX}/{SITE}/sewing/line-1/box-01/cmd"


def destination(name: str, broker: MosquittoBroker, customer: str) -> dict[str, Any]:
    return {
        "name": name,
        "host": broker.host,
        "port": broker.port,
        "routing": {"customers": [customer]},
    }


async def test_each_platform_sees_and_controls_only_its_own_orders(tmp_path: Path) -> None:
    acme = MosquittoBroker(tmp_path / "acme")
    zeta = MosquittoBroker(tmp_path / "zeta")
    port = free_port()
    # The counter box counts pieces; the platforms say which order they belong to.
    script = [Idle(2.0), RunOrder("dev", target=10_000, piece_seconds=0.1), Idle(60)]
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-priv, site: {SITE}, topic_prefix: {PREFIX}}}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "tracker: {order_source: platform, progress_step_percent: 20}",
                "destinations:",
                f"  - {json.dumps(destination('acme', acme, 'acme'))}",
                f"  - {json.dumps(destination('zeta', zeta, 'zeta'))}",
                "machines:",
                "  - {id: box-01, area: sewing, line: line-1, profile: sewing-station,"
                " poll_interval: 0.1,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}},"
                # A bare counter box: no order id, no target, no state register.
                " signals: {order_id: null, target_count: null, state: null}}",
            ]
        )
        + "\n"
    )
    acme.start()
    zeta.start()
    try:
        async with (
            Subscriber(acme.host, acme.port, f"{PREFIX}/#") as sub_a,
            Subscriber(zeta.host, zeta.port, f"{PREFIX}/#") as sub_z,
            Subscriber(acme.host, acme.port, f"{PREFIX}/+/+/+/+/cmd/+/response") as replies_a,
            Subscriber(zeta.host, zeta.port, f"{PREFIX}/+/+/+/+/cmd/+/response") as replies_z,
            SimulatedFloor([StationSpec("box-01", port, StationModel(script, name="box-01"))]),
            gateway_process(cfg, tmp_path / "gw.log"),
            aiomqtt.Client(acme.host, acme.port, identifier="platform-acme") as platform_a,
            aiomqtt.Client(zeta.host, zeta.port, identifier="platform-zeta") as platform_z,
        ):
            answer = await send_until_answered(
                platform_a,
                replies_a,
                f"{CMD}/assign-order",
                {"command_id": "a-1", "order_id": "ACME-1", "target": 8},
            )
            assert answer["accepted"] is True, answer
            queued = await send_until_answered(
                platform_z,
                replies_z,
                f"{CMD}/assign-order",
                {"command_id": "z-1", "order_id": "ZETA-1", "target": 5},
            )
            assert queued["accepted"] is True, queued
            # zeta tries to cancel acme's order: refused as if it did not exist.
            refused = await send_until_answered(
                platform_z,
                replies_z,
                f"{CMD}/cancel-order",
                {"command_id": "z-2", "order_id": "ACME-1"},
            )
            assert refused["accepted"] is False
            assert refused["reason"] == "unknown order 'ACME-1'"
            # zeta may not assign in acme's name either.
            foreign = await send_until_answered(
                platform_z,
                replies_z,
                f"{CMD}/assign-order",
                {"command_id": "z-3", "order_id": "X-1", "target": 5, "customer": "acme"},
            )
            assert foreign["accepted"] is False

            def completed(order: str) -> Any:
                def check(ms: list[Received]) -> bool:
                    return any(
                        short(e) == "order.completed" and e["data"]["order_id"] == order
                        for e in events(ms)
                    )

                return check

            await sub_a.wait_for(completed("ACME-1"), timeout=30)
            await sub_z.wait_for(completed("ZETA-1"), timeout=30)
            seen_a = list(sub_a.messages)
            seen_z = list(sub_z.messages)
    finally:
        acme.stop()
        zeta.stop()

    def order_ids(ms: list[Received]) -> set[str]:
        out = set()
        for e in events(ms):
            if "order_id" in e["data"] and e["data"]["order_id"]:
                out.add(e["data"]["order_id"])
        for m in ms:
            if m.topic.endswith("/state") and m.payload:
                order = json.loads(m.payload).get("order")
                if order:
                    out.add(order["order_id"])
        return out

    # No state register: the gateway derives one from the counter instead of "offline".
    states = [json.loads(m.payload)["state"] for m in seen_a if m.topic.endswith("/state")]
    assert states[-1] == "running", states[-5:]
    assert order_ids(seen_a) == {"ACME-1"}
    assert order_ids(seen_z) == {"ZETA-1"}
    # Nothing zeta's broker carried from the gateway names acme's order, not even the
    # refusal of zeta's own attempt to cancel it beyond echoing what zeta sent.
    for m in seen_z:
        if "/cmd/" not in m.topic:
            assert b"ACME" not in m.payload, m.topic
