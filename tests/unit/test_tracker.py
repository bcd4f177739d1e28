"""Table-driven tests for MachineTracker: every rule with its expected event list written out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.model import Event, Quality, Sample
from gateway.core.tracker import (
    ORDER_ID_TAKEN,
    AssignOrder,
    CancelOrder,
    CommandResult,
    MachineTracker,
    TrackerSettings,
)

M = "sew-01"
T0 = 1_700_000_000.0
#: What every order event says of an order observed without gaps (tests/unit/test_gaps.py).
GAP_FREE = {"gap_free": True, "unobserved_s": 0.0, "gap_started_at": None, "gap_ended_at": None}


def batch(t: float, quality: Quality = Quality.GOOD, **signals: Any) -> list[Sample]:
    """One acquisition: every signal read at ``T0 + t``."""
    return [Sample(M, name, value, T0 + t, quality) for name, value in signals.items()]


def obs(tr: MachineTracker, t: float, **signals: Any) -> list[Event]:
    return tr.observe(batch(t, **signals), T0 + t)


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def pick(events: list[Event], *keys: str) -> list[tuple[Any, ...]]:
    """(type, data[key]...) per event: compact expected lists."""
    return [(e.type, *(e.data.get(k) for k in keys)) for e in events]


def tracker(**settings: Any) -> MachineTracker:
    """A tracker that credits each counter reading at once (``counter_confirm=1``).

    The lifecycle, rate and alarm tests here follow the readings one by one; the default,
    an increase credited once the next reading agrees (one reading later), is tested in
    tests/unit/test_counter_glitches.py, ``test_counter_rules`` and the golden cases.
    """
    return MachineTracker(M, TrackerSettings(**{"counter_confirm": 1, **settings}))


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "bad",
    [
        {"progress_step_percent": 0},
        {"progress_interval": -1},
        {"rate_window": 0},
        {"counter_wrap": 1},
        {"counter_mode": "weird"},
        {"scrap_source": "guess"},
        {"order_source": "fax"},
        {"rate_min_span": -1},
    ],
)
def test_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrackerSettings(**bad)


# ---------------------------------------------------------------- state and connection


def test_first_state_has_no_previous() -> None:
    tr = tracker()
    events = obs(tr, 0, state="running")
    assert [(e.type, dict(e.data)) for e in events] == [
        ("machine.connection.changed", {"connected": True, "reason": "data_received"}),
        (
            "machine.state.changed",
            {
                "state": "running",
                "previous": None,
                "previous_duration_s": None,
                "unobserved_s": 0.0,
                "reason": "device",
                "order_id": None,
            },
        ),
    ]
    assert [e.sequence for e in events] == [1, 2]
    assert all(e.time == T0 and e.machine == M for e in events)


def test_state_changes_carry_previous_and_duration() -> None:
    tr = tracker()
    tr.connection(True, T0)
    obs(tr, 0, state="running")
    assert obs(tr, 5, state="running") == []  # duplicate: nothing
    events = obs(tr, 65, state="idle", order_id="A-1")
    assert pick(events, "state", "previous", "previous_duration_s", "reason", "order_id") == [
        ("order.started", None, None, None, None, "A-1"),
        ("machine.state.changed", "idle", "running", 65.0, "device", "A-1"),
    ]


def test_disconnect_goes_offline_and_reconnect_waits_for_a_state_sample() -> None:
    tr = tracker()
    tr.connection(True, T0)
    obs(tr, 0, state="running")
    events = tr.connection(False, T0 + 10, "timeout")
    assert pick(events, "connected", "reason", "state", "previous", "previous_duration_s") == [
        ("machine.connection.changed", False, "timeout", None, None, None),
        ("machine.state.changed", None, "offline", "offline", "running", 10.0),
    ]
    assert tr.connection(False, T0 + 11, "timeout") == []  # already offline
    assert pick(tr.connection(True, T0 + 30, "reconnected"), "connected") == [
        ("machine.connection.changed", True)
    ]
    assert tr.snapshot()["state"] == "offline"  # no state invented
    assert pick(obs(tr, 31, state="running"), "state", "previous", "previous_duration_s") == [
        ("machine.state.changed", "running", "offline", 21.0)
    ]


def test_connection_lost_before_any_data() -> None:
    tr = tracker()
    assert pick(tr.connection(False, T0, "refused"), "state", "previous") == [
        ("machine.connection.changed", None, None),
        ("machine.state.changed", "offline", None),
    ]


def test_good_data_while_disconnected_implies_connected() -> None:
    tr = tracker()
    tr.connection(False, T0, "refused")
    events = obs(tr, 5, spindle_speed=1200.0)
    assert pick(events, "connected", "reason") == [
        ("machine.connection.changed", True, "data_received")
    ]
    assert tr.connection(True, T0 + 6) == []


def test_bad_quality_is_ignored_and_does_not_count_as_contact() -> None:
    tr = tracker()
    tr.connection(False, T0)
    samples = batch(1, Quality.BAD, state=None, good_count=None)
    assert tr.observe(samples, T0 + 1) == []
    assert tr.drain_rejections() == []


@pytest.mark.parametrize(
    ("signal", "value", "reason"),
    [
        ("state", "exploded", "unknown machine state"),
        ("state", 3, "unknown machine state"),
        ("state", "offline", "unknown machine state"),  # only the gateway says offline
        ("good_count", -5, "negative"),
        ("good_count", "many", "integer"),
        ("good_count", 2.5, "whole number"),
        ("target_count", 20_000_000, "above"),
        ("order_id", "x" * 500, "longer than"),
        ("order_id", "A\x07B", "control characters"),
        ("order_id", 1.5, "must be a string"),
        ("alarm_code", "E12", "integer"),
        ("alarm_text", 12.5, "must be a string"),
    ],
)
def test_invalid_values_are_rejected_with_a_reason(signal: str, value: Any, reason: str) -> None:
    tr = tracker()
    tr.connection(True, T0)
    assert tr.observe([Sample(M, signal, value, T0)], T0) == []
    (rejection,) = tr.drain_rejections()
    assert rejection.signal == signal and reason in rejection.reason
    assert tr.drain_rejections() == []


def test_samples_for_another_machine_are_rejected() -> None:
    tr = tracker()
    assert tr.observe([Sample("other", "state", "running", T0)], T0) == []
    assert "other" in tr.drain_rejections()[0].reason


def test_rejections_are_bounded() -> None:
    tr = tracker()
    for i in range(300):
        tr.observe([Sample(M, "state", "bogus", T0 + i)], T0 + i)
    assert len(tr.drain_rejections()) == 100


def test_state_values_are_normalised() -> None:
    tr = tracker()
    assert pick(obs(tr, 0, state=" Running "), "state")[-1] == ("machine.state.changed", "running")


def test_late_state_sample_is_ignored() -> None:
    tr = tracker()
    obs(tr, 10, state="running")
    assert tr.observe(batch(5, state="idle"), T0 + 11) == []


def test_program_never_reaches_events_and_the_badge_only_the_order_operators() -> None:
    tr = tracker()
    events = obs(tr, 0, state="running", order_id="A", operator="Jane Doe", program="P1")
    events += obs(tr, 60, good_count=3)
    assert "P1" not in json.dumps([dict(e.data) for e in events])
    assert "P1" not in json.dumps(tr.snapshot())
    # The badge is kept for the order's attribution only (redacted per destination).
    for data in [*(dict(e.data) for e in events), tr.snapshot()["order"]]:
        rest = {k: v for k, v in data.items() if k != "operators"}
        assert "Jane" not in json.dumps(rest)
    assert tr.snapshot()["order"]["operators"] == [
        {"operator": "Jane Doe", "seconds": 60.0, "good": 3, "scrap": 0}
    ]


# ---------------------------------------------------------------- order lifecycle (device)


def test_order_lifecycle_from_the_device() -> None:
    tr = tracker(progress_step_percent=10, progress_interval=1e9)
    tr.connection(True, T0)
    events = obs(tr, 0, order_id="A-1", target_count=100, good_count=0, scrap_count=0)
    assert [(e.type, dict(e.data)) for e in events] == [
        (
            "order.started",
            {
                "order_id": "A-1",
                "source": "device",
                "target": 100,
                "due": None,
                "good": 0,
                "scrap": 0,
                "started_at": T0,
                **GAP_FREE,
            },
        )
    ]
    # First movement: progress at once.
    assert pick(obs(tr, 10, good_count=3), "good", "percent") == [("order.progress", 3, 3.0)]
    # Below the step: throttled.
    assert obs(tr, 20, good_count=8) == []
    # 13 - 3 = 10 percent points: progress.
    assert pick(obs(tr, 30, good_count=13, scrap_count=1), "good", "scrap", "percent") == [
        ("order.progress", 13, 1, 13.0)
    ]
    obs(tr, 40, good_count=50)
    events = obs(tr, 50, good_count=100, scrap_count=2)
    assert pick(events, "good", "scrap", "reason", "completed_at", "duration_s") == [
        ("order.progress", 100, 2, None, None, None),
        ("order.completed", 100, 2, "target_reached", T0 + 50, 50.0),
    ]
    assert events[1].data["started_at"] == T0 and events[1].data["target"] == 100


def test_order_changed_and_cleared() -> None:
    tr = tracker(progress_interval=1e9, progress_step_percent=50)
    obs(tr, 0, order_id="A", good_count=0)
    obs(tr, 1, good_count=1)  # first progress
    obs(tr, 2, good_count=4)  # throttled (no target: only the interval)
    events = obs(tr, 3, order_id="B", good_count=0)
    assert pick(events, "order_id", "good", "reason") == [
        ("order.progress", "A", 4, None),  # final progress: counts moved since the last one
        ("order.completed", "A", 4, "order_changed"),
        ("order.started", "B", 0, None),
    ]
    events = obs(tr, 4, order_id="")
    assert pick(events, "order_id", "good", "reason") == [
        ("order.completed", "B", 0, "order_cleared")
    ]
    assert tr.snapshot()["order"] is None


def test_no_final_progress_when_nothing_moved() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A", good_count=0)
    obs(tr, 1, good_count=2)
    assert types(obs(tr, 2, order_id="")) == ["order.completed"]


def test_progress_on_interval_via_tick() -> None:
    tr = tracker(progress_interval=30, progress_step_percent=50)
    obs(tr, 0, order_id="A", target_count=1000, good_count=0)
    obs(tr, 1, good_count=1)  # first progress
    obs(tr, 2, good_count=2)
    assert tr.tick(T0 + 30) == []  # 29 s since the last progress
    assert pick(tr.tick(T0 + 31), "good") == [("order.progress", 2)]
    assert tr.tick(T0 + 100) == []  # counts did not move: no progress
    assert pick(obs(tr, 101, good_count=3), "good") == [("order.progress", 3)]


def test_counts_in_the_same_batch_as_a_new_order_belong_to_it() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A", good_count=0)
    obs(tr, 1, good_count=7)
    events = obs(tr, 2, order_id="B", good_count=2)
    assert pick(events, "order_id", "good") == [
        ("order.completed", "A", 7),
        ("order.started", "B", 0),
        ("order.progress", "B", 2),
    ]


def test_gateway_started_mid_order_per_order_counter_counts_what_is_there() -> None:
    tr = tracker(counter_mode="per_order", counter_confirm=2)
    events = obs(tr, 0, order_id="A", good_count=37, target_count=100)
    assert pick(events, "good")[1:] == [("order.started", 0)]
    # More than one poll's worth of pieces: credited once the next reading confirms it (a
    # glitch on the very first reading must not count).
    assert pick(obs(tr, 1, good_count=37), "good") == [("order.progress", 37)]
    small = tracker(counter_mode="per_order")
    events = obs(small, 0, order_id="A", good_count=3, target_count=100)
    assert pick(events, "good")[1:] == [("order.started", 0), ("order.progress", 3)]


def test_lifetime_counter_counts_from_the_order_start() -> None:
    tr = tracker(counter_mode="lifetime")
    assert pick(obs(tr, 0, order_id="A", good_count=50_000), "good")[1:] == [("order.started", 0)]
    assert pick(obs(tr, 1, good_count=50_004), "good") == [("order.progress", 4)]
    events = obs(tr, 2, order_id="B", good_count=50_006)
    assert pick(events, "order_id", "good") == [
        ("order.completed", "A", 4),  # no final progress: 4 was already reported
        ("order.started", "B", 0),
        ("order.progress", "B", 2),
    ]


def test_same_order_id_again_after_a_clear_is_a_new_order() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A")
    obs(tr, 1, order_id="")
    assert types(obs(tr, 2, order_id="A")) == ["order.started"]


def test_order_id_from_register_is_cleaned() -> None:
    tr = tracker()
    events = obs(tr, 0, order_id="A-17\x00\x00  ")
    assert events[-1].data["order_id"] == "A-17"
    assert obs(tr, 1, order_id="A-17") == []
    assert pick(obs(tr, 2, order_id=4711), "order_id")[-1] == ("order.started", "4711")


def test_target_arrives_with_the_order_id_and_updates_later() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A", target_count=10)
    events = obs(tr, 1, order_id="B", target_count=20)
    assert pick(events, "order_id", "target") == [
        ("order.completed", "A", 10),
        ("order.started", "B", 20),
    ]
    obs(tr, 2, target_count=0)  # 0 = unknown: keeps what is known
    assert tr.snapshot()["order"]["target"] == 20
    obs(tr, 3, good_count=0)
    obs(tr, 4, good_count=5)
    # Lowering the target below the count completes the order.
    assert pick(obs(tr, 5, target_count=5), "reason") == [("order.completed", "target_reached")]


def test_overrun_after_target_reached_is_counted_but_no_new_lifecycle() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A", target_count=5, good_count=0)
    assert types(obs(tr, 1, good_count=6)) == ["order.progress", "order.completed"]
    assert obs(tr, 2, good_count=9) == []
    assert obs(tr, 3, order_id="A") == []
    order = tr.snapshot()["order"]
    assert (order["status"], order["good"], order["overrun"]) == ("completed", 6, 3)
    # A new order id starts a new order; the completed one is not completed again.
    assert pick(obs(tr, 4, order_id="B", good_count=0), "order_id") == [("order.started", "B")]
    # Clearing after a completed order: nothing to complete.
    tr2 = tracker()
    obs(tr2, 0, order_id="A", target_count=1, good_count=0)
    obs(tr2, 1, good_count=1)
    assert obs(tr2, 2, order_id="") == []
    assert tr2.snapshot()["order"] is None


def test_complete_on_target_disabled() -> None:
    tr = tracker(complete_on_target=False)
    obs(tr, 0, order_id="A", target_count=5, good_count=0)
    assert pick(obs(tr, 1, good_count=7), "percent") == [("order.progress", 140.0)]


# ---------------------------------------------------------------- counter rules in the tracker


@pytest.mark.parametrize(
    ("settings", "readings", "good"),
    [
        ({}, [0, 5, 5, 5], 5),  # duplicates
        ({}, [0, 15, 15, 2, 4], 19),  # reset mid-order, confirmed by the next read: 15 + 4
        ({}, [0, 15, 15, 0, 3], 18),  # reset to zero
        ({}, [0, 5, 2, 4, 6], 6),  # a drop by a few counts is a glitch: the baseline stands
        ({"counter_wrap": 65536}, [65530, 65535, 3], 65530 + 5 + 4),  # per_order + wrap
        ({"counter_mode": "lifetime", "counter_wrap": 65536}, [65530, 65535, 3], 9),
        ({"counter_mode": "lifetime"}, [1000, 1010, 4, 4], 14),  # lifetime + reset
        ({"counter_mode": "lifetime", "counter_wrap": 100}, [90, 99, 10], 20),
    ],
    ids=[
        "dupes",
        "reset",
        "reset-zero",
        "glitch",
        "wrap-per-order",
        "wrap-lifetime",
        "lifetime",
        "w100",
    ],
)
@pytest.mark.parametrize("confirm", [1, 2])
def test_counter_rules(
    settings: dict[str, Any], readings: list[int], good: int, confirm: int
) -> None:
    tr = tracker(**settings, counter_confirm=confirm)
    obs(tr, 0, order_id="A")
    if settings.get("counter_mode") == "lifetime":
        obs(tr, 0.5, good_count=readings[0])  # the counter is known before counting starts
        readings = readings[1:]
    # Read the last value once more: with two readings to agree, it is credited then.
    for i, value in enumerate([*readings, readings[-1]], start=1):
        obs(tr, i, good_count=value)
    assert tr.snapshot()["order"]["good"] == good


def test_late_counter_sample_is_ignored() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A", good_count=0)
    obs(tr, 10, good_count=10)
    # An older replayed value (e.g. after an OPC UA reconnect) must not look like a reset.
    assert tr.observe(batch(5, good_count=5), T0 + 11) == []
    obs(tr, 12, good_count=11)
    assert tr.snapshot()["order"]["good"] == 11


def test_pieces_made_while_offline_are_counted_on_reconnect() -> None:
    tr = tracker(progress_interval=1e9, progress_step_percent=1)
    obs(tr, 0, state="running", order_id="A", target_count=1000, good_count=0)
    obs(tr, 1, good_count=10)
    tr.connection(False, T0 + 2, "timeout")
    tr.connection(True, T0 + 300, "reconnected")
    events = obs(tr, 300, state="running", good_count=60)
    assert pick(events, "good", "state") == [
        ("order.progress", 60, None),
        ("machine.state.changed", None, "running"),
    ]


def test_scrap_sources() -> None:
    tr = tracker(scrap_source="total_minus_good")
    obs(tr, 0, order_id="A", good_count=0, total_count=0, scrap_count=99)
    obs(tr, 1, good_count=8, total_count=10)
    assert tr.snapshot()["order"]["scrap"] == 2
    obs(tr, 2, good_count=10, total_count=10)  # inconsistent read: scrap never goes back
    assert tr.snapshot()["order"]["scrap"] == 2
    tr = tracker(scrap_source="none")
    obs(tr, 0, order_id="A", good_count=0, scrap_count=0)
    obs(tr, 1, good_count=3, scrap_count=5)
    assert tr.snapshot()["order"]["scrap"] == 0
    tr = tracker()
    obs(tr, 0, order_id="A", good_count=0, scrap_count=0)
    obs(tr, 1, good_count=3, scrap_count=5)
    assert tr.snapshot()["order"]["scrap"] == 5


def test_counts_without_an_order_are_not_attributed() -> None:
    tr = tracker(counter_mode="lifetime")
    obs(tr, 0, good_count=10)
    obs(tr, 1, good_count=20)
    obs(tr, 2, order_id="A")
    obs(tr, 3, good_count=25)
    assert tr.snapshot()["order"]["good"] == 5


# ---------------------------------------------------------------- alarms


def test_alarm_raised_and_cleared() -> None:
    tr = tracker()
    obs(tr, 0, state="running", alarm_code=0)
    events = obs(tr, 10, state="fault", alarm_code=17, alarm_text="Thread break")
    assert [(e.type, dict(e.data)) for e in events] == [
        ("machine.alarm.raised", {"code": 17, "text": "Thread break", "severity": "fault"}),
        (
            "machine.state.changed",
            {
                "state": "fault",
                "previous": "running",
                "previous_duration_s": 10.0,
                "unobserved_s": 0.0,
                "reason": "alarm",
                "order_id": None,
            },
        ),
    ]
    assert tr.snapshot()["alarm"] == {"code": 17, "text": "Thread break"}
    assert obs(tr, 11, alarm_code=17) == []
    events = obs(tr, 40, alarm_code=0, alarm_text="", state="running")
    assert pick(events, "code", "text", "duration_s", "reason") == [
        ("machine.alarm.cleared", 17, "Thread break", 30.0, None),
        ("machine.state.changed", None, None, None, "device"),
    ]
    assert tr.snapshot()["alarm"] is None


def test_alarm_code_change_clears_then_raises_and_warning_severity() -> None:
    tr = tracker()
    obs(tr, 0, state="running", alarm_code=3, alarm_text="Oil low")
    events = obs(tr, 5, alarm_code=4, alarm_text="Door open")
    assert pick(events, "code", "text", "severity") == [
        ("machine.alarm.cleared", 3, "Oil low", None),
        ("machine.alarm.raised", 4, "Door open", "warning"),
    ]
    obs(tr, 6, alarm_text="Door open (rear)")  # same code, better text: no event
    assert tr.snapshot()["alarm"]["text"] == "Door open (rear)"


# ---------------------------------------------------------------- rate, eta, at risk


def test_rate_and_eta_over_the_sliding_window() -> None:
    tr = tracker(rate_window=600, rate_min_span=60, progress_interval=1, progress_step_percent=100)
    obs(tr, 0, order_id="A", target_count=1000, good_count=0)
    first = obs(tr, 30, good_count=30)
    assert first[0].data["rate_per_hour"] is None  # 30 s of history: not enough
    events = obs(tr, 120, good_count=120)  # one piece a second
    assert events[0].data["rate_per_hour"] == 3600.0
    assert events[0].data["eta"] == T0 + 120 + 880.0
    # The machine stops: after the window only the last 600 s count.
    obs(tr, 700, good_count=600)
    events = obs(tr, 1000, good_count=601)
    # good at window start (t=400) was 120 (step function): (601 - 120) / 600 s
    assert events[0].data["rate_per_hour"] == 481 * 6.0


def test_at_risk_and_back_on_track() -> None:
    tr = tracker(order_source="platform", rate_min_span=60, progress_interval=1)
    result, _ = tr.command(AssignOrder("P-1", target=100, due=T0 + 200), T0)
    assert result == CommandResult(True, "started")
    obs(tr, 0, good_count=0)
    events = obs(tr, 60, good_count=10)
    assert pick(events, "order_id", "due", "late_by_s") == [
        ("order.progress", "P-1", T0 + 200, None),
        ("order.at_risk", "P-1", T0 + 200, 400.0),
    ]
    assert events[1].data["eta"] == T0 + 600.0
    assert types(obs(tr, 70, good_count=11)) == ["order.progress"]  # once per crossing
    events = obs(tr, 80, good_count=80)  # 80 in 80 s -> 20 left = 20 s -> eta T0+100
    assert pick(events, "eta") == [
        ("order.progress", T0 + 100.0),
        ("order.back_on_track", T0 + 100.0),
    ]


def test_due_passed_without_eta_is_at_risk() -> None:
    tr = tracker(order_source="platform")
    tr.command(AssignOrder("P-1", target=10, due=T0 + 50), T0)
    assert tr.tick(T0 + 50) == []
    assert pick(tr.tick(T0 + 51), "eta", "late_by_s") == [("order.at_risk", None, 1.0)]
    assert tr.tick(T0 + 52) == []


# ---------------------------------------------------------------- platform orders


def test_assign_rejected_when_orders_come_from_the_device() -> None:
    tr = tracker()
    result, events = tr.command(AssignOrder("P-1", 10), T0)
    assert not result.accepted and "device" in result.reason and events == []
    assert not tr.command(CancelOrder("P-1"), T0)[0].accepted


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        (AssignOrder("", 10), "empty"),
        (AssignOrder("   ", 10), "empty"),
        (AssignOrder("P\n1", 10), "control characters"),
        (AssignOrder("P-2", 0), "between 1 and"),
        (AssignOrder("P-2", -5), "between 1 and"),
        (AssignOrder("P-2", 10_000_001), "between 1 and"),
        (AssignOrder("P-2", True), "integer"),
        (AssignOrder("P-2", 10, due=float("nan")), "due"),
        (AssignOrder("P-2", 10, due=-1.0), "due"),
        (AssignOrder("P-2", 10, customer="x" * 300), "customer"),
        (AssignOrder("P-1", 10), "already running"),
        (CancelOrder("nope"), "unknown order"),
    ],
)
def test_platform_commands_are_validated(cmd: Any, reason: str) -> None:
    tr = tracker(order_source="platform")
    assert tr.command(AssignOrder("P-1", 10), T0)[0].accepted
    result, events = tr.command(cmd, T0 + 1)
    assert not result.accepted and reason in result.reason, result
    assert events == []


def test_platform_queue_runs_orders_one_after_the_other() -> None:
    tr = tracker(order_source="platform")
    obs(tr, 0, good_count=500, order_id="ignored-in-platform-mode")
    result, events = tr.command(AssignOrder("P-1", 3, due=T0 + 3600, customer="ACME"), T0 + 1)
    assert result == CommandResult(True, "started")
    assert [(e.type, dict(e.data)) for e in events] == [
        (
            "order.started",
            {
                "order_id": "P-1",
                "source": "platform",
                "target": 3,
                "due": T0 + 3600,
                "good": 0,
                "scrap": 0,
                "started_at": T0 + 1,
                **GAP_FREE,
            },
        )
    ]
    assert tr.command(AssignOrder("P-2", 2), T0 + 2)[0] == CommandResult(
        True, "queued at position 1"
    )
    assert not tr.command(AssignOrder("P-2", 2), T0 + 2)[0].accepted  # duplicate id
    # The platform order counts from the counter value at its start, whatever counter_mode.
    events = obs(tr, 10, good_count=503)
    assert pick(events, "order_id", "good", "reason") == [
        ("order.progress", "P-1", 3, None),
        ("order.completed", "P-1", 3, "target_reached"),
        ("order.started", "P-2", 0, None),
    ]
    assert tr.snapshot()["queued"] == 0
    assert not tr.command(AssignOrder("P-1", 3), T0 + 11)[0].accepted  # already ran


def test_cancel_queued_and_running_orders() -> None:
    tr = tracker(order_source="platform")
    tr.command(AssignOrder("P-1", 10), T0)
    tr.command(AssignOrder("P-2", 10), T0)
    tr.command(AssignOrder("P-3", 10), T0)
    assert tr.command(CancelOrder("P-2"), T0 + 1) == (CommandResult(True, "removed from queue"), [])
    obs(tr, 2, good_count=0)
    obs(tr, 3, good_count=4)
    result, events = tr.command(CancelOrder("P-1"), T0 + 5)
    assert result == CommandResult(True, "cancelled")
    assert pick(events, "order_id", "reason", "good") == [
        ("order.completed", "P-1", "cancelled", 4),
        ("order.started", "P-3", None, 0),
    ]


def test_a_withdrawn_order_id_stays_in_use_across_platforms_and_restarts() -> None:
    # acme queues ACME-3 behind a running order and withdraws it; zeta then tries the same
    # id on that machine. Accepting it would hand zeta an order named like acme's, and
    # zeta would receive its events: the id stays in use, as for an order that ran, and
    # the refusal is the neutral one every clash gets.
    settings = TrackerSettings(order_source="platform")
    tr = MachineTracker(M, settings)

    def assign(order_id: str, customer: str, origin: str) -> CommandResult:
        cmd = AssignOrder(order_id, 5, customer=customer, origin=origin, private=True)
        return tr.command(cmd, T0 + 1)[0]

    assert assign("ACME-1", "acme", "acme") == CommandResult(True, "started")
    assert assign("ACME-3", "acme", "acme") == CommandResult(True, "queued")
    withdrawn = tr.command(CancelOrder("ACME-3", origin="acme"), T0 + 2)
    assert withdrawn == (CommandResult(True, "removed from queue"), [])
    assert assign("ACME-3", "zeta", "zeta") == CommandResult(False, ORDER_ID_TAKEN)
    # Also after a restart: the tracker state is what a restarted gateway knows.
    saved = json.loads(json.dumps(tr.export_state()))
    tr = MachineTracker.restore(M, settings, saved, downtime=False)
    assert assign("ACME-3", "zeta", "zeta") == CommandResult(False, ORDER_ID_TAKEN)
    # Without a private answer the platform is told why.
    again = tr.command(AssignOrder("ACME-3", 5), T0 + 3)[0]
    assert again == CommandResult(False, "order ACME-3 was withdrawn from this machine")


def test_duplicate_command_id_is_idempotent() -> None:
    tr = tracker(order_source="platform")
    first = tr.command(AssignOrder("P-1", 10, command_id="c-1"), T0)
    again = tr.command(AssignOrder("P-1", 10, command_id="c-1"), T0 + 1)
    assert first[0].accepted and again[0].accepted
    assert again[0].reason.startswith("duplicate command") and again[1] == []


def test_device_then_platform_policy() -> None:
    tr = tracker(order_source="device_then_platform")
    tr.connection(True, T0)
    # No device order: the platform queue runs.
    assert tr.command(AssignOrder("P-1", 100), T0)[0].reason == "started"
    tr.command(AssignOrder("P-2", 50, due=T0 + 999), T0)
    # The operator scans a device order: it wins and the platform order is replaced.
    events = obs(tr, 1, order_id="D-9", good_count=0)
    assert pick(events, "order_id", "reason", "source") == [
        ("order.completed", "P-1", "replaced", None),
        ("order.started", "D-9", None, "device"),
    ]
    # Device clears: the next queued platform order starts.
    events = obs(tr, 2, order_id="")
    assert pick(events, "order_id", "reason", "source") == [
        ("order.completed", "D-9", "order_cleared", None),
        ("order.started", "P-2", None, "platform"),
    ]
    # Scanning the running platform order confirms it: no change.
    assert obs(tr, 3, order_id="P-2") == []
    # Scanning a queued platform order adopts its target and due time.
    tr.command(AssignOrder("P-3", 70, due=T0 + 5000), T0 + 4)
    events = obs(tr, 5, order_id="P-3")
    assert pick(events, "order_id", "reason", "target", "due") == [
        ("order.completed", "P-2", "replaced", 50, None),
        ("order.started", "P-3", None, 70, T0 + 5000),
    ]
    # The device order cannot be cancelled from the platform.
    result, _ = tr.command(CancelOrder("P-3"), T0 + 6)
    assert not result.accepted and "device" in result.reason


# ---------------------------------------------------------------- sequence, snapshot, persistence


def test_sequence_strictly_increases_and_snapshot_shape() -> None:
    tr = tracker()
    events = obs(tr, 0, state="running", order_id="A", target_count=10, good_count=0)
    events += obs(tr, 60, good_count=2)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert tr.sequence == len(events)
    snap = tr.snapshot()
    json.dumps(snap)
    assert snap == {
        "machine": M,
        "state": "running",
        "state_since": T0,
        "connected": True,
        "order": {
            "order_id": "A",
            "source": "device",
            "status": "running",
            "good": 2,
            "scrap": 0,
            "target": 10,
            "percent": 20.0,
            "rate_per_hour": 120.0,
            "eta": T0 + 60 + 240.0,
            "due": None,
            "started_at": T0,
            "completed_at": None,
            "overrun": 0,
        },
        "queued": 0,
        "alarm": None,
        "sequence": tr.sequence,
        "updated_at": T0 + 60,
    }


def test_export_and_restore_continue_where_they_left_off() -> None:
    settings = TrackerSettings(order_source="platform")
    tr = MachineTracker(M, settings)
    tr.command(AssignOrder("P-1", 10, due=T0 + 100, command_id="c-1"), T0)
    tr.command(AssignOrder("P-2", 10), T0)
    obs(tr, 0, state="running", good_count=0, alarm_code=5, alarm_text="x")
    obs(tr, 1, good_count=4)
    saved = json.loads(json.dumps(tr.export_state()))
    back = MachineTracker.restore(M, settings, saved, downtime=False)
    assert back.snapshot() == tr.snapshot()
    assert back.export_state() == tr.export_state()
    later_a = obs(tr, 2, good_count=12) + tr.tick(T0 + 200)
    later_b = obs(back, 2, good_count=12) + back.tick(T0 + 200)
    assert later_a == later_b
    assert later_a[0].sequence == saved["sequence"] + 1
    assert back.command(AssignOrder("P-1", 10, command_id="c-1"), T0)[0].accepted


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"version": 99},
        {"version": 1},
        {"version": 1, "machine": M, "sequence": "x"},
        {"version": 1, "machine": "other"},
        "not a dict",
    ],
)
def test_restore_rejects_malformed_state(state: Any) -> None:
    with pytest.raises(ValueError, match="tracker state"):
        MachineTracker.restore(M, TrackerSettings(), state)


def test_restore_rejects_a_broken_order() -> None:
    tr = tracker()
    obs(tr, 0, order_id="A")
    saved = tr.export_state()
    saved["order"]["unexpected"] = 1
    with pytest.raises(ValueError, match="malformed"):
        MachineTracker.restore(M, TrackerSettings(), saved)


# ---------------------------------------------------------------- golden scenarios

CASES = Path(__file__).parent.parent / "cases"


def _frozen(value: Any) -> Any:
    """YAML lists as the tuples TrackerSettings holds."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def run_case(folder: Path) -> list[dict[str, Any]]:
    """Replay ``samples.jsonl`` of a golden case; return its events as JSON-ready dicts."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    settings = TrackerSettings(**{k: _frozen(v) for k, v in cfg.items()})
    tr = MachineTracker(M, settings)
    events: list[Event] = []
    for line in (folder / "samples.jsonl").read_text().splitlines():
        step = json.loads(line)
        now = step["now"]
        if "connection" in step:
            events += tr.connection(step["connection"], now, step.get("reason", ""))
        elif step.get("tick"):
            events += tr.tick(now)
        elif step.get("restart"):
            # The gateway stops and starts again from its saved state (JSON, as on disk).
            saved = json.loads(json.dumps(tr.export_state()))
            tr = MachineTracker.restore(M, settings, saved)
        else:
            when = now + step.get("source_offset", 0.0)
            pairs = step["samples"]
            # A list of [signal, value] pairs holds several readings of one signal in a batch.
            items = pairs if isinstance(pairs, list) else list(pairs.items())
            samples = [Sample(M, k, v, when) for k, v in items]
            events += tr.observe(samples, now)
    return [
        {"type": e.type, "sequence": e.sequence, "time": e.time, "data": dict(e.data)}
        for e in events
    ]


@pytest.mark.parametrize(
    "folder", sorted(p for p in CASES.iterdir() if p.is_dir()), ids=lambda p: p.name
)
def test_golden_case(folder: Path) -> None:
    expected = [
        json.loads(line) for line in (folder / "expected_events.jsonl").read_text().splitlines()
    ]
    assert run_case(folder) == expected


def test_an_implausible_counter_jump_rebases_instead_of_counting() -> None:
    # A lifetime counter read 4.4 million higher than a moment ago: a replaced controller or
    # a restored backup, not production. The order keeps its real count and the jump is
    # reported for the shell to log.
    settings = TrackerSettings(counter_mode="lifetime", max_counter_jump=10_000)
    t = MachineTracker("m", settings)

    def batch(good: int, at: float) -> list[Sample]:
        return [
            Sample("m", "order_id", "PO-1", at),
            Sample("m", "state", "running", at),
            Sample("m", "good_count", good, at),
        ]

    t.observe(batch(100, 1.0), 1.0)
    t.observe(batch(105, 2.0), 2.0)
    t.observe(batch(4_465_244, 3.0), 3.0)
    t.observe(batch(4_465_247, 4.0), 4.0)
    t.observe(batch(4_465_247, 5.0), 5.0)  # credited once two readings agree
    assert t.snapshot()["order"]["good"] == 8
    (rejection,) = t.drain_rejections()
    assert rejection.signal == "good_count" and "max_counter_jump" in rejection.reason
    with pytest.raises(ValueError, match="max_counter_jump"):
        TrackerSettings(max_counter_jump=0)
