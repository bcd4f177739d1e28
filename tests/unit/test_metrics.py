"""Metrics: Prometheus output, readiness rules, status summary, backlog ages."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway.config.loader import load_config
from gateway.core.model import Sample
from gateway.delivery.sendqueue import BacklogClock
from gateway.runtime.gateway import Gateway
from gateway.runtime.metrics import (
    DestinationView,
    Histogram,
    Metrics,
    destination_ok,
    evaluate_health,
    histogram_quantile,
)


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def make(clock: Clock | None = None) -> Metrics:
    return Metrics(gateway_id="gw-1", started_at=900.0, version="1.2.3", clock=clock or Clock())


def test_device_metrics_follow_polls_errors_and_connection() -> None:
    clock = Clock(1_000.0)
    m = make(clock)
    m.configure(["sew-01", "sew-02"])
    m.device_connected("sew-01", True)
    m.device_polled("sew-01", True, at=995.0)
    m.device_polled("sew-01", True)  # at the clock's now
    m.device_polled("sew-02", False)
    m.device_polled("sew-02", False)
    clock.now = 1_004.0
    s = samples(m)
    one, two = (("machine", "sew-01"),), (("machine", "sew-02"),)
    assert s[("shopfloor_device_connected", one)] == 1
    assert s[("shopfloor_device_connected", two)] == 0
    assert s[("shopfloor_device_polls_total", one)] == 2
    assert s[("shopfloor_device_read_errors_total", two)] == 2
    assert s[("shopfloor_device_last_sample_age_seconds", one)] == 4.0
    # No sample yet: no age rather than a made-up one.
    assert ("shopfloor_device_last_sample_age_seconds", two) not in s


def test_polls_and_subscription_notifications_are_counted_apart() -> None:
    m = make()
    m.configure(["cnc-01"])
    m.device_polled("cnc-01", True)  # the full Read after connecting
    for _ in range(3):
        m.device_polled("cnc-01", True, notification=True)
    s = samples(m)
    one = (("machine", "cnc-01"),)
    assert s[("shopfloor_device_polls_total", one)] == 1
    assert s[("shopfloor_device_notifications_total", one)] == 3


def test_poll_duration_and_missed_deadlines() -> None:
    m = make()
    m.configure(["sew-01"])
    m.device_poll_timing("sew-01", 0.004, 0)
    m.device_poll_timing("sew-01", 0.3, 2)
    m.device_poll_timing("sew-01", None, 2)  # a notification: no duration, nothing new
    m.device_poll_timing("sew-01", 0.02, 5)
    # A reload gives the machine a new adapter, whose count starts again at 0.
    m.device_poll_timing("sew-01", 0.02, 1)
    s = samples(m)
    one = (("machine", "sew-01"),)
    assert s[("shopfloor_device_missed_deadlines_total", one)] == 6
    assert s[("shopfloor_device_poll_duration_seconds_count", one)] == 4
    assert s[("shopfloor_device_poll_duration_seconds_sum", one)] == pytest.approx(0.344)
    le = (("le", "0.005"), ("machine", "sew-01"))
    assert s[("shopfloor_device_poll_duration_seconds_bucket", le)] == 1
    assert s[("shopfloor_device_poll_duration_seconds_bucket", (("le", "+Inf"), *one))] == 4


def test_gateway_identity_events_and_process_memory() -> None:
    m = make()
    m.event_emitted("order.started")
    m.event_emitted("order.progress", 3)
    s = samples(m)
    assert s[("shopfloor_gateway_info", (("gateway_id", "gw-1"), ("version", "1.2.3")))] == 1
    assert s[("shopfloor_gateway_start_time_seconds", ())] == 900.0
    assert s[("shopfloor_events_total", (("type", "order.progress"),))] == 3
    assert s[("shopfloor_events_total", (("type", "order.started"),))] == 1
    assert s[("process_resident_memory_bytes", ())] > 1_000_000


def test_outbox_drops_are_counted_under_the_one_class_it_drops() -> None:
    m = make()
    m.outbox_dropped(7)
    dropped = {k: v for k, v in samples(m).items() if k[0] == "shopfloor_outbox_dropped_total"}
    # The name and its class label stay for dashboards; superseded progress is all it drops.
    assert dropped == {("shopfloor_outbox_dropped_total", (("class", "progress"),)): 7}


def test_destination_metrics_and_publish_totals() -> None:
    m = make()
    m.destination_state(
        "default", connected=True, backlog=12, oldest_age=3.5, published_total=40, dropped_total=2
    )
    m.published("default", 5)
    s = samples(m)
    d = (("destination", "default"),)
    assert s[("shopfloor_destination_connected", d)] == 1
    assert s[("shopfloor_destination_backlog_messages", d)] == 12
    assert not [k for k in s if k[0] == "shopfloor_destination_backlog"]
    assert s[("shopfloor_destination_oldest_pending_age_seconds", d)] == 3.5
    assert s[("shopfloor_destination_published_total", d)] == 45
    assert s[("shopfloor_destination_dropped_total", d)] == 2
    # A later report without totals keeps the counts.
    m.destination_state("default", connected=False, backlog=0, oldest_age=float("nan"))
    s = samples(m)
    assert s[("shopfloor_destination_published_total", d)] == 45
    assert s[("shopfloor_destination_oldest_pending_age_seconds", d)] == 0


def test_reload_forgets_removed_machines() -> None:
    m = make()
    m.configure(["a", "b"])
    m.device_connected("a", True)
    m.configure(["a", "c"])
    names = {labels for (name, labels) in samples(m) if name == "shopfloor_device_connected"}
    assert names == {(("machine", "a"),), (("machine", "c"),)}
    assert samples(m)[("shopfloor_device_connected", (("machine", "a"),))] == 1


def test_two_gateways_in_one_process_do_not_share_numbers() -> None:
    a, b = make(), make()
    a.event_emitted("order.started")
    assert ("shopfloor_events_total", (("type", "order.started"),)) not in samples(b)


def test_summary_and_status_line() -> None:
    clock = Clock(1_000.0)
    m = make(clock)
    m.configure(["a", "b", "c"])
    m.device_connected("a", True)
    m.device_connected("b", True)
    m.destination_state("default", connected=True, backlog=4)
    m.destination_state("influxdb", connected=False, backlog=6, required=False)
    assert m.summary() == {
        "version": "1.2.3",
        "uptime_s": 100.0,
        "devices_online": 2,
        "devices_total": 3,
        "backlog": 10,
    }
    assert m.status_line() == "2/3 devices online, backlog 10; default up, influxdb down"


D = DestinationView


@pytest.mark.parametrize(
    ("dest", "ok"),
    [
        (D("m", connected=True, backlog=10**6, limit=10), True),
        (D("m", connected=False, backlog=0, limit=100), True),
        (D("m", connected=False, backlog=89, limit=100), True),
        (D("m", connected=False, backlog=90, limit=100), False),
        (D("m", connected=False, backlog=10**6, limit=None), True),
        (D("m", connected=False, backlog=1, oldest_age=601.0), False),
        (D("m", connected=False, backlog=1, oldest_age=599.0), True),
    ],
)
def test_destination_is_usable_when_connected_or_buffering_within_limits(
    dest: DestinationView, ok: bool
) -> None:
    assert destination_ok(dest, max_fill=0.9, max_age=600.0)[0] is ok


def test_health_needs_config_outbox_and_one_usable_destination() -> None:
    full = D("a", connected=False, backlog=100, limit=100)
    up = D("b", connected=True)
    ok = evaluate_health(config_loaded=True, outbox_writable=True, destinations=[full, up])
    assert ok.ready
    # One broker down and full, another up: still ready, but the problem is named.
    assert ok.problems == ("a: disconnected and backlog 100 near its limit 100",)

    assert not evaluate_health(config_loaded=False, outbox_writable=True, destinations=[up]).ready
    assert not evaluate_health(config_loaded=True, outbox_writable=False, destinations=[up]).ready
    report = evaluate_health(config_loaded=True, outbox_writable=True, destinations=[full])
    assert not report.ready
    assert report.checks == {"config": True, "outbox": True, "tasks": True, "destinations": False}
    none = evaluate_health(config_loaded=True, outbox_writable=True, destinations=[])
    assert not none.ready and none.problems == ("no destination configured",)


def test_optional_sinks_do_not_decide_readiness() -> None:
    sink = D("influxdb", connected=True, required=False)
    report = evaluate_health(config_loaded=True, outbox_writable=True, destinations=[sink])
    assert not report.ready


def test_metrics_health_and_ready_gauge() -> None:
    m = make()
    assert not m.health().ready  # no config yet
    m.configure(["a"])
    m.destination_state("default", connected=False, backlog=0, limit=1000)
    assert m.health().ready
    assert samples(m)[("shopfloor_gateway_ready", ())] == 1
    m.set_outbox_writable(False)
    assert m.health().as_json() == {
        "status": "unavailable",
        "checks": {"config": True, "outbox": False, "tasks": True, "destinations": True},
        "problems": ["outbox not writable"],
    }
    assert samples(m)[("shopfloor_gateway_ready", ())] == 0


def test_backlog_clock_tells_the_age_of_the_oldest_pending_key() -> None:
    c = BacklogClock(resolution=1.0)
    assert c.oldest_age(None, 100.0) is None
    c.note(3, 100.0)  # keys 1..3 pushed at 100
    c.note(5, 100.5)  # same mark: within the resolution
    c.note(9, 110.0)  # keys 6..9 at 110
    assert c.oldest_age(1, 120.0) == 20.0
    assert c.oldest_age(5, 120.0) == 20.0
    assert c.oldest_age(6, 120.0) == 10.0  # keys up to 5 acknowledged
    assert c.oldest_age(1, 120.0) == 10.0  # history is not kept for acknowledged keys
    c.note(9, 130.0)  # nothing new pushed
    assert c.oldest_age(9, 130.0) == 20.0
    assert c.oldest_age(None, 130.0) is None


def test_backlog_clock_memory_is_bounded() -> None:
    c = BacklogClock(resolution=0.0, max_marks=10)
    for key in range(1, 1001):
        c.note(key, float(key))
    # The oldest marks were shed: the answer is the oldest remembered one.
    assert c.oldest_age(1, 1000.0) == 9.0


async def test_task_count_is_exported_on_the_event_loop() -> None:
    m = make()
    before = samples(m)[("shopfloor_asyncio_tasks", ())]
    stop = asyncio.Event()
    extra = [asyncio.create_task(stop.wait()) for _ in range(3)]
    assert samples(m)[("shopfloor_asyncio_tasks", ())] == before + 3
    stop.set()
    await asyncio.gather(*extra)
    assert samples(m)[("shopfloor_asyncio_tasks", ())] == before


def test_task_count_is_left_out_without_an_event_loop() -> None:
    assert ("shopfloor_asyncio_tasks", ()) not in samples(make())


def test_histogram_counts_per_bucket_and_renders_cumulatively() -> None:
    m = make()
    hist = m.delivery("plant")
    for seconds in (0.0004, 0.0021, 0.0021, 0.004, 0.012, 45.0, 7200.0, -0.5):
        hist.observe(seconds)
    got = samples(m)
    bucket = "shopfloor_event_delivery_seconds_bucket"

    def le(bound: str) -> float:
        return got[(bucket, (("destination", "plant"), ("le", bound)))]

    # -0.5 (a clock step back) counts as 0; 7200 s is beyond the last bound.
    assert le("0.001") == 2
    assert le("0.002") == 2
    assert le("0.003") == 4
    assert le("0.005") == 5
    assert le("0.015") == 6
    assert le("60.0") == 7
    assert le("3600.0") == 7
    assert le("+Inf") == 8
    assert got[("shopfloor_event_delivery_seconds_count", (("destination", "plant"),))] == 8
    assert got[
        ("shopfloor_event_delivery_seconds_sum", (("destination", "plant"),))
    ] == pytest.approx(0.0004 + 0.0042 + 0.004 + 0.012 + 45.0 + 7200.0)


def test_a_destination_removed_by_a_reload_loses_its_histogram() -> None:
    m = make()
    m.delivery("gone").observe(0.001)
    m.forget_destination("gone")
    assert not [k for k in samples(m) if ("destination", "gone") in k[1]]


def test_histogram_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increase"):
        Histogram((0.1, 0.05))


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # 100 observations: 50 up to 1 ms, 40 more up to 2 ms, 10 more up to 5 ms.
        (0.5, [(0.001, 50), (0.002, 90), (0.005, 100), (math.inf, 100)], 0.001),
        (0.7, [(0.001, 50), (0.002, 90), (0.005, 100), (math.inf, 100)], 0.0015),
        (0.99, [(0.001, 50), (0.002, 90), (0.005, 100), (math.inf, 100)], 0.0047),
        # In the +Inf bucket: the highest finite bound.
        (0.99, [(0.001, 50), (math.inf, 100)], 0.001),
        # Nothing observed.
        (0.5, [(0.001, 0), (math.inf, 0)], None),
        (0.5, [], None),
    ],
)
def test_histogram_quantile_interpolates_like_prometheus(
    q: float, buckets: list[tuple[float, float]], expected: float | None
) -> None:
    got = histogram_quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_a_connected_destination_that_acknowledges_nothing_is_not_usable() -> None:
    now = [1000.0]
    m = Metrics(gateway_id="gw", started_at=0.0, clock=lambda: now[0], max_pending_age=60)
    m.configure(["a"])
    m.destination_state("mqtt", connected=True, backlog=5, oldest_age=1.0, published_total=10)
    assert m.health().ready
    # 61 s later, still connected, nothing more acknowledged, the oldest event 61 s old.
    now[0] += 61
    m.destination_state("mqtt", connected=True, backlog=50, oldest_age=61.0, published_total=10)
    report = m.health()
    assert not report.ready
    assert "connected but nothing acknowledged" in report.problems[0]
    # Draining an old backlog is progress: ready again.
    now[0] += 1
    m.destination_state("mqtt", connected=True, backlog=40, oldest_age=62.0, published_total=20)
    assert m.health().ready


def test_an_ended_core_task_or_a_stalled_loop_makes_the_gateway_unready() -> None:
    m = Metrics(gateway_id="gw", started_at=0.0, clock=lambda: 0.0)
    m.configure(["a"])
    m.destination_state("mqtt", connected=True, backlog=0)
    assert m.health().ready
    m.dead_tasks = lambda: ["commands[default]"]
    report = m.health()
    assert not report.ready and report.checks["tasks"] is False
    assert report.problems == ("task commands[default] has ended",)
    m.dead_tasks = tuple
    m.loop_stalled = lambda: True
    assert m.health().problems == ("the event loop is stalled",)
    assert b"shopfloor_event_loop_lag_seconds" in m.render()


def test_rejected_counter_readings_are_counted_per_machine() -> None:
    m = make()
    m.configure(["box-01", "box-02"])
    m.counter_readings_rejected("box-01", 2)
    m.counter_readings_rejected("box-01", 3)
    s = samples(m)
    one, two = (("machine", "box-01"),), (("machine", "box-02"),)
    assert s[("shopfloor_device_rejected_readings_total", one)] == 3
    assert s[("shopfloor_device_rejected_readings_total", two)] == 0
    # A tracker rebuilt by a reload counts from 0 again: its count adds on.
    m.counter_readings_rejected("box-01", 1)
    assert samples(m)[("shopfloor_device_rejected_readings_total", one)] == 4


async def test_the_gateway_counts_glitches_of_its_machines(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "destinations:\n  - {name: mes, host: 127.0.0.1, port: 1883}\n"
        "machines:\n"
        "  - id: sew-01\n    area: sewing\n    line: line-1\n    profile: sewing-station\n"
        "    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}\n"
    )
    clock = Clock(1_700_000_000.0)
    gateway = Gateway(load_config(p, env={}), clock=clock)
    try:
        m = gateway.machines["sew-01"]
        for good in (100, 101, 99, 102, 5_000_000, 103):  # a drop and a spike
            clock.now += 1
            batch = [
                Sample("sew-01", "order_id", "PO-1", clock.now),
                Sample("sew-01", "good_count", good, clock.now),
            ]
            gateway.devices.on_batch(m, batch)
        one = (("machine", "sew-01"),)
        assert samples(gateway.metrics)[("shopfloor_device_rejected_readings_total", one)] == 2
    finally:
        await gateway.outbox.close()


async def test_rejected_counter_readings_are_logged_once_per_episode(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "destinations:\n  - {name: mes, host: 127.0.0.1, port: 1883}\n"
        "machines:\n"
        "  - id: sew-01\n    area: sewing\n    line: line-1\n    profile: sewing-station\n"
        "    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}\n"
    )
    clock = Clock(1_700_000_000.0)
    gateway = Gateway(load_config(p, env={}), clock=clock)
    try:
        m = gateway.machines["sew-01"]
        # Three glitches in a row (one episode), a clean reading, then another glitch.
        with capture_logs() as logs:
            for good in (100, 101, 99, 98, 99, 102, 100, 103):
                clock.now += 1
                batch = [
                    Sample("sew-01", "order_id", "PO-1", clock.now),
                    Sample("sew-01", "good_count", good, clock.now),
                ]
                gateway.devices.on_batch(m, batch)
        warned = [e for e in logs if e["event"] == "tracker.value_rejected"]
        assert [e["value"] for e in warned] == ["99", "100"], warned
    finally:
        await gateway.outbox.close()
