"""Honest gaps: order events say whether the gateway saw the whole order."""

from __future__ import annotations

import json
from typing import Any

from gateway.core.model import Event, Sample
from gateway.core.tracker import MachineTracker, TrackerSettings

M = "sew-01"
T0 = 1_700_000_000.0


def feed(tr: MachineTracker, t: float, **values: Any) -> list[Event]:
    return tr.observe([Sample(M, k, v, T0 + t) for k, v in values.items()], T0 + t)


def of(events: list[Event], kind: str) -> dict[str, Any]:
    (event,) = [e for e in events if e.type == kind]
    return dict(event.data)


def gap(data: dict[str, Any]) -> tuple[Any, ...]:
    return (data["gap_free"], data["unobserved_s"], data["gap_started_at"], data["gap_ended_at"])


def test_an_order_observed_throughout_is_gap_free() -> None:
    tr = MachineTracker(M, TrackerSettings())
    started = of(feed(tr, 0, order_id="A", target_count=5, good_count=0), "order.started")
    assert gap(started) == (True, 0.0, None, None)
    feed(tr, 1, good_count=5)  # credited once the next reading agrees
    done = of(feed(tr, 2, good_count=5), "order.completed")
    assert gap(done) == (True, 0.0, None, None)


def test_an_order_across_an_unreachable_device_says_so() -> None:
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, order_id="A", target_count=20, good_count=0)
    feed(tr, 10, good_count=7)  # last data before the link drops
    tr.connection(False, T0 + 15, "timeout")
    tr.connection(True, T0 + 70, "reconnected")
    events = feed(tr, 71, good_count=14)
    assert gap(of(events, "order.progress")) == (False, 61.0, T0 + 10, T0 + 71)
    feed(tr, 72, good_count=20)
    done = of(feed(tr, 73, good_count=20), "order.completed")
    assert gap(done) == (False, 61.0, T0 + 10, T0 + 71)


def test_a_restored_tracker_reports_the_gateway_downtime() -> None:
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, order_id="A", target_count=20, good_count=0)
    feed(tr, 5, good_count=3)
    saved = json.loads(json.dumps(tr.export_state()))
    back = MachineTracker.restore(M, TrackerSettings(), saved)
    feed(back, 300, good_count=20)
    done = of(feed(back, 301, good_count=20), "order.completed")
    assert gap(done) == (False, 295.0, T0 + 5, T0 + 300)


def test_a_restore_without_downtime_is_no_gap() -> None:
    # The shell rebuilds the tracker on a config reload: the next poll follows at once.
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, order_id="A", target_count=20, good_count=0)
    back = MachineTracker.restore(M, TrackerSettings(), tr.export_state())
    feed(back, 1, good_count=20)
    assert gap(of(feed(back, 2, good_count=20), "order.completed"))[0] is True
    # Rebuilt in a running gateway: no gap, however long the next poll takes.
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, order_id="A", target_count=20, good_count=0)
    back = MachineTracker.restore(M, TrackerSettings(), tr.export_state(), downtime=False)
    feed(back, 60, good_count=20)
    assert gap(of(feed(back, 61, good_count=20), "order.completed"))[0] is True


def test_an_order_first_seen_after_a_gap_started_in_it() -> None:
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, order_id="A", good_count=0)
    tr.connection(False, T0 + 5, "timeout")
    events = feed(tr, 60, order_id="B", good_count=3)
    assert gap(of(events, "order.completed")) == (False, 60.0, T0, T0 + 60)
    assert gap(of(events, "order.started")) == (False, 60.0, T0, T0 + 60)


def test_an_alarm_across_a_gap_counts_only_what_was_seen() -> None:
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, state="running", alarm_code=0)
    feed(tr, 100.0, state="fault", alarm_code=17)
    feed(tr, 102.0, state="fault", alarm_code=17)  # last data before the link drops
    tr.connection(False, T0 + 104.0, "timeout")
    cleared = of(feed(tr, 107.55, state="running", alarm_code=0), "machine.alarm.cleared")
    assert (cleared["duration_s"], cleared["unobserved_s"]) == (2.0, 5.55)
