"""FloorView: the live view's pure core, fed scripted MQTT messages."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli.watch import FloorView, broker_address, parse_time

PREFIX = "shopfloor"
BASE = f"{PREFIX}/plant1/sewing/line1"
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def rfc3339(epoch: float) -> str:
    """Contract time format: UTC with milliseconds and a Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def event(
    machine: str,
    short_type: str,
    sequence: int | None,
    data: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    at: float = T0,
    **extra: Any,
) -> tuple[str, bytes, bool]:
    """One CloudEvent message as (topic, payload, retained)."""
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or f"{machine}-{sequence}",
        "source": f"/shopfloor/plant1/sewing/line1/{machine}",
        "type": f"io.shopfloor.{short_type}",
        "time": rfc3339(at),
        "subject": machine,
        "datacontenttype": "application/json",
        "dataschema": f"urn:shopfloor:schema:v1:{short_type}",
        "gatewayid": "gw-1",
        "data": data or {},
        **extra,
    }
    if sequence is not None:
        doc["sequence"] = sequence
    return f"{BASE}/{machine}/event/{short_type}", json.dumps(doc).encode(), False


def snapshot(machine: str, sequence: int, **fields: Any) -> tuple[str, bytes, bool]:
    """A retained state snapshot message."""
    doc: dict[str, Any] = {
        "machine": machine,
        "location": {"site": "plant1", "area": "sewing", "line": "line1", "machine": machine},
        "gateway_id": "gw-1",
        "time": rfc3339(T0),
        "state": "running",
        "state_since": rfc3339(T0 - 600),
        "connected": True,
        "order": {
            "order_id": "PO-4711",
            "source": "device",
            "good": 40,
            "scrap": 2,
            "target": 100,
            "percent": 40.0,
            "rate_per_hour": 120.0,
            "eta": rfc3339(T0 + 1800),
            "due": rfc3339(T0 + 3600),
            "started_at": rfc3339(T0 - 1200),
        },
        "alarm": None,
        "sequence": sequence,
        "updated_at": rfc3339(T0),
    }
    doc.update(fields)
    return f"{BASE}/{machine}/state", json.dumps(doc).encode(), True


def status(gateway: str, value: str) -> tuple[str, bytes, bool]:
    """A retained gateway status message."""
    payload = json.dumps({"status": value, "time": rfc3339(T0)}).encode()
    return f"{PREFIX}/plant1/gateway/{gateway}/status", payload, True


def feed(view: FloorView, *messages: tuple[str, bytes, bool]) -> FloorView:
    for topic, payload, retained in messages:
        view.apply(topic, payload, retained)
    return view


def progress(machine: str, sequence: int, good: int, **data: Any) -> tuple[str, bytes, bool]:
    body = {"order_id": "PO-4711", "good": good, "scrap": 2, "target": 100, "percent": good}
    body.update(data)
    return event(machine, "order.progress", sequence, body)


# -- late join and the row ---------------------------------------------------------------------


def test_retained_snapshot_fills_the_row_before_any_event() -> None:
    view = feed(FloorView(PREFIX), snapshot("sew-01", 10), status("gw-1", "online"))

    row = view.machine("sew-01")
    assert row is not None
    assert (row.site, row.area, row.line) == ("plant1", "sewing", "line1")
    assert row.state == "running"
    assert row.connected is True
    assert row.order_id == "PO-4711"
    assert (row.good, row.scrap, row.target, row.percent) == (40, 2, 100, 40.0)
    assert row.eta == rfc3339(T0 + 1800)
    assert view.gateways["plant1/gw-1"].status == "online"
    assert view.stats.events == 0
    assert view.stats.malformed == 0


def test_events_after_the_snapshot_update_the_row() -> None:
    view = feed(
        FloorView(PREFIX),
        snapshot("sew-01", 10),
        progress("sew-01", 11, 45),
        event("sew-01", "machine.state.changed", 12, {"state": "fault", "previous": "running"}),
        event("sew-01", "machine.alarm.raised", 13, {"code": "E42", "text": "thread break"}),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 45
    assert row.state == "fault"
    assert (row.alarm_code, row.alarm_text) == ("E42", "thread break")
    assert row.last_event_type == "machine.alarm.raised"
    assert view.stats.events == 3
    assert view.stats.gaps == 0


def test_order_lifecycle() -> None:
    view = FloorView(PREFIX)
    feed(
        view,
        event(
            "cnc-01", "order.started", 1, {"order_id": "A-1", "target": 10, "source": "platform"}
        ),
    )
    row = view.machine("cnc-01")
    assert row is not None
    assert (row.order_id, row.good, row.target, row.order_done) == ("A-1", 0, 10, False)

    late = {"order_id": "A-1", "eta": rfc3339(T0 + 7200), "due": rfc3339(T0 + 3600)}
    feed(view, event("cnc-01", "order.at_risk", 2, {**late, "late_by_s": 3600}))
    assert row.at_risk
    assert row.due == rfc3339(T0 + 3600)

    feed(view, event("cnc-01", "order.back_on_track", 3, {"order_id": "A-1"}))
    assert not row.at_risk

    done = {"order_id": "A-1", "reason": "target_reached", "good": 10, "scrap": 1, "target": 10}
    feed(view, event("cnc-01", "order.completed", 4, done))
    assert row.order_done
    assert (row.good, row.scrap) == (10, 1)
    assert "done" in view.render()

    feed(view, event("cnc-01", "order.started", 5, {"order_id": "A-2", "target": 5}))
    assert (row.order_id, row.order_done, row.good, row.target) == ("A-2", False, 0, 5)


def test_progress_for_an_order_whose_start_was_missed_replaces_the_old_order() -> None:
    view = feed(FloorView(PREFIX), snapshot("sew-01", 10))
    feed(view, progress("sew-01", 11, 3, order_id="PO-9", target=None, percent=None, eta=None))

    row = view.machine("sew-01")
    assert row is not None
    assert row.order_id == "PO-9"
    assert row.good == 3
    assert row.due is None  # the due time belonged to PO-4711


def test_alarm_cleared_and_connection_changed() -> None:
    view = feed(
        FloorView(PREFIX),
        event("sew-01", "machine.alarm.raised", 1, {"code": 7, "text": "oil low"}),
        event("sew-01", "machine.alarm.cleared", 2, {"code": 7}),
        event("sew-01", "machine.connection.changed", 3, {"connected": False, "reason": "timeout"}),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.alarm_code is None
    assert row.connected is False


def test_snapshot_tells_completed_and_late_orders() -> None:
    base = json.loads(snapshot("x", 1)[1])["order"]
    done = {**base, "status": "completed", "completed_at": rfc3339(T0)}
    late = {**base, "status": "running", "eta": rfc3339(T0 + 7200), "due": rfc3339(T0 + 3600)}
    view = feed(
        FloorView(PREFIX), snapshot("sew-01", 1, order=done), snapshot("sew-02", 1, order=late)
    )

    sew01, sew02 = view.machine("sew-01"), view.machine("sew-02")
    assert sew01 is not None and sew02 is not None
    assert (sew01.order_done, sew01.at_risk) == (True, False)
    assert (sew02.order_done, sew02.at_risk) == (False, True)


def test_snapshot_with_null_order_and_an_alarm() -> None:
    view = feed(
        FloorView(PREFIX),
        snapshot("sew-01", 3, state="fault", order=None, alarm={"code": "E1", "text": "jam"}),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.order_id is None
    assert row.good is None
    assert row.alarm_code == "E1"


# -- at least once: deduplication --------------------------------------------------------------


def test_duplicate_event_is_counted_and_applied_once() -> None:
    first = progress("sew-01", 1, 10)
    view = feed(FloorView(PREFIX), first, progress("sew-01", 2, 11), first)

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 11  # the re-delivered older copy did not roll the count back
    assert view.stats.events == 2
    assert view.stats.duplicates == 1
    assert row.duplicates == 1
    assert view.stats.out_of_order == 0


def test_dedupe_memory_is_bounded() -> None:
    view = FloorView(PREFIX, id_memory=3)
    for n in range(1, 6):
        feed(view, progress("sew-01", n, n))

    assert len(view._id_set) == 3
    # Id 1 fell out of the window: a very late copy is no longer recognised by id, but its
    # sequence still marks it as old, so it does not change the row.
    feed(view, progress("sew-01", 1, 1))
    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 5
    assert view.stats.duplicates == 0
    assert view.stats.out_of_order == 1


def test_malformed_first_copy_does_not_mark_the_id_as_seen() -> None:
    topic, good_payload, _ = progress("sew-01", 1, 10)
    broken = json.loads(good_payload)
    broken["sequence"] = "minus one"
    view = feed(FloorView(PREFIX), (topic, json.dumps(broken).encode(), False))
    feed(view, (topic, good_payload, False))

    assert view.stats.malformed == 1
    assert view.stats.duplicates == 0
    assert view.stats.events == 1


# -- sequence gaps ----------------------------------------------------------------------------


def test_gap_is_flagged_per_machine() -> None:
    view = feed(
        FloorView(PREFIX),
        progress("sew-01", 1, 1),
        progress("sew-02", 7, 1),
        progress("sew-01", 2, 2),
        progress("sew-01", 5, 5),  # 3 and 4 lost
        progress("sew-02", 8, 2),
    )

    assert view.stats.gaps == 1
    assert view.stats.skipped == 2
    assert view.missing == 2
    row1, row2 = view.machine("sew-01"), view.machine("sew-02")
    assert row1 is not None and row2 is not None
    assert (row1.gaps, row2.gaps) == (1, 0)
    assert "gaps 1 (2 missing)" in view.render()


def test_late_event_fills_its_hole_without_rolling_the_row_back() -> None:
    view = feed(
        FloorView(PREFIX),
        progress("sew-01", 1, 1),
        progress("sew-01", 3, 3),
        progress("sew-01", 2, 2),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 3
    assert view.stats.gaps == 1
    assert view.stats.late == 1
    assert view.missing == 0


def test_sequence_starting_again_at_one_is_a_restart_not_a_flood_of_errors() -> None:
    view = feed(FloorView(PREFIX), *(progress("sew-01", n, n) for n in (1, 2, 3)))
    later = T0 + 60
    feed(view, event("sew-01", "order.progress", 1, {"good": 0}, event_id="new-1", at=later))
    feed(view, event("sew-01", "order.progress", 2, {"good": 1}, event_id="new-2", at=later))

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 1
    assert view.stats.restarts == 1
    assert view.stats.gaps == 0
    assert view.stats.out_of_order == 0


def test_old_sequence_with_a_new_id_is_out_of_order() -> None:
    view = feed(FloorView(PREFIX), *(progress("sew-01", n, n) for n in (1, 2, 3)))
    feed(view, event("sew-01", "order.progress", 2, {"good": 99}, event_id="other-2"))

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 3
    assert view.stats.out_of_order == 1


def test_snapshot_older_than_the_row_is_ignored() -> None:
    view = feed(FloorView(PREFIX), snapshot("sew-01", 10), progress("sew-01", 11, 45))
    stale_order = {"order_id": "PO-4711", "good": 44, "target": 100}
    feed(view, snapshot("sew-01", 10, order=stale_order))

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 45
    assert view.stats.stale_snapshots == 1


def test_event_without_sequence_is_applied_but_not_gap_tracked() -> None:
    view = feed(
        FloorView(PREFIX),
        progress("sew-01", 5, 5),
        event("sew-01", "order.progress", None, {"good": 6}),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 6
    assert row.last_sequence == 5


def test_sequence_as_decimal_string_is_accepted() -> None:
    view = feed(FloorView(PREFIX), progress("sew-01", 1, 1))
    topic, payload, _ = progress("sew-01", 2, 2)
    doc = json.loads(payload)
    doc["sequence"] = "2"
    feed(view, (topic, json.dumps(doc).encode(), False))

    row = view.machine("sew-01")
    assert row is not None
    assert (row.last_sequence, row.good, view.stats.malformed) == (2, 2, 0)


# -- tolerance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{BASE}/sew-01/event/order.progress", b"{not json", "not JSON"),
        (f"{BASE}/sew-01/event/order.progress", b"\xff\xfe", "not JSON"),
        (f"{BASE}/sew-01/event/order.progress", b"[1, 2]", "JSON object"),
        (f"{BASE}/sew-01/event/order.progress", b'{"type": "io.shopfloor.x"}', "'id'"),
        (f"{BASE}/sew-01/event/order.progress", b'{"id": "x"}', "'type'"),
        (f"{BASE}/sew-01/event/order.progress", b'{"id": "x", "type": "t", "data": 3}', "'data'"),
        (
            f"{BASE}/sew-01/event/order.progress",
            b'{"id": "x", "type": "t", "sequence": true}',
            "'sequence'",
        ),
        (f"{BASE}/sew-01/state", b'{"state": "idle", "order": [1]}', "'order'"),
        (f"{BASE}/sew-01/state", b'{"state": "idle", "alarm": "E1"}', "'alarm'"),
        (f"{BASE}/sew-01/state", b'{"sequence": -3}', "'sequence'"),
        (f"{PREFIX}/plant1/gateway/gw-1/status", b'{"state": "online"}', "'status'"),
        (f"{PREFIX}/plant1/gateway/gw-1/status", b"online", "not JSON"),
    ],
)
def test_malformed_payloads_are_counted_and_shown(topic: str, payload: bytes, reason: str) -> None:
    view = FloorView(PREFIX)
    view.apply(topic, payload, False)
    feed(view, progress("sew-01", 1, 7))

    assert view.stats.malformed == 1
    assert reason in view.problems[-1]
    assert topic in view.problems[-1]
    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 7  # the view carries on
    assert "malformed 1" in view.render()


def test_unknown_event_type_and_fields_are_tolerated() -> None:
    view = feed(
        FloorView(PREFIX),
        progress("sew-01", 1, 5, bobbin="blue", extra={"nested": [1, 2]}),
        event("sew-01", "machine.bobbin.empty", 2, {"bobbin": 3}, newattr="x"),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 5
    assert row.last_event_type == "machine.bobbin.empty"
    assert view.stats.unknown_types == 1
    assert view.stats.malformed == 0
    assert "machine.bobbin.empty" in view.render(width=140)


def test_wrong_field_types_in_data_are_ignored_not_fatal() -> None:
    view = feed(
        FloorView(PREFIX),
        event("sew-01", "order.progress", 1, {"order_id": "A", "good": "many", "target": None}),
        event("sew-01", "machine.state.changed", 2, {"state": ["running"]}),
    )

    row = view.machine("sew-01")
    assert row is not None
    assert row.good is None
    assert row.state is None
    assert view.stats.malformed == 0


def test_absurd_numbers_are_ignored() -> None:
    topic = f"{BASE}/sew-01/event/order.progress"
    payload = b'{"id": "n1", "type": "io.shopfloor.order.progress", "sequence": 1, "data": '
    payload += b'{"order_id": "A", "good": 1' + b"0" * 400 + b', "scrap": 1e999, "target": NaN}}'
    view = feed(FloorView(PREFIX), (topic, payload, False))

    row = view.machine("sew-01")
    assert row is not None
    assert (row.order_id, row.good, row.scrap, row.target) == ("A", None, None, None)
    assert view.stats.malformed == 0
    assert "A" in view.render()


def test_topics_outside_the_contract_are_ignored() -> None:
    view = feed(
        FloorView(PREFIX),
        (f"{BASE}/sew-01/telemetry", b'{"stitch_rate": 3}', False),
        (f"{BASE}/sew-01/cmd/assign-order", b'{"order_id": "X"}', False),
        ("other/plant1/sewing/line1/sew-01/state", b"{}", True),
        (f"{PREFIX}/plant1", b"hello", False),
    )

    assert view.stats.ignored == 4
    assert view.machines == {}
    assert view.stats.malformed == 0


def test_empty_retained_payload_removes_machine_and_gateway() -> None:
    view = feed(FloorView(PREFIX), snapshot("sew-01", 1), status("gw-1", "online"))
    feed(
        view,
        (f"{BASE}/sew-01/state", b"", True),
        (f"{PREFIX}/plant1/gateway/gw-1/status", b"", True),
    )

    assert view.machines == {}
    assert view.gateways == {}
    assert view.stats.malformed == 0


def test_prefix_with_several_levels() -> None:
    view = FloorView("acme/shopfloor/")
    topic, payload, retained = snapshot("sew-01", 1)
    view.apply("acme/" + topic, payload, retained)

    assert view.machine("sew-01") is not None


# -- rendering ---------------------------------------------------------------------------------


def full_floor() -> FloorView:
    return feed(
        FloorView(PREFIX),
        status("gw-1", "online"),
        snapshot("sew-01", 10),
        snapshot("sew-02", 4, state="idle", order=None),
        progress("sew-01", 11, 55, eta=rfc3339(T0 + 1500)),
        event("sew-03", "machine.alarm.raised", 1, {"code": "E42", "text": "thread break"}),
    )


def test_render_table_rows_and_footer() -> None:
    text = full_floor().render(width=120)
    lines = text.splitlines()

    assert lines[1].split()[:4] == ["MACHINE", "AREA/LINE", "STATE", "ORDER"]
    sew01 = next(line for line in lines if line.startswith("sew-01"))
    assert sew01.split()[:7] == ["sew-01", "sewing/line1", "running", "PO-4711", "55", "2", "100"]
    assert "55%" in sew01
    assert "10:25Z" in sew01  # absolute ETA without `now`
    assert "order.progress 10:00:00Z" in sew01
    assert "ALARM E42 thread break" in text
    assert "gateways: gw-1 online" in text
    assert "events 2  duplicates 0  gaps 0  malformed 0" in text


def test_render_is_deterministic_without_now_and_relative_with_it() -> None:
    view = full_floor()
    assert view.render() == view.render()

    text = view.render(width=140, now=T0 + 300)
    sew01 = next(line for line in text.splitlines() if line.startswith("sew-01"))
    assert "20m" in sew01  # eta 25 min after T0, seen 5 min after T0
    assert "order.progress 5m" in sew01


@pytest.mark.parametrize("width", [40, 60, 80, 100, 160])
def test_render_never_exceeds_the_width(width: int) -> None:
    view = full_floor()
    for n in range(3):
        view.apply(f"{BASE}/sew-01/event/x", b"x" * 300 + bytes([n]), False)
    for line in view.render(width=width, now=T0).splitlines():
        assert len(line) <= width


def test_colours_only_when_asked_and_never_counted_in_width() -> None:
    view = full_floor()
    plain = view.render(width=100)
    coloured = view.render(width=100, color=True)

    assert "\x1b[" not in plain
    assert "\x1b[32mrunning" in coloured
    assert ANSI.sub("", coloured) == plain


def test_device_strings_cannot_drive_the_terminal() -> None:
    view = feed(
        FloorView(PREFIX),
        event("sew-01", "machine.alarm.raised", 1, {"code": "E1", "text": "\x1b[2Jgotcha\x07"}),
    )

    text = view.render(width=140)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "?[2Jgotcha?" in text


def test_machines_of_an_offline_gateway_are_marked_as_last_known() -> None:
    view = feed(FloorView(PREFIX), status("gw-1", "offline"), snapshot("sew-01", 1))

    text = view.render(width=120)
    assert "running*" in text
    assert "gw-1 offline" in text
    assert "* last known state" in text


def test_at_risk_order_is_marked() -> None:
    view = feed(
        FloorView(PREFIX),
        snapshot("sew-01", 1),
        event("sew-01", "order.at_risk", 2, {"order_id": "PO-4711", "eta": rfc3339(T0 + 600)}),
    )

    text = view.render(width=120)
    assert "10:10Z!" in text
    assert "! order at risk" in text


def test_empty_view_says_it_is_waiting() -> None:
    text = FloorView(PREFIX).render()
    assert "no machines yet" in text
    assert "gateways: none seen" in text


# -- helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T10:00:00.123Z", T0 + 0.123),
        ("2026-11-22T11:00:00+01:00", T0),
        ("2026-11-22T10:00:00", T0),
        ("yesterday", None),
        (None, None),
        ("", None),
    ],
)
def test_parse_time(text: str | None, expected: float | None) -> None:
    assert parse_time(text) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1884", ("127.0.0.1", 1884)),
        ("broker.local", ("broker.local", 1883)),
        ("[::1]:1885", ("::1", 1885)),
        ("[::1]", ("::1", 1883)),
    ],
)
def test_broker_address(text: str, expected: tuple[str, int]) -> None:
    assert broker_address(text) == expected


@pytest.mark.parametrize("text", ["host:", ":1883", "host:99999", "host:http", "[::1", "[::1]x"])
def test_broker_address_rejects_garbage(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        broker_address(text)


# -- property: nothing from outside can crash the view ----------------------------------------

segments = st.sampled_from(["plant1", "gateway", "state", "event", "status", "x", "", "sew-01"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
contract_keys = st.sampled_from(
    ["id", "type", "sequence", "data", "time", "state", "order", "alarm", "status", "good", "eta"]
)
payloads = st.one_of(
    st.binary(max_size=40),
    st.dictionaries(contract_keys, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(segments, min_size=1, max_size=6), payloads, st.booleans()), max_size=12
    ),
    st.integers(min_value=40, max_value=200),
)
def test_any_input_keeps_the_view_alive(
    messages: list[tuple[list[str], bytes, bool]], width: int
) -> None:
    view = FloorView(PREFIX)
    for parts, payload, retained in messages:
        view.apply("/".join([PREFIX, *parts]), payload, retained)

    assert view.stats.messages == len(messages)
    assert not any(p.startswith(("internal error",)) for p in view.problems)
    assert all("internal error" not in p for p in view.problems)
    for line in view.render(width=width, now=T0).splitlines():
        assert len(line) <= width
