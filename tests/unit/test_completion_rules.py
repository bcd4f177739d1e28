"""Completion rules per profile: good_reached, total_reached, device_ended, order_changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.loader import ConfigError, load_config
from gateway.core.model import Event, Sample
from gateway.core.tracker import MachineTracker, TrackerSettings

M = "cnc-01"
T0 = 1_700_000_000.0
UMATI = {
    "scrap_source": "total_minus_good",
    "complete_when": ("total_reached", "device_ended", "order_changed"),
    "rate_min_span": 0.0,
}


def feed(tr: MachineTracker, t: float, **values: Any) -> list[Event]:
    return tr.observe([Sample(M, k, v, T0 + t) for k, v in values.items()], T0 + t)


def completed(events: list[Event]) -> dict[str, Any] | None:
    done = [e for e in events if e.type == "order.completed"]
    return dict(done[0].data) if done else None


def test_a_job_with_scrap_completes_when_its_runs_are_done() -> None:
    # OPC 40501: RunsPlanned counts every run, good and scrap.
    tr = MachineTracker(M, TrackerSettings(**UMATI))
    feed(tr, 0, order_id="J-1", target_count=10, good_count=0, total_count=0)
    events: list[Event] = []
    for i in range(1, 12):
        runs = min(i, 10)  # the last run read twice: a count is credited once agreed
        scrap = runs // 5  # every fifth run is scrap
        events += feed(tr, i, good_count=runs - scrap, total_count=runs)
    done = completed(events)
    assert done is not None and done["completed_at"] == T0 + 11
    assert (done["reason"], done["rule"]) == ("target_reached", "total_reached")
    assert (done["good"], done["scrap"], done["target"]) == (8, 2, 10)
    progress = [e.data for e in events if e.type == "order.progress"]
    assert progress[-1]["percent"] == 100.0  # on the target's basis: all runs done


def test_percent_and_eta_use_the_target_basis() -> None:
    tr = MachineTracker(M, TrackerSettings(**UMATI, progress_step_percent=1.0))
    feed(tr, 0, order_id="J-1", target_count=10, good_count=0, total_count=0)
    feed(tr, 30, good_count=3, total_count=5)
    events = feed(tr, 60, good_count=3, total_count=5)  # agreed: credited now
    (progress,) = [e.data for e in events if e.type == "order.progress"]
    assert progress["percent"] == 50.0
    # 5 runs in 60 s: the other 5 take 60 s more.
    assert progress["eta"] == T0 + 120


def test_device_ended_completes_the_order() -> None:
    tr = MachineTracker(M, TrackerSettings(**UMATI))
    feed(tr, 0, order_id="J-1", target_count=0, good_count=0, total_count=0, order_ended=False)
    feed(tr, 1, good_count=3, total_count=4)
    done = completed(feed(tr, 2, order_ended=True))
    assert done is not None
    assert (done["reason"], done["rule"], done["good"], done["scrap"]) == (
        "device_ended",
        "device_ended",
        3,
        1,
    )


def test_a_stale_ended_state_does_not_end_the_next_job() -> None:
    tr = MachineTracker(M, TrackerSettings(**UMATI))
    feed(tr, 0, order_id="J-1", good_count=0, total_count=0, order_ended=False)
    feed(tr, 1, order_ended=True)
    # The next job id arrives before its job state does: still "Ended" from J-1.
    events = feed(tr, 2, order_id="J-2", good_count=0, total_count=0)
    assert [e.data["order_id"] for e in events if e.type == "order.started"] == ["J-2"]
    assert tr.snapshot()["order"]["status"] == "running"


def test_good_reached_is_the_default_and_named() -> None:
    tr = MachineTracker(M, TrackerSettings())
    feed(tr, 0, order_id="A", target_count=2, good_count=0)
    done = completed(feed(tr, 1, good_count=2) + feed(tr, 1.5, good_count=2))
    assert done is not None and (done["reason"], done["rule"]) == ("target_reached", "good_reached")
    changed = completed(feed(tr, 2, order_id="B") + feed(tr, 3, order_id="C"))
    assert changed is not None and (changed["reason"], changed["rule"]) == (
        "order_changed",
        "order_changed",
    )


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (("good_reached", "sometimes", "order_changed"), "unknown"),
        (("good_reached",), "order_changed"),
        (("good_reached", "total_reached", "order_changed"), "one basis"),
    ],
)
def test_completion_rules_are_validated(rules: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrackerSettings(complete_when=rules)  # type: ignore[arg-type]


def _config(tmp_path: Path, tracker: str, profile: str = "machine-tool-umati") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: 127.0.0.1}\n"
        "machines:\n"
        "  - id: cnc-01\n"
        "    area: a\n"
        "    line: l\n"
        f"    profile: {profile}\n"
        "    connection: {protocol: opcua, url: 'opc.tcp://127.0.0.1:4840/'}\n"
        f"    tracker: {tracker}\n"
    )
    return cfg


def test_the_umati_profile_completes_as_opc_40501_means(tmp_path: Path) -> None:
    (machine,) = load_config(_config(tmp_path, "{}"), env={}).machines
    assert machine.tracker.completion == ("total_reached", "device_ended", "order_changed")
    assert "order_ended" in machine.signals


@pytest.mark.parametrize(
    ("tracker", "message"),
    [
        ("{complete_when: [good_reached]}", "order_changed"),
        ("{complete_when: [good_reached, total_reached, order_changed]}", "one basis"),
        ("{complete_when: [when_done, order_changed]}", "complete_when"),
    ],
)
def test_completion_rules_in_the_config_are_validated(
    tmp_path: Path, tracker: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, tracker), env={})
