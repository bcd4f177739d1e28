"""Unit tests of the MQTT contract v1: topics, event ids and payload encoding."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.contract.envelope import (
    ParsedTopic,
    Topics,
    convert_times,
    decode_event,
    encode_event,
    encode_state,
    encode_status,
    format_time,
    new_event_id,
    parse_machine_topic,
)
from gateway.core.model import Event, Location
from gateway.core.vocabulary import MachineState

LOC = Location(site="plant1", area="sewing", line="l2", machine="sew-07")
TOPICS = Topics(prefix="shopfloor/v1", site="plant1", gateway_id="gw-a")
T0 = datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC).timestamp()


# --- topics ----------------------------------------------------------------------------


def test_machine_topics_follow_the_location_path() -> None:
    root = "shopfloor/v1/plant1/sewing/l2/sew-07"
    assert TOPICS.machine_root(LOC) == root
    assert TOPICS.event(LOC, "order.started") == f"{root}/event/order.started"
    assert TOPICS.state(LOC) == f"{root}/state"
    assert TOPICS.telemetry(LOC) == f"{root}/telemetry"
    assert TOPICS.command(LOC, "assign-order") == f"{root}/cmd/assign-order"


def test_gateway_status_topic() -> None:
    assert TOPICS.status() == "shopfloor/v1/plant1/gateway/gw-a/status"


def test_filters() -> None:
    assert TOPICS.all_events_filter() == "shopfloor/v1/plant1/+/+/+/event/+"
    assert TOPICS.all_states_filter() == "shopfloor/v1/plant1/+/+/+/state"
    assert TOPICS.all_commands_filter() == "shopfloor/v1/plant1/+/+/+/cmd/+"
    assert TOPICS.all_status_filter() == "shopfloor/v1/plant1/gateway/+/status"
    assert TOPICS.site_filter() == "shopfloor/v1/plant1/#"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (TOPICS.state(LOC), ParsedTopic(LOC, "state")),
        (TOPICS.telemetry(LOC), ParsedTopic(LOC, "telemetry")),
        (TOPICS.event(LOC, "order.started"), ParsedTopic(LOC, "event", "order.started")),
        (TOPICS.command(LOC, "cancel-order"), ParsedTopic(LOC, "cmd", "cancel-order")),
        (TOPICS.status(), None),
        ("other/plant1/sewing/l2/sew-07/state", None),
        ("shopfloor/v1/plant1/sewing/l2/sew-07/event", None),
        ("shopfloor/v1/plant1/sewing//sew-07/state", None),
        ("shopfloor/v1/plant1/sewing/l2/sew-07/state/extra", None),
    ],
)
def test_parse_machine_topic(topic: str, expected: ParsedTopic | None) -> None:
    assert parse_machine_topic("shopfloor/v1", topic) == expected


# --- event ids -------------------------------------------------------------------------


def test_event_id_is_a_uuid7_with_the_millisecond_time() -> None:
    eid = new_event_id(T0, 0x3FF_FFFF_FFFF_FFFF_FFFF)
    u = uuid.UUID(eid)
    assert str(u) == eid
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    assert u.int >> 80 == round(T0 * 1000)


def test_event_id_uses_the_low_62_random_bits() -> None:
    a = uuid.UUID(new_event_id(T0, 0))
    b = uuid.UUID(new_event_id(T0, (1 << 62) - 1))
    assert b.int - a.int == (1 << 62) - 1
    # Bits above 62 are ignored rather than corrupting version or variant.
    assert new_event_id(T0, 1 << 70) == new_event_id(T0, 0)


def test_event_ids_differ_by_randomness_at_the_same_instant() -> None:
    assert new_event_id(T0, 1) != new_event_id(T0, 2)


@given(
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.integers(min_value=0, max_value=(1 << 74) - 1),
    st.integers(min_value=0, max_value=(1 << 74) - 1),
)
def test_event_ids_sort_by_time(t1: float, t2: float, r1: int, r2: int) -> None:
    a, b = new_event_id(t1, r1), new_event_id(t2, r2)
    assert uuid.UUID(a).version == 7
    time_part = slice(0, 18)  # 48 bits of ms, version, 12 bits of sub-ms
    if t1 <= t2:
        assert a[time_part] <= b[time_part]
    # Sub-millisecond time sits in rand_a: ids 1 µs apart sort by time whatever the randomness.
    if t2 - t1 >= 1e-6:
        assert a < b


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), 1e13])
def test_event_id_rejects_bad_times(bad: float) -> None:
    with pytest.raises(ValueError, match="event id time"):
        new_event_id(bad, 1)


# --- time ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "text"),
    [
        (T0, "2026-11-22T10:00:00.123Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (1795000000.9996, "2026-11-18T11:06:41.000Z"),
        (1795000000.0004, "2026-11-18T11:06:40.000Z"),
    ],
)
def test_format_time(t: float, text: str) -> None:
    assert format_time(t) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "10:00"])
def test_format_time_rejects_non_times(bad: object) -> None:
    with pytest.raises(ValueError, match="finite epoch seconds"):
        format_time(bad)  # type: ignore[arg-type]


def test_time_rule_converts_at_eta_due_numbers_at_any_depth() -> None:
    data = {
        "started_at": T0,
        "ended_at": None,
        "eta": int(T0),
        "due": "2026-12-01",
        "count_at": True,  # a bool is not a time
        "good": 5,
        "order": {"due": T0, "items": [{"done_at": 0.0}, 3]},
        "state": MachineState.RUNNING,
    }
    out = convert_times(data)
    assert out == {
        "started_at": "2026-11-22T10:00:00.123Z",
        "ended_at": None,
        "eta": "2026-11-22T10:00:00.000Z",
        "due": "2026-12-01",
        "count_at": True,
        "good": 5,
        "order": {
            "due": "2026-11-22T10:00:00.123Z",
            "items": [{"done_at": "1970-01-01T00:00:00.000Z"}, 3],
        },
        "state": "running",
    }
    # The input is left alone.
    assert data["started_at"] == T0


def test_time_rule_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match=r"order\.eta"):
        convert_times({"order": {"eta": float("nan")}})


# --- events ----------------------------------------------------------------------------


def _event(**data: object) -> Event:
    return Event(machine="sew-07", type="order.progress", time=T0, sequence=42, data=data)


def test_event_envelope_is_cloudevents_structured_json() -> None:
    ev = _event(order_id="A-1", good=10, eta=T0 + 60, percent=12.5)
    eid = new_event_id(T0, 7)
    raw = encode_event(ev, LOC, gateway_id="gw-a", event_id=eid)
    assert b" " not in raw  # compact
    obj = json.loads(raw)
    assert list(obj) == [
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "dataschema",
        "sequence",
        "gatewayid",
        "data",
    ]
    assert obj == {
        "specversion": "1.0",
        "id": eid,
        "source": "/shopfloor/plant1/sewing/l2/sew-07",
        "type": "io.shopfloor.order.progress",
        "time": "2026-11-22T10:00:00.123Z",
        "subject": "sew-07",
        "datacontenttype": "application/json",
        "dataschema": "urn:shopfloor:schema:v1:order.progress",
        "sequence": 42,
        "gatewayid": "gw-a",
        "data": {
            "order_id": "A-1",
            "good": 10,
            "eta": "2026-11-22T10:01:00.123Z",
            "percent": 12.5,
        },
    }
    assert decode_event(raw) == obj


def test_event_with_unencodable_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        encode_event(_event(x=object()), LOC, gateway_id="g", event_id="i")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        encode_event(_event(rate=float("nan")), LOC, gateway_id="g", event_id="i")


def test_non_ascii_text_stays_readable_utf8() -> None:
    raw = encode_event(_event(alarm_text="Fadenbruch Nähkopf"), LOC, gateway_id="g", event_id="i")
    assert "Nähkopf".encode() in raw


# --- decode_event ----------------------------------------------------------------------


def _valid() -> dict[str, object]:
    ev = _event()
    return json.loads(encode_event(ev, LOC, gateway_id="g", event_id=new_event_id(T0, 1)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not UTF-8|not JSON"),
        (b"{", "not JSON"),
        (b"[1]", "must be a JSON object"),
        (json.dumps({**_valid(), "specversion": "0.3"}).encode(), "specversion"),
        (json.dumps({k: v for k, v in _valid().items() if k != "id"}).encode(), "'id'"),
        (json.dumps({**_valid(), "type": "com.other.x"}).encode(), "does not start"),
        (json.dumps({**_valid(), "sequence": "3"}).encode(), "sequence"),
        (json.dumps({**_valid(), "sequence": 0}).encode(), "sequence"),
        (json.dumps({**_valid(), "sequence": True}).encode(), "sequence"),
        (json.dumps({**_valid(), "data": [1]}).encode(), "'data'"),
    ],
)
def test_decode_event_rejects_bad_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_event(payload)


# --- state and status ------------------------------------------------------------------


def test_state_payload_adds_location_gateway_time_schema() -> None:
    snapshot = {
        "state": MachineState.RUNNING,
        "order": {"id": "A-1", "started_at": T0, "due": T0 + 3600, "eta": None},
        "good": 10,
        "time": "ignored: the envelope sets it",
    }
    obj = json.loads(encode_state(snapshot, LOC, gateway_id="gw-a", now=T0 + 1))
    assert obj == {
        "schema": "urn:shopfloor:schema:v1:state",
        "time": "2026-11-22T10:00:01.123Z",
        "gateway_id": "gw-a",
        "location": {"site": "plant1", "area": "sewing", "line": "l2", "machine": "sew-07"},
        "state": "running",
        "order": {
            "id": "A-1",
            "started_at": "2026-11-22T10:00:00.123Z",
            "due": "2026-11-22T11:00:00.123Z",
            "eta": None,
        },
        "good": 10,
    }


def test_status_online_and_offline() -> None:
    online = json.loads(
        encode_status("online", gateway_id="gw-a", version="0.1.0", started_at=T0, now=T0 + 2)
    )
    assert online == {
        "schema": "urn:shopfloor:schema:v1:status",
        "status": "online",
        "gateway_id": "gw-a",
        "version": "0.1.0",
        "started_at": "2026-11-22T10:00:00.123Z",
        "time": "2026-11-22T10:00:02.123Z",
    }
    offline = json.loads(
        encode_status(
            "offline",
            gateway_id="gw-a",
            version="0.1.0",
            started_at=T0,
            now=T0,
            reason="connection lost",
            extra={"machines": 3, "status": "ignored", "last_event_at": T0},
        )
    )
    assert offline["status"] == "offline"
    assert offline["reason"] == "connection lost"
    assert offline["machines"] == 3
    assert offline["last_event_at"] == "2026-11-22T10:00:00.123Z"


def test_status_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="online"):
        encode_status("maybe", gateway_id="g", version="1", started_at=0, now=0)  # type: ignore[arg-type]


def test_epoch_goes_into_the_envelope_when_given() -> None:
    loc = Location("s", "a", "l", "m1")
    ev = Event(machine="m1", type="order.started", time=1000.0, sequence=3, data={})
    with_epoch = json.loads(encode_event(ev, loc, gateway_id="gw", event_id="x", epoch=17))
    assert with_epoch["epoch"] == 17
    assert "epoch" not in json.loads(encode_event(ev, loc, gateway_id="gw", event_id="x"))
    for bad in (0, -1, True, "5"):
        with pytest.raises(ValueError, match="epoch"):
            encode_event(ev, loc, gateway_id="gw", event_id="x", epoch=bad)  # type: ignore[arg-type]
