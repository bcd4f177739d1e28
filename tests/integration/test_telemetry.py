"""Tag telemetry end to end: a sewing station, a gateway process, three real brokers.

The plant's MES (``pass``) shows who sews at which station on its dashboard; a payroll
analytics service (``pseudonymise``) correlates output per worker without knowing names; a
customer's portal (``drop``) gets the machine values and never anything about a person.
Each admits telemetry (``event_types: [..., telemetry]``); the portal takes order events
only. The values go out on change, QoS 1 and retained, so a late subscriber gets the last.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.contract_check import assert_valid
from tests.gatewayproc import events, gateway_process, short
from tests.integration.test_delivery import (
    SCRIPTS,
    check_stream,
    completed,
    progress_seen,
    stations,
    unique,
)

PREFIX = "tele"
SITE = "plant-1"
BADGE = "B-4711"
SITE_SECRET = "site-secret-for-tests"
TOPIC = f"{PREFIX}/{SITE}/sewing/line-1/sew-01/telemetry"


def telemetry(ms: list[Received]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in ms if m.topic == TOPIC and m.payload]


def counted(n: int) -> Any:
    """Predicate: telemetry showed good_count >= n."""

    def check(ms: list[Received]) -> bool:
        return any(d["values"].get("good_count", {}).get("value", 0) >= n for d in telemetry(ms))

    return check


async def test_telemetry_reaches_each_destination_under_its_operator_policy(
    tmp_path: Path,
) -> None:
    brokers = {name: MosquittoBroker(tmp_path / name) for name in ("mes", "pay", "portal")}
    policies = {"mes": "pass", "pay": "pseudonymise", "portal": "drop"}
    types = {"mes": ["*", "telemetry"], "pay": ["telemetry"], "portal": ["order.*", "telemetry"]}
    port = free_port()
    script = [Idle(3.0), RunOrder("PO-1", target=20, piece_seconds=0.1), Idle(60)]
    destinations = [
        {
            "name": n,
            "host": b.host,
            "port": b.port,
            "operator": policies[n],
            "routing": {"event_types": types[n]},
        }
        for n, b in brokers.items()
    ]
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "\n".join(
            [
                f"gateway: {{id: gw-tele, site: {SITE}, topic_prefix: {PREFIX}}}",
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "health: {listen: null}",  # 9108 may be taken: run would refuse
                f"redaction: {{secret: {SITE_SECRET}}}",
                "telemetry: {qos: 1, retain: true, publish: on_change}",
                "destinations:",
                *(f"  - {json.dumps(d)}" for d in destinations),
                "machines:",
                "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
                " poll_interval: 0.1,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}},"
                # The stitch rate wanders every poll: only 5 % moves are news.
                " signals: {stitch_rate: {address: 8, type: float32,"
                " telemetry: {publish: deadband, deadband_percent: 5}}}}",
            ]
        )
        + "\n"
    )
    for b in brokers.values():
        b.start()
    try:
        station = StationModel(script, name="sew-01", operator=BADGE)
        async with (
            Subscriber(brokers["mes"].host, brokers["mes"].port, f"{PREFIX}/#") as mes,
            Subscriber(brokers["pay"].host, brokers["pay"].port, f"{PREFIX}/#") as pay,
            Subscriber(brokers["portal"].host, brokers["portal"].port, f"{PREFIX}/#") as portal,
            SimulatedFloor([StationSpec("sew-01", port, station)]),
            gateway_process(cfg, tmp_path / "gw.log"),
        ):
            for sub in (mes, pay, portal):
                await sub.wait_for(counted(20), timeout=30)
            seen = {"mes": list(mes.messages), "pay": list(pay.messages)}
            seen["portal"] = list(portal.messages)
        # A platform that subscribes late gets the machine's last telemetry, retained.
        async with Subscriber(brokers["mes"].host, brokers["mes"].port, TOPIC) as late:
            (last,) = await late.wait_for(lambda ms: bool(ms), timeout=5)
    finally:
        for b in brokers.values():
            b.stop()

    assert last.retain and json.loads(last.payload)["schema"].endswith(":telemetry")
    for ms in seen.values():
        assert_valid(ms)
    pseudonym = (
        "op-" + hmac.new(SITE_SECRET.encode(), BADGE.encode(), hashlib.sha256).hexdigest()[:16]
    )
    for name, who in (("mes", BADGE), ("pay", pseudonym)):
        badges = [
            d["values"]["operator"]["value"]
            for d in telemetry(seen[name])
            if "operator" in d["values"]
        ]
        # On change: the badge went out once (it never changed), as the policy shows it.
        assert badges == [who], name
    assert pseudonym.encode() not in b"".join(m.payload for m in seen["mes"])
    assert BADGE.encode() not in b"".join(m.payload for m in seen["pay"])
    assert telemetry(seen["portal"])
    for m in seen["portal"]:
        assert b"operator" not in m.payload and BADGE.encode() not in m.payload, m.topic
        assert pseudonym.encode() not in m.payload, m.topic

    for name, ms in seen.items():
        docs = telemetry(ms)
        for d in docs:
            for v in d["values"].values():
                assert v["quality"] in ("good", "uncertain", "bad") and v["source_time"]
        # On change: each published good_count differs from the one before it.
        goods = [d["values"]["good_count"]["value"] for d in docs if "good_count" in d["values"]]
        assert goods == sorted(set(goods)) and goods[-1] >= 20, (name, goods)
        # Deadband: each published stitch rate is at least 5 % away from the last one.
        rates = [d["values"]["stitch_rate"]["value"] for d in docs if "stitch_rate" in d["values"]]
        assert len(rates) >= 2, (name, rates)  # idle (0) and sewing at least
        for before, after in itertools.pairwise(rates):
            assert abs(after - before) >= abs(before) * 0.05 - 1e-9, (name, rates)
    # Order events are unaffected: the MES and the portal get them, payroll only values.
    assert any(short(e) == "order.started" for e in events(seen["mes"]))
    assert any(short(e) == "order.started" for e in events(seen["portal"]))
    assert not events(seen["pay"])
    assert not [m for m in seen["portal"] if "/event/machine." in m.topic]


async def test_an_outage_drops_oldest_telemetry_and_no_event(tmp_path: Path) -> None:
    """Three stations publish every value every 50 ms to a broker that goes away for 4 s:
    more telemetry than ``max_queue`` holds piles up. The oldest telemetry is dropped and
    counted; every event arrives, in order, once the broker is back."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    ports = {name: free_port() for name in SCRIPTS}
    health = free_port()
    destination = {
        "name": "plant",
        "host": broker.host,
        "port": broker.port,
        "keepalive": 5,
        "max_queue": 100,
        "routing": {"event_types": ["*", "telemetry"]},
    }
    lines = [
        f"gateway: {{id: gw-tele, site: {SITE}, topic_prefix: {PREFIX}}}",
        f"health: {{listen: '127.0.0.1:{health}', console: false}}",
        f"state_dir: {tmp_path / 'state'}",
        "logging: {level: info, format: json}",
        "tracker: {progress_step_percent: 10, progress_interval: 5}",
        "telemetry: {publish: every_poll}",
        "destinations:",
        f"  - {json.dumps(destination)}",
        "machines:",
    ]
    for i, (name, port) in enumerate(ports.items()):
        lines.append(
            f"  - {{id: {name}, area: sewing, line: line-{1 + i % 2}, profile: sewing-station,"
            f" poll_interval: 0.05,"
            f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}, timeout: 0.5}}}}"
        )
    config = tmp_path / "gw.yaml"
    config.write_text("\n".join(lines) + "\n")
    broker.start()
    try:
        async with (
            Subscriber(broker.host, broker.port, f"{PREFIX}/#", session="platform") as sub,
            SimulatedFloor(stations(ports)) as floor,
            gateway_process(config, tmp_path / "gw.log"),
        ):
            await sub.wait_for(progress_seen, timeout=20)
            before = len([m for m in sub.messages if m.topic.endswith("/telemetry")])
            assert before > 0
            broker.stop()
            # The outage itself: 3 stations x 20 polls a second for 4 s is 240 messages.
            await asyncio.sleep(4.0)
            broker.start()
            await floor.wait_finished(timeout=40)
            truth = {s.name: dict(s.model.truth) for s in floor.stations}
            await sub.wait_for(completed(truth), timeout=30)
            evs, _ = unique(events(sub.messages))
            check_stream(evs, truth)
            metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{health}/metrics")
    finally:
        broker.stop()
    dropped = _metric(metrics, "shopfloor_destination_telemetry_dropped_total")
    queued = _metric(metrics, "shopfloor_destination_telemetry_total")
    assert dropped >= 100, metrics
    assert queued > dropped
    log = (tmp_path / "gw.log").read_text()
    assert '"telemetry.dropping"' in log and '"telemetry.dropping_ended"' in log
    assert "Traceback" not in log


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def _metric(text: str, name: str) -> float:
    m = re.search(rf'^{name}\{{destination="plant"\}} (\S+)$', text, re.M)
    assert m, name
    return float(m.group(1))
