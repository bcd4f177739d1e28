"""Typed event payloads: the tracker's events fit them, and the contract models agree."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import pytest

from gateway.contract import models as contract
from gateway.contract.envelope import encode_event
from gateway.contract.models import EVENT_TYPES, TIMESTAMP_PATTERN
from gateway.core.events import PAYLOADS, TIME_FIELDS, EventType, OrderStarted, payload_of
from gateway.core.model import Event
from tests.unit import test_contract as scenario


@pytest.fixture(scope="module")
def recorded() -> scenario.Recorder:
    r = scenario.Recorder()
    scenario._device_orders(r)
    scenario._platform_orders(r)
    scenario._mixed_orders(r)
    return r


def test_every_tracker_event_is_its_typed_payload(recorded: scenario.Recorder) -> None:
    """data -> payload -> data gives the same dict, key order included (the wire order)."""
    seen = set()
    for ev, _ in recorded.events:
        payload = ev.payload()
        assert type(payload) is PAYLOADS[EventType(ev.type)]
        back = payload.to_data()
        assert back == ev.data and list(back) == list(ev.data), ev.type
        seen.add(ev.type)
    assert seen == set(EventType)


def test_times_are_the_declared_fields_not_key_names(recorded: scenario.Recorder) -> None:
    """Exactly the payload's time fields are RFC 3339 strings on the wire."""
    for ev, raw in recorded.events:
        data = json.loads(raw)["data"]
        for key, value in data.items():
            if key in TIME_FIELDS[ev.type] and value is not None:
                assert isinstance(value, str) and value.endswith("Z"), (ev.type, key)
            else:
                assert (
                    value is None or not isinstance(value, str) or key not in TIME_FIELDS[ev.type]
                )
    # Text is never taken for a time: an order id that looks like one stays text.
    stamp = "2026-11-22T06:19:30.000Z"
    ev = Event("m", "order.started", 1000.0, 1, {"order_id": stamp, "started_at": 1000.0})
    data = json.loads(encode_event(ev, scenario.LOC, gateway_id="g", event_id="i"))["data"]
    assert data == {"order_id": stamp, "started_at": "1970-01-01T00:16:40.000Z"}


def test_an_unknown_type_or_a_wrong_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        payload_of("order.exploded", {})
    with pytest.raises(ValueError, match="unknown event type"):
        encode_event(
            Event("m", "order.exploded", 1.0, 1, {}), scenario.LOC, gateway_id="g", event_id="i"
        )
    with pytest.raises(ValueError, match="missing"):
        OrderStarted.from_data({"order_id": "A"})


Shape = dict[str, tuple[bool, bool, bool]]


def _schema_shape(model: type[Any]) -> tuple[Shape, dict[str, set[Any]]]:
    """Per field of a contract model: (required, may be null, is a time), and value sets."""
    schema = model.model_json_schema()
    out, values = {}, {}
    for name, prop in schema["properties"].items():
        options = prop.get("anyOf", [prop])
        nullable = any(o.get("type") == "null" for o in options)
        time = any(o.get("pattern") == TIMESTAMP_PATTERN for o in options)
        out[name] = (name in schema.get("required", []), nullable, time)
        for o in options:
            if "$ref" in o:
                o = schema["$defs"][o["$ref"].rsplit("/", 1)[-1]]
            if "enum" in o or "const" in o:
                values[name] = set(o.get("enum", [o.get("const")]))
    return out, values


def _literals(tp: Any) -> set[Any]:
    if typing.get_origin(tp) is typing.Literal:
        return set(typing.get_args(tp))
    return {v for arg in typing.get_args(tp) for v in _literals(arg)}


def _payload_shape(cls: type[Any]) -> tuple[Shape, dict[str, set[Any]]]:
    """The same of a core payload class."""
    hints = typing.get_type_hints(cls)
    out, values = {}, {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING
        nullable = type(None) in typing.get_args(hints[f.name])
        out[f.name] = (required, nullable, f.name in TIME_FIELDS[cls.event_type])
        if literals := _literals(hints[f.name]):
            values[f.name] = literals
    return out, values


@pytest.mark.parametrize("event_type", list(EventType))
def test_contract_models_match_the_core_payloads(event_type: EventType) -> None:
    """One source of truth: a field added, dropped, made optional or a time in one of the two
    and not in the other fails here (the contract model also holds descriptions and bounds)."""
    assert set(EVENT_TYPES) == {t.value for t in EventType}
    model = EVENT_TYPES[event_type.value]
    fields, values = _schema_shape(model)
    core_fields, core_values = _payload_shape(PAYLOADS[event_type])
    assert fields == core_fields
    # The value sets the core declares (reasons, severities, sources) are the contract's.
    assert {k: values.get(k) for k in core_values} == core_values


def test_contract_operator_share_matches_the_core() -> None:
    from gateway.core.events import OperatorShare

    assert set(contract.OperatorShare.model_fields) == {
        f.name for f in dataclasses.fields(OperatorShare)
    }


def test_history_reads_back_only_the_declared_times() -> None:
    """An order id that looks like a time stays text in the history sink's point."""
    from gateway.delivery.influx.sink import record_point
    from gateway.delivery.records import Record

    stamp = "2026-11-22T06:19:30.000Z"
    data = {"order_id": stamp, "started_at": 1000.0}
    record = Record(
        "m", "order.started", scenario.LOC, 1, 1000.0, data, "i", "g", None, stamp, None
    )
    point = record_point(record)
    assert point.tags["order"] == stamp
    assert point.fields["started_at"] == 1000.0
    # On the wire only the declared time field becomes RFC 3339 text.
    wire = json.loads(
        encode_event(
            Event("m", "order.started", 1000.0, 1, data), scenario.LOC, gateway_id="g", event_id="i"
        )
    )
    assert wire["data"] == {"order_id": stamp, "started_at": "1970-01-01T00:16:40.000Z"}
