"""MQTT telemetry: payload, destinations, personal data, and the bounded memory queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.config.loader import BrokerPlan, DestinationPlan, MachinePlan
from gateway.config.protocols import installed
from gateway.config.telemetry import TelemetryPlan
from gateway.contract.envelope import Topics
from gateway.contract.telemetry import TelemetryMessage, encode_telemetry
from gateway.core.model import Location, Quality, Sample
from gateway.core.routing import Route, RouteRules, pseudonym
from gateway.core.telemetry import PublishRule
from gateway.core.tracker import TrackerSettings
from gateway.delivery.mqtt.output import TelemetryObserver
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.mqtt.telemetry import TelemetryOutput
from gateway.delivery.outbox import OutboxQueue
from tests.unit import test_outbox
from tests.unit.test_outbox_coalesce import entry, take_all

LOC = Location("plant-1", "sewing", "line-1", "sew-01")
T = 1_800_000_000.25
SECRET = b"site-secret"


def _s(signal: str, value: Any, quality: Quality = Quality.GOOD) -> Sample:
    return Sample("sew-01", signal, value, T, quality)


def test_encoded_payload_is_a_valid_telemetry_message() -> None:
    samples = [
        _s("good_count", 12),
        _s("stitch_rate", 2875.5),
        _s("program", 'P"7\u00e9'),
        _s("running", True),
        _s("cycle_time", None, Quality.BAD),
        _s("spindle", float("inf"), Quality.UNCERTAIN),
    ]
    payload = encode_telemetry(LOC, samples, gateway_id="gw-1", now=T + 0.01)
    assert payload is not None
    doc = json.loads(payload)
    TelemetryMessage.model_validate(doc)
    values = doc["values"]
    assert values["good_count"] == {
        "value": 12,
        "quality": "good",
        "source_time": "2027-01-15T08:00:00.250Z",
    }
    assert values["program"]["value"] == 'P"7\u00e9'
    assert values["running"]["value"] is True
    assert values["cycle_time"] == {**values["good_count"], "value": None, "quality": "bad"}
    # JSON cannot carry infinity: null, and the value is not to be trusted.
    assert (values["spindle"]["value"], values["spindle"]["quality"]) == (None, "bad")
    assert doc["time"] == "2027-01-15T08:00:00.260Z" and doc["machine"] == "sew-01"
    assert encode_telemetry(LOC, [], gateway_id="gw-1", now=T) is None


class _Queue:
    """Stands in for a destination's OutboxQueue: records what it is given."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.dropped_telemetry = 0
        self.max_telemetry_bytes: int | None = None

    def push_telemetry(self, msg: Message) -> int:
        self.got.append(msg)
        return 0

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.got]


def _dest(name: str, event_types: tuple[str, ...], operator: str = "drop") -> DestinationPlan:
    broker = BrokerPlan("127.0.0.1", 1883, name, max_queue=1000)
    return DestinationPlan(name, broker, Route(name, RouteRules(event_types=event_types), operator))  # type: ignore[arg-type]


def _machine(rules: dict[str, PublishRule] | None = None) -> MachinePlan:
    return MachinePlan(
        id="sew-01",
        location=LOC,
        protocol=installed()["modbus"],
        profile=None,
        connection=None,  # type: ignore[arg-type]
        signals={},
        poll_interval=1.0,
        tracker=TrackerSettings(),
        telemetry=rules or {},
    )


def _output(
    *dests: DestinationPlan, settings: TelemetryPlan | None = None
) -> tuple[TelemetryOutput, dict[str, _Queue]]:
    queues = {d.name: _Queue() for d in dests}
    out = TelemetryOutput(
        dests,
        queues,  # type: ignore[arg-type]
        Topics("sf", "plant-1", "gw-1"),
        settings or TelemetryPlan(),
        gateway_id="gw-1",
        secret=SECRET,
    )
    return out, queues


def test_only_destinations_that_admit_telemetry_get_it_with_due_values_only() -> None:
    out, queues = _output(
        _dest("all", ()), _dest("orders", ("order.*", "*")), _dest("plant", ("telemetry",))
    )
    plan = _machine({"stitch_rate": PublishRule("every_poll")})
    out.configure([plan])
    assert out.active
    out.observe(plan, [_s("good_count", 1), _s("stitch_rate", 10.0)], T)
    out.observe(plan, [_s("good_count", 1), _s("stitch_rate", 10.0)], T + 1)
    out.observe(plan, [_s("good_count", 1), _s("stitch_rate", 10.0)], T + 2)
    assert not queues["all"].got and not queues["orders"].got
    docs = queues["plant"].docs()
    assert [sorted(d["values"]) for d in docs] == [
        ["good_count", "stitch_rate"],
        ["stitch_rate"],
        ["stitch_rate"],
    ]
    msg = queues["plant"].got[0]
    assert (msg.topic, msg.qos, msg.retain) == (
        "sf/plant-1/sewing/line-1/sew-01/telemetry",
        0,
        False,
    )
    assert out.submitted == {"plant": 3}


def test_qos_and_retain_are_configurable() -> None:
    out, queues = _output(_dest("plant", ("telemetry",)), settings=TelemetryPlan(1, True))
    plan = _machine()
    out.configure([plan])
    out.observe(plan, [_s("good_count", 1)], T)
    (msg,) = queues["plant"].got
    assert (msg.qos, msg.retain) == (1, True)


def test_nothing_is_done_without_a_telemetry_destination() -> None:
    out, _ = _output(_dest("all", ()))
    out.configure([_machine()])
    assert not out.active


def test_the_operator_policy_applies_to_the_badge() -> None:
    out, queues = _output(
        _dest("mes", ("telemetry",), "pass"),
        _dest("pay", ("telemetry",), "pseudonymise"),
        _dest("portal", ("telemetry",), "drop"),
    )
    plan = _machine()
    out.configure([plan])
    out.observe(plan, [_s("operator", "B-4711"), _s("good_count", 3)], T)
    # Without the badge among the due values, all three get the same bytes.
    out.observe(plan, [_s("operator", "B-4711"), _s("good_count", 4)], T + 1)
    mes, pay, portal = (queues[n].docs() for n in ("mes", "pay", "portal"))
    assert mes[0]["values"]["operator"]["value"] == "B-4711"
    assert pay[0]["values"]["operator"]["value"] == pseudonym(SECRET, "B-4711")
    assert "operator" not in portal[0]["values"]
    assert b"operator" not in queues["portal"].got[0].payload
    assert mes[1] == pay[1] == portal[1]
    assert queues["mes"].got[1].payload is queues["portal"].got[1].payload


def test_pseudonymise_without_a_secret_drops_the_badge() -> None:
    queues = {"pay": _Queue()}
    out = TelemetryOutput(
        [_dest("pay", ("telemetry",), "pseudonymise")],
        queues,  # type: ignore[arg-type]
        Topics("sf", "plant-1", "gw-1"),
        TelemetryPlan(),
        gateway_id="gw-1",
        secret=None,
    )
    plan = _machine()
    out.configure([plan])
    out.observe(plan, [_s("operator", "B-4711"), _s("good_count", 3)], T)
    (doc,) = queues["pay"].docs()
    assert list(doc["values"]) == ["good_count"]


def test_reload_keeps_unchanged_filters_and_rebuilds_changed_ones() -> None:
    out, queues = _output(_dest("plant", ("telemetry",)))
    plan = _machine()
    out.configure([plan])
    out.observe(plan, [_s("x", 1)], T)
    out.configure([plan])
    out.observe(plan, [_s("x", 1)], T + 1)  # unchanged rules: not due again
    assert len(queues["plant"].got) == 1
    changed = _machine({"x": PublishRule("every_poll")})
    out.configure([changed])
    out.observe(changed, [_s("x", 1)], T + 2)
    assert len(queues["plant"].got) == 2
    out.configure([changed], TelemetryPlan(qos=1, retain=True, max_queue_mib=2))
    assert queues["plant"].max_telemetry_bytes == 2 * 1024 * 1024
    out.observe(changed, [_s("x", 1)], T + 3)
    assert (queues["plant"].got[-1].qos, queues["plant"].got[-1].retain) == (1, True)
    out.configure([])
    out.observe(changed, [_s("x", 1)], T + 4)
    assert len(queues["plant"].got) == 3


def _tele(n: int) -> Message:
    return Message("t/m1/telemetry", json.dumps({"n": n}).encode(), 0, False)


async def test_full_memory_drops_oldest_telemetry_first_never_events(tmp_path: Path) -> None:
    async with test_outbox.running(tmp_path / "ob.db", ["a"]) as ob:
        q = OutboxQueue(ob, Route("a"), max_memory=3)
        ob._queues.append(q)  # as Outbox.queue() does
        q.start()
        status = Message("t/status", json.dumps({"n": -1}).encode(), 1, True)
        q.push(status)
        for n in range(5):
            ob.append([entry(100 + n)])  # events: rows, never counted against memory
            q.push_telemetry(_tele(n))
        await ob.flush()
        # Memory holds 3: the status and the two newest telemetry; 3 telemetry dropped.
        assert q.dropped_telemetry == 3
        got = await take_all(q, 8)
        assert [n for _, n in got] == [-1, 100, 101, 102, 103, 3, 104, 4]
        # With no telemetry left to drop, the oldest other message goes (as before).
        for n in range(4):
            q.push(Message(f"t/s{n}", json.dumps({"n": n}).encode(), 1, True))
        assert q.dropped_telemetry == 3


async def test_telemetry_in_flight_returns_after_a_lost_link(tmp_path: Path) -> None:
    async with test_outbox.running(tmp_path / "ob.db", ["a"]) as ob:
        q = OutboxQueue(ob, Route("a"), max_memory=2)
        ob._queues.append(q)
        q.start()
        q.push_telemetry(_tele(1))
        item = q.take()
        assert item is not None
        q.requeue()
        # Back in line as telemetry: it is the first to go when memory fills.
        q.push_telemetry(_tele(2))
        q.push_telemetry(_tele(3))
        assert q.dropped_telemetry == 1
        assert [n for _, n in await take_all(q, 2)] == [2, 3]


def test_broker_max_queue_bounds_each_destinations_memory(tmp_path: Path) -> None:
    """``max_queue`` is documented as the memory bound: a gateway built with it uses it."""
    from gateway.config.loader import load_config
    from gateway.runtime.gateway import Gateway

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        f"state_dir: {tmp_path}\n"
        "health: {listen: null}\n"
        "destinations:\n"
        "  - {name: a, host: 127.0.0.1, port: 1883, max_queue: 250}\n"
        "  - {name: b, host: 127.0.0.1, port: 1884, routing: {event_types: [telemetry]}}\n"
        "machines:\n"
        "  - {id: m1, area: a, line: l, profile: sewing-station,"
        " connection: {protocol: modbus, host: 127.0.0.1, port: 5020}}\n"
    )
    gw = Gateway(load_config(cfg, env={}))
    assert gw.queues["a"]._max_memory == 250
    assert gw.queues["b"]._max_memory == 100_000
    assert gw.queues["b"].max_telemetry_bytes == 16 * 1024 * 1024
    # One telemetry output for the admitting destinations, the observer of the first.
    (observer,) = [o.observer for o in gw.outputs.values() if o.observer is not None]
    assert isinstance(observer, TelemetryObserver)
    assert [t.name for t in observer.telemetry._targets["m1"]] == ["b"]


async def test_telemetry_bytes_are_bounded_too(tmp_path: Path) -> None:
    """Big telemetry messages hit the byte bound long before the count bound."""
    async with test_outbox.running(tmp_path / "ob.db", ["a"]) as ob:
        q = OutboxQueue(ob, Route("a"), max_memory=1000, max_telemetry_bytes=2500)
        ob._queues.append(q)
        q.start()
        big = b"x" * 1000
        for n in range(5):
            q.push_telemetry(Message("t/m1/telemetry", big + str(n).encode(), 0, False))
        # 2 of 1,001 bytes fit in 2,500: the three oldest are gone.
        assert q.dropped_telemetry == 3
        got = [q.take(), q.take(), q.take()]
        assert [m[1].payload[-1:] for m in got if m is not None] == [b"3", b"4"]
        # Taken messages no longer count: two more fit again.
        for n in range(5, 7):
            q.push_telemetry(Message("t/m1/telemetry", big + str(n).encode(), 0, False))
        assert q.dropped_telemetry == 3
