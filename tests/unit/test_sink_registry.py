"""The output registry builds every destination from the plan; Accepts says what a sink takes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.config.loader import GatewayPlan, load_config
from gateway.contract.envelope import Topics
from gateway.core.model import Location, Quality, Sample
from gateway.delivery import registry
from gateway.delivery.outbox import Outbox
from gateway.delivery.sink import Accepts

MACHINES = """
machines:
  - id: sew-01
    area: sewing
    line: line-1
    profile: sewing-station
    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}
"""


def plan_for(tmp_path: Path, body: str) -> GatewayPlan:
    p = tmp_path / "gw.yaml"
    p.write_text("gateway: {id: gw-1, site: plant-1}\n" + body + MACHINES)
    return load_config(p, env={})


def wiring(tmp_path: Path, plan: GatewayPlan) -> registry.Wiring:
    outbox = Outbox(tmp_path / "outbox.db", registry.positions(plan))
    return registry.Wiring(
        plan=plan,
        outbox=outbox,
        topics=Topics(prefix="shopfloor", site="plant-1", gateway_id="gw-1"),
        started_at=time.time(),
        clock=time.time,
        secret=None,
        delayed_after=5.0,
        outbox_limit=1000,
    )


def test_accepts_names_kinds_and_event_types() -> None:
    events = Accepts(frozenset({"event"}), frozenset({"order.completed"}))
    assert events("event", "order.completed")
    assert not events("event", "order.progress")
    assert not events("state")
    assert Accepts(frozenset({"event", "state"}))("event", "anything")
    with pytest.raises(ValueError, match=r"unknown record kinds \['states'\]"):
        Accepts(frozenset({"states"}))


def test_every_destination_is_built_through_the_registry(tmp_path: Path) -> None:
    plan = plan_for(
        tmp_path,
        "destinations:\n"
        "  - {name: acme, host: 127.0.0.1, routing: {machines: ['sew-*']}, operator: pass}\n"
        "  - {name: all, host: 127.0.0.2}\n"
        "influxdb: {url: 'http://127.0.0.1:1', org: o, bucket: b, telemetry: true}\n",
    )
    assert registry.positions(plan) == ["acme", "all", "influxdb"]
    outputs = {o.name: o for o in registry.build(wiring(tmp_path, plan))}
    assert list(outputs) == ["acme", "all", "influxdb", "influxdb.telemetry"]
    acme = outputs["acme"]
    assert acme.rules.machines == ("sew-*",) and acme.operator == "pass"
    assert acme.queue is not None and acme.runner.sink.required
    assert acme.accepts("state") and acme.accepts("event", "order.started")
    history = outputs["influxdb"]
    assert history.queue is not None and not history.runner.sink.required
    assert not history.accepts("state") and not history.accepts("status")
    telemetry = outputs["influxdb.telemetry"]
    assert telemetry.queue is None and telemetry.telemetry is not None
    # The history's telemetry never carries the operator badge.
    line = telemetry.telemetry().encode(
        Location("plant-1", "sewing", "line-1", "sew-01"),
        [
            Sample("sew-01", "stitch_rate", 800.0, 1.0, Quality.GOOD),
            Sample("sew-01", "operator", "B-17", 1.0, Quality.GOOD),
        ],
        "PO-1",
    )
    assert line is not None and "stitch_rate=800.0" in line and "B-17" not in line
    for o in outputs.values():
        for release in o.release:
            release()


def test_a_plan_without_history_builds_only_mqtt(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "broker: {host: 127.0.0.1}\n")
    assert registry.positions(plan) == ["default"]
    (only,) = registry.build(wiring(tmp_path, plan))
    assert only.name == "default" and only.telemetry is None
