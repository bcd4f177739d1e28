"""Typed event payloads: the tracker's events fit them, and the contract models agree."""

from __future__ import annotations

import dataclasses
import json
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
    # A number under a key that merely looks like a time stays a number.
    ev = Event("m", "order.started", 1000.0, 1, {"order_id": "A", "looks_at": 5.0})
    assert (
        json.loads(encode_event(ev, scenario.LOC, gateway_id="g", event_id="i"))["data"]["looks_at"]
        == 5.0
    )


def test_an_unknown_type_or_a_wrong_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        payload_of("order.exploded", {})
    with pytest.raises(ValueError, match="unknown event type"):
        encode_event(
            Event("m", "order.exploded", 1.0, 1, {}), scenario.LOC, gateway_id="g", event_id="i"
        )
    with pytest.raises(ValueError, match="missing"):
        OrderStarted.from_data({"order_id": "A"})


def _schema_shape(model: type[Any]) -> dict[str, tuple[bool, bool, bool]]:
    """Per field of a contract model: (required, may be null, is a time)."""
    schema = model.model_json_schema()
    out = {}
    for name, prop in schema["properties"].items():
        options = prop.get("anyOf", [prop])
        nullable = any(o.get("type") == "null" for o in options)
        time = any(o.get("pattern") == TIMESTAMP_PATTERN for o in options)
        out[name] = (name in schema.get("required", []), nullable, time)
    return out


def _payload_shape(cls: type[Any]) -> dict[str, tuple[bool, bool, bool]]:
    """The same of a core payload class."""
    out = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING
        nullable = "None" in str(f.type)
        out[f.name] = (required, nullable, f.name in TIME_FIELDS[cls.event_type])
    return out


@pytest.mark.parametrize("event_type", list(EventType))
def test_contract_models_match_the_core_payloads(event_type: EventType) -> None:
    """One source of truth: a field added, dropped, made optional or a time in one of the two
    and not in the other fails here (the contract model also holds descriptions and bounds)."""
    assert set(EVENT_TYPES) == {t.value for t in EventType}
    model = EVENT_TYPES[event_type.value]
    assert _schema_shape(model) == _payload_shape(PAYLOADS[event_type])


def test_contract_operator_share_matches_the_core() -> None:
    from gateway.core.events import OperatorShare

    assert set(contract.OperatorShare.model_fields) == {
        f.name for f in dataclasses.fields(OperatorShare)
    }


def test_history_reads_back_only_the_declared_times() -> None:
    """An order id that looks like a time stays text in the history sink's point."""
    from gateway.delivery.influx.sink import envelope_point

    stamp = "2026-11-22T06:19:30.000Z"
    ev = Event("m", "order.started", 1000.0, 1, {"order_id": stamp, "started_at": 1000.0})
    point = envelope_point(encode_event(ev, scenario.LOC, gateway_id="g", event_id="i"))
    assert point is not None
    assert point.tags["order"] == stamp
    assert point.fields["started_at"] == 1000.0
