"""Operator attribution: the pure bookkeeping and its hooks in the tracker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.attribution import MAX_OPERATORS, Attribution, parse_operator
from gateway.core.model import Event, Sample
from gateway.core.tracker import MachineTracker, TrackerSettings

M = "sew-01"
T0 = 1_700_000_000.0


def obs(tr: MachineTracker, t: float, **signals: Any) -> list[Event]:
    return tr.observe([Sample(M, k, v, T0 + t) for k, v in signals.items()], T0 + t)


def operators(events: list[Event], type_: str) -> list[Any]:
    return [e.data.get("operators") for e in events if e.type == type_]


def share(op: str | None, seconds: float, good: int, scrap: int = 0) -> dict[str, Any]:
    return {"operator": op, "seconds": seconds, "good": good, "scrap": scrap}


# ---------------------------------------------------------------- pure module


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("B-1042", "B-1042"), ("  B-7\x00\x00", "B-7"), ("", None), ("0", None), (1042, "1042")],
)
def test_badges_are_cleaned_and_empty_means_nobody(raw: object, expected: str | None) -> None:
    assert parse_operator(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (True, "must be a string"),
        (1.5, "must be a string"),
        ("x" * 65, "longer"),
        ("a\nb", "control"),
    ],
)
def test_bad_badges_are_refused_with_the_reason(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_operator(raw)


def test_time_and_pieces_follow_the_badge() -> None:
    a = Attribution()
    a.badge("anna", 0.0)
    a.begin_order(10.0)
    a.credit(5, 1)
    a.badge("bo", 70.0)
    a.credit(3, 0)
    a.badge(None, 100.0)
    a.credit(1, 0)
    assert a.view(130.0) == [
        share("anna", 60.0, 5, 1),
        share("bo", 30.0, 3),
        share(None, 30.0, 1),
    ]
    a.end_order(130.0)
    assert a.view(999.0) == a.view(130.0), "a completed order's shares are final"


def test_nothing_is_attributed_before_a_badge_was_ever_read() -> None:
    a = Attribution()
    a.begin_order(0.0)
    a.credit(4, 0)
    assert a.view(10.0) is None
    a.badge("anna", 10.0)
    a.credit(1, 0)
    assert a.view(20.0) == [share("anna", 10.0, 1)]


def test_an_unreachable_machine_is_no_ones_time() -> None:
    a = Attribution()
    a.badge("anna", 0.0)
    a.begin_order(0.0)
    a.pause(100.0)
    assert a.view(400.0) == [share("anna", 100.0, 0)]
    a.observed(400.0)
    assert a.view(450.0) == [share("anna", 150.0, 0)]


def test_a_flood_of_badges_does_not_grow_the_state_without_bound() -> None:
    a = Attribution()
    a.begin_order(0.0)
    for n in range(MAX_OPERATORS + 20):
        a.badge(f"b{n}", float(n))
        a.credit(1, 0)
    view = a.view(float(MAX_OPERATORS + 20))
    assert view is not None and len(view) <= MAX_OPERATORS
    assert sum(s["good"] for s in view) == MAX_OPERATORS + 20


def test_restore_closes_the_interval_where_the_gateway_last_saw_the_machine() -> None:
    a = Attribution()
    a.badge("anna", 0.0)
    a.begin_order(0.0)
    a.credit(2, 0)
    back = Attribution.restore(json.loads(json.dumps(a.export())), last_seen=50.0)
    # Down from 50 to 500: nobody's time. Heard from again at 500.
    back.observed(500.0)
    assert back.view(520.0) == [share("anna", 70.0, 2)]
    assert Attribution.restore(None, 10.0).view(10.0) is None


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"known": 1, "operator": None, "order_open": False, "since": None, "shares": []},
        {"known": True, "operator": 5, "order_open": False, "since": None, "shares": []},
        {"known": True, "operator": "a", "order_open": True, "since": None, "shares": [[1]]},
        {"known": True, "operator": "a", "order_open": True, "since": "x", "shares": []},
        {
            "known": True,
            "operator": "a",
            "order_open": True,
            "since": None,
            "shares": [["a", 1.0, -1, 0]],
        },
    ],
)
def test_restore_rejects_malformed_state(state: Any) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        Attribution.restore(state, 1.0)


# ---------------------------------------------------------------- in the tracker


def test_a_shift_change_mid_order_splits_time_and_pieces() -> None:
    tr = MachineTracker(M, TrackerSettings(progress_interval=1e9, progress_step_percent=50))
    obs(tr, 0, state="running", operator="B-1", order_id="PO-1", target_count=10, good_count=0)
    obs(tr, 100, good_count=4, scrap_count=1)
    # The new badge and two pieces in the same poll: the pieces are the new operator's.
    obs(tr, 200, operator="B-2", good_count=6)
    obs(tr, 300, operator="B-2", good_count=10)
    # A count is credited once the next reading agrees, to whoever was logged in at its read.
    events = obs(tr, 400, operator="B-2", good_count=10)
    (completed,) = operators(events, "order.completed")
    assert completed == [share("B-1", 200.0, 4, 1), share("B-2", 200.0, 6)]
    assert operators(events, "order.progress") == [completed]
    assert tr.snapshot()["order"]["operators"] == completed


def test_the_next_order_starts_with_the_operator_logged_in() -> None:
    tr = MachineTracker(M)
    obs(tr, 0, operator="B-1", order_id="PO-1", good_count=0)
    events = obs(tr, 50, order_id="PO-2", good_count=0)
    assert operators(events, "order.completed") == [[share("B-1", 50.0, 0)]]
    obs(tr, 80, good_count=3)
    events = obs(tr, 81, good_count=3)  # credited once the next reading agrees
    assert operators(events, "order.progress") == [[share("B-1", 31.0, 3)]]


def test_a_machine_without_a_badge_reader_sends_no_operators() -> None:
    tr = MachineTracker(M)
    events = obs(tr, 0, order_id="PO-1", good_count=0)
    events += obs(tr, 10, good_count=2)
    events += obs(tr, 20, order_id="")
    assert all("operators" not in e.data for e in events)
    assert "operators" not in tr.snapshot()["order"] if tr.snapshot()["order"] else True


def test_a_bad_badge_is_rejected_and_the_last_one_stands() -> None:
    tr = MachineTracker(M)
    obs(tr, 0, operator="B-1", order_id="PO-1", good_count=0)
    obs(tr, 10, operator="B\x07", good_count=1)
    (rejection,) = tr.drain_rejections()
    assert rejection.signal == "operator" and "control" in rejection.reason
    obs(tr, 11, good_count=1)
    assert tr.snapshot()["order"]["operators"] == [share("B-1", 11.0, 1)]


def test_attribution_survives_a_restart_without_counting_the_downtime() -> None:
    settings_ = TrackerSettings(progress_interval=1e9)
    tr = MachineTracker(M, settings_)
    obs(tr, 0, operator="B-1", order_id="PO-1", good_count=0)
    obs(tr, 60, good_count=5)
    saved = json.loads(json.dumps(tr.export_state()))
    back = MachineTracker.restore(M, settings_, saved)
    assert back.snapshot() == tr.snapshot()
    # The gateway was down from 60 to 600; the device counted 3 more meanwhile.
    # (A count is credited once the next reading agrees: 5 now, 8 with the next.)
    obs(back, 600, operator="B-1", good_count=8)
    assert back.snapshot()["order"]["operators"] == [share("B-1", 60.0, 5)]
    obs(back, 660, operator="B-1", good_count=9)
    assert back.snapshot()["order"]["operators"] == [share("B-1", 120.0, 8)]
    obs(back, 720, operator="B-1", good_count=9)
    assert back.snapshot()["order"]["operators"] == [share("B-1", 180.0, 9)]


def test_state_written_before_attribution_existed_still_restores() -> None:
    tr = MachineTracker(M)
    obs(tr, 0, order_id="PO-1", good_count=0)
    old = tr.export_state()
    del old["attribution"]
    back = MachineTracker.restore(M, TrackerSettings(), old)
    obs(back, 10, operator="B-1", good_count=2)
    obs(back, 11, operator="B-1", good_count=2)
    assert back.snapshot()["order"]["operators"] == [share("B-1", 1.0, 2)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["B-1", "B-2", "", None]),  # None: no badge in this poll
            st.integers(0, 5),
            st.integers(0, 2),
            st.booleans(),  # link drops after this poll
        ),
        min_size=1,
        max_size=40,
    )
)
def test_shares_add_up_to_the_order(polls: list[tuple[str | None, int, int, bool]]) -> None:
    tr = MachineTracker(M, TrackerSettings(progress_interval=1e9))
    obs(tr, 0, operator="B-1", order_id="PO-1", good_count=0, scrap_count=0)
    good = scrap = 0
    for n, (badge, dg, ds, drop) in enumerate(polls, start=1):
        good, scrap = good + dg, scrap + ds
        signals: dict[str, Any] = {"good_count": good, "scrap_count": scrap}
        if badge is not None:
            signals["operator"] = badge
        obs(tr, 10.0 * n, **signals)
        if drop:
            tr.connection(False, T0 + 10.0 * n + 5)
    for n in range(len(polls) + 1, len(polls) + 3):  # steady: the last counts agree
        obs(tr, 10.0 * n, good_count=good, scrap_count=scrap)
    order = tr.snapshot()["order"]
    view = order["operators"]
    assert sum(s["good"] for s in view) == order["good"] == good
    assert sum(s["scrap"] for s in view) == order["scrap"] == scrap
    # Time is never more than the order was observed (the last link drop is 5 s after a poll).
    assert 0 <= sum(s["seconds"] for s in view) <= 10.0 * (len(polls) + 2) + 5 + 1e-6
