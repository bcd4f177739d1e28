"""Who worked on an order, end to end: three brokers, three operator policies.

A sewing station with a badge reader sews two orders. The factory's own MES (``pass``)
needs pieces per operator for piece-rate pay; a payroll analytics service
(``pseudonymise``) gets a pseudonym that is the same for the same worker, and nobody without
the site secret can reverse it; the customer's order platform (``drop``, the default) must
learn nothing about who sewed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.contract_check import assert_valid
from tests.gatewayproc import events, gateway_process, short
from tests.held import HeldStation, state_read

PREFIX = "attr"
SITE = "plant-1"
BADGE = "B-4711"
SITE_SECRET = "site-secret-for-tests"


def completed(ms: list[Received]) -> list[dict[str, Any]]:
    return [e["data"] for e in events(ms) if short(e) == "order.completed"]


def order_views(ms: list[Received]) -> list[dict[str, Any]]:
    out = []
    for m in ms:
        if m.topic.endswith("/state") and m.payload:
            order = json.loads(m.payload).get("order")
            if order:
                out.append(order)
    return out


async def test_the_operator_policy_decides_who_sees_who_worked(tmp_path: Path) -> None:
    brokers = {name: MosquittoBroker(tmp_path / name) for name in ("mes", "pay", "portal")}
    policies = {"mes": "pass", "pay": "pseudonymise", "portal": "drop"}
    port = free_port()
    script = [
        # Held (below) until the gateway process has read the idle station.
        Idle(0.5),
        RunOrder("PO-1", target=6, piece_seconds=0.15, scrap_every=3),
        Idle(0.5),
        RunOrder("PO-2", target=4, piece_seconds=0.1),
        Idle(60),
    ]
    destinations = [
        {"name": n, "host": b.host, "port": b.port, "operator": policies[n]}
        for n, b in brokers.items()
    ]
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-attr, site: {SITE}, topic_prefix: {PREFIX}}}",
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                f"redaction: {{secret: {SITE_SECRET}}}",
                "destinations:",
                *(f"  - {json.dumps(d)}" for d in destinations),
                "machines:",
                "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
                " poll_interval: 0.1,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}",
            ]
        )
        + "\n"
    )
    for b in brokers.values():
        b.start()
    try:
        station = HeldStation(script, name="sew-01", operator=BADGE)
        async with (
            Subscriber(brokers["mes"].host, brokers["mes"].port, f"{PREFIX}/#") as mes,
            Subscriber(brokers["pay"].host, brokers["pay"].port, f"{PREFIX}/#") as pay,
            Subscriber(brokers["portal"].host, brokers["portal"].port, f"{PREFIX}/#") as portal,
            SimulatedFloor([StationSpec("sew-01", port, station)]),
            gateway_process(cfg, tmp_path / "gw.log"),
        ):
            await mes.wait_for(state_read("sew-01"), timeout=30)
            station.release()
            for sub in (mes, pay, portal):
                await sub.wait_for(lambda ms: len(completed(ms)) >= 2, timeout=30)
            seen = {"mes": list(mes.messages), "pay": list(pay.messages)}
            seen["portal"] = list(portal.messages)
    finally:
        for b in brokers.values():
            b.stop()

    for ms in seen.values():
        assert_valid(ms)
    pseudonym = (
        "op-" + hmac.new(SITE_SECRET.encode(), BADGE.encode(), hashlib.sha256).hexdigest()[:16]
    )
    for name, who in (("mes", BADGE), ("pay", pseudonym)):
        done = completed(seen[name])
        assert [d["order_id"] for d in done] == ["PO-1", "PO-2"]
        for d in done:
            (share,) = d["operators"]
            # One worker sewed everything: every piece, and time only while the order ran.
            assert share["operator"] == who
            assert (share["good"], share["scrap"]) == (d["good"], d["scrap"])
            assert 0 <= share["seconds"] <= d["duration_s"], done
        assert sum(d["operators"][0]["seconds"] for d in done) > 0, done
        assert done[0]["scrap"] >= 1
        progress = [e["data"] for e in events(seen[name]) if short(e) == "order.progress"]
        assert progress and all(p["operators"][0]["operator"] == who for p in progress)
        views = order_views(seen[name])
        assert views and all(v["operators"][0]["operator"] == who for v in views)
    # The MES never sees a pseudonym, the analytics never the badge.
    assert pseudonym.encode() not in b"".join(m.payload for m in seen["mes"])
    assert BADGE.encode() not in b"".join(m.payload for m in seen["pay"])
    # The order platform gets the same orders and counts, and nothing about who worked.
    done = completed(seen["portal"])
    assert [(d["order_id"], d["good"]) for d in done] == [
        (d["order_id"], d["good"]) for d in completed(seen["mes"])
    ]
    for m in seen["portal"]:
        assert b"operator" not in m.payload and BADGE.encode() not in m.payload, m.topic
        assert pseudonym.encode() not in m.payload, m.topic


async def test_attribution_survives_a_gateway_restart_without_the_downtime(
    tmp_path: Path,
) -> None:
    broker = MosquittoBroker(tmp_path / "mes")
    port = free_port()
    script = [Idle(4.0), RunOrder("PO-9", target=30, piece_seconds=0.2), Idle(60)]
    cfg = tmp_path / "gw.yaml"
    destination = {"name": "mes", "host": broker.host, "port": broker.port, "operator": "pass"}
    cfg.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-attr, site: {SITE}, topic_prefix: {PREFIX}}}",
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                "destinations:",
                f"  - {json.dumps(destination)}",
                "machines:",
                "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
                " poll_interval: 0.1,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}",
            ]
        )
        + "\n"
    )
    down = 1.5
    broker.start()
    try:
        station = StationModel(script, name="sew-01", operator=BADGE)
        async with (
            Subscriber(broker.host, broker.port, f"{PREFIX}/+/+/+/+/event/#") as mes,
            SimulatedFloor([StationSpec("sew-01", port, station)]),
        ):

            def progressed(ms: list[Received]) -> bool:
                return any(
                    short(e) == "order.progress" and e["data"]["good"] >= 5 for e in events(ms)
                )

            async with gateway_process(cfg, tmp_path / "gw1.log"):
                await mes.wait_for(progressed, timeout=30)
            # gateway_process kills the gateway without a goodbye; the station sews on
            # while it is down (the outage is part of the scenario, not a wait).
            await asyncio.sleep(down)
            async with gateway_process(cfg, tmp_path / "gw2.log"):
                await mes.wait_for(lambda ms: bool(completed(ms)), timeout=30)
            seen = list(mes.messages)
    finally:
        broker.stop()

    assert_valid(seen)
    (done,) = completed(seen)
    (share,) = done["operators"]
    # Every piece of the order, those sewn while the gateway was down included ...
    assert (share["operator"], share["good"]) == (BADGE, done["good"])
    assert done["good"] >= 30
    # ... but not the time the gateway could not see the machine.
    assert share["seconds"] <= done["duration_s"] - down, done
