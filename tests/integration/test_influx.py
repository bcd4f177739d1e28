"""InfluxDB history sink: line protocol, the batching runner, and a real v2 write server.

The server is Debian's ``victoria-metrics``, which accepts influxdb-client's v2 writes on
``/api/v2/write``; points are read back through its export API (a metric appears as
``<measurement>_<field>``, tags as labels, string fields are not stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config.influx import InfluxConfig
from gateway.core.backoff import Backoff
from gateway.core.model import Event, Location, Quality, Sample
from gateway.delivery.influx.sink import (
    STATE_CODES,
    InfluxSink,
    MemorySinkQueue,
    Point,
    RecordSink,
    RunnerSettings,
    SinkRejected,
    event_point,
    history_runner,
    record_point,
    runner_for,
    telemetry_point,
    to_line,
)
from gateway.delivery.records import Record
from gateway.delivery.sink import SinkRunner
from gateway.runtime.metrics import Metrics
from tests.brokers import VictoriaMetrics

LOC = Location("plant-1", "sewing", "line-1", "sew-01")
FAST = Backoff(base=0.01, cap=0.05, floor=0.005)


# ---------------------------------------------------------------------------- points


def test_event_point_tags_location_order_and_type() -> None:
    ev = Event(
        "sew-01",
        "order.progress",
        1_800_000_000.5,
        7,
        {"order_id": "PO 1", "good": 50, "scrap": 2, "percent": 42.5, "eta": 1_800_000_600.0},
    )
    p = event_point(ev, LOC)
    assert p.measurement == "shopfloor_order"
    assert p.tags == {
        "site": "plant-1",
        "area": "sewing",
        "line": "line-1",
        "machine": "sew-01",
        "order": "PO 1",
        "type": "order.progress",
    }
    # Numbers are floats, always: InfluxDB refuses a field that changes type.
    assert p.fields == {
        "good": 50.0,
        "scrap": 2.0,
        "percent": 42.5,
        "eta": 1_800_000_600.0,
        "sequence": 7.0,
    }
    assert to_line(p) == (
        "shopfloor_order,area=sewing,line=line-1,machine=sew-01,order=PO\\ 1,site=plant-1,"
        "type=order.progress eta=1800000600.0,good=50.0,percent=42.5,scrap=2.0,sequence=7.0 "
        "1800000000500"
    )


def test_state_events_carry_a_numeric_state_code() -> None:
    ev = Event("sew-01", "machine.state.changed", 1.0, 1, {"state": "fault", "previous": "x"})
    p = event_point(ev, LOC)
    assert p.measurement == "shopfloor_machine"
    assert p.fields["state"] == "fault"
    assert p.fields["state_code"] == STATE_CODES["fault"]
    assert "order" not in p.tags
    offline = event_point(
        Event("sew-01", "machine.connection.changed", 1.0, 2, {"connected": False}), LOC
    )
    assert offline.fields["state_code"] == STATE_CODES["offline"]
    assert offline.fields["connected"] is False


def test_unwritable_values_are_left_out_not_fatal() -> None:
    ev = Event(
        "sew-01",
        "order.progress",
        1.0,
        1,
        {"rate": float("nan"), "nested": {"a": 1}, "list": [1], "none": None, "ok": 1},
    )
    assert event_point(ev, LOC).fields == {"ok": 1.0, "sequence": 1.0}


def test_telemetry_point_uses_good_samples_only() -> None:
    samples = [
        Sample("sew-01", "stitch_rate", 812.5, 10.0),
        Sample("sew-01", "state", "running", 10.2),
        Sample("sew-01", "temperature", None, 10.1, Quality.BAD),
        Sample("sew-01", "spindle", 3, 9.0, Quality.UNCERTAIN),
    ]
    p = telemetry_point(LOC, samples, order_id="PO-1")
    assert p is not None
    assert p.measurement == "shopfloor_telemetry"
    assert p.time == 10.2
    assert "order" not in p.tags, "every order would add a series per signal"
    assert p.fields == {
        "stitch_rate": 812.5,
        "state": "running",
        "state_code": float(STATE_CODES["running"]),
        "spindle": 3.0,
        "order_id": "PO-1",
    }
    tagged = telemetry_point(LOC, samples, order_id="PO-1", order_tag=True)
    assert tagged is not None and tagged.tags["order"] == "PO-1"
    assert "order_id" not in tagged.fields
    assert telemetry_point(LOC, [Sample("m", "x", None, 1.0, Quality.BAD)]) is None


@pytest.mark.parametrize(
    ("point", "line"),
    [
        (Point("m m,x", {"t=1": "a b,c"}, {"f f": 'say "hi"\\'}, 0.001), None),
        (Point("m", {"empty": ""}, {"b": True, "i": 3, "s": "a\nb"}, 2.0), None),
    ],
)
def test_line_protocol_escaping(point: Point, line: str | None) -> None:
    text = to_line(point)
    assert "\n" not in text
    if point.measurement == "m m,x":
        assert text == 'm\\ m\\,x,t\\=1=a\\ b\\,c f\\ f="say \\"hi\\"\\\\" 1'
    else:
        assert text == 'm b=true,i=3i,s="a b" 2000'


def test_escaped_names_are_remembered_within_a_bound() -> None:
    from gateway.delivery.influx.sink import _escape_cached

    _escape_cached.cache_clear()
    point = Point("m m", {"order": "PO 1"}, {"f,1": 1.0}, 1.0)
    first = to_line(point)
    assert to_line(point) == first == "m\\ m,order=PO\\ 1 f\\,1=1.0 1000"
    assert _escape_cached.cache_info().hits >= 4
    # The same text under another escape set is another entry, not a wrong hit.
    assert to_line(Point("a,b", {"a,b": "x"}, {"a,b": 1.0}, 1.0)) == "a\\,b,a\\,b=x a\\,b=1.0 1000"
    for i in range(50):  # an open set of order ids as tag values
        assert to_line(Point("m", {"order": f"PO {i}"}, {"v": 1.0}, 1.0)).startswith(
            f"m,order=PO\\ {i} "
        )
    info = _escape_cached.cache_info()
    assert info.maxsize == 10_000
    assert info.currsize <= info.maxsize


@pytest.mark.parametrize(
    "point",
    [
        Point("", {}, {"a": 1.0}, 1.0),
        Point("m", {}, {}, 1.0),
        Point("m", {}, {"a": float("inf")}, 1.0),
        Point("m", {}, {"a": 1.0}, float("nan")),
    ],
)
def test_unwritable_points_raise_value_error(point: Point) -> None:
    with pytest.raises(ValueError):
        to_line(point)


def _record(ev: Event) -> Record:
    oid = ev.data.get("order_id")
    return Record(ev.machine, ev.type, LOC, ev.sequence, ev.time, ev.data, "id-1", "gw", 1, oid)


def test_record_point_is_the_event_point_with_times_kept_as_numbers() -> None:
    data = {"order_id": "PO-9", "good": 5, "started_at": 1_800_000_000.1234, "eta": "soon"}
    ev = Event("sew-01", "order.progress", 1_800_000_000.25, 4, data)
    point = record_point(_record(ev))
    assert point == event_point(ev, LOC)
    # Typed: a time is the number it was, a string at a time key stays a string.
    assert point.fields["started_at"] == 1_800_000_000.1234
    assert point.fields["eta"] == "soon"
    assert point.tags["order"] == "PO-9" and point.time == 1_800_000_000.25


def test_record_sink_skips_what_is_not_a_record() -> None:
    from gateway.delivery.mqtt.publisher import Message

    stored: list[list[Point]] = []

    class Points:
        def write(self, batch: Sequence[Point]) -> None:
            stored.append(list(batch))

    ev = Event("sew-01", "order.started", 1_800_000_000.0, 1, {"order_id": "PO-9"})
    sink = RecordSink(Points())
    sink.write([_record(ev), Message("t/telemetry", b'{"v": 1}')])
    assert stored == [[event_point(ev, LOC)]]
    assert sink.skipped == 1


def test_config_validation() -> None:
    cfg = InfluxConfig(url="http://h:8086/", org="o", bucket="b", token="")
    assert cfg.url == "http://h:8086" and cfg.token is None
    with pytest.raises(ValueError, match="http"):
        InfluxConfig(url="h:8086", org="o", bucket="b")
    with pytest.raises(ValueError):
        InfluxConfig(url="http://h", org="o", bucket="b", batch_size=0)
    with pytest.raises(ValueError):
        InfluxConfig(url="http://h", org="o", bucket="b", surprise=1)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------- the runner


class ListSink:
    """A real in-memory sink: stores batches; fails the first ``fail`` writes."""

    def __init__(self, fail: int = 0, reject: Sequence[int] = ()) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail
        self.reject = set(reject)
        self.calls = 0
        self._changed = threading.Condition()

    async def wait_batches(self, n: int) -> None:
        """Until ``n`` batches are stored (writes happen in a worker thread)."""

        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: len(self.batches) >= n, timeout=5)

        assert await asyncio.to_thread(wait), f"only {len(self.batches)} batches"

    def write(self, batch: Sequence[int]) -> None:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("server down")
        if self.reject & set(batch):
            raise SinkRejected(f"bad item in {list(batch)}")
        with self._changed:
            self.batches.append(list(batch))
            self._changed.notify_all()

    @property
    def items(self) -> list[int]:
        return [i for b in self.batches for i in b]


@contextlib.asynccontextmanager
async def running(runner: SinkRunner[Any]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(runner.run())
    try:
        yield task
    finally:
        await runner.close(timeout=2)
        async with asyncio.timeout(5):
            await task


async def test_batches_are_cut_at_batch_size() -> None:
    sink = ListSink()
    runner = history_runner(sink, settings=RunnerSettings(batch_size=4, flush_interval=30))
    async with running(runner):
        for i in range(10):
            runner.submit(i)
        # Two full batches go at once; the rest waits for the interval or close().
        await sink.wait_batches(2)
        assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sink.items == list(range(10))
    assert runner.written == 10 and runner.pending == 0


async def test_a_partial_batch_goes_after_the_flush_interval() -> None:
    sink = ListSink()
    runner = history_runner(sink, settings=RunnerSettings(batch_size=100, flush_interval=0.05))
    async with running(runner):
        runner.submit(1)
        runner.submit(2)
        assert await runner.flush(5)
        assert sink.batches == [[1, 2]]


async def test_failures_retry_in_order_lose_nothing_and_log_once_per_episode() -> None:
    sink = ListSink(fail=4)
    settings = RunnerSettings(batch_size=3, flush_interval=0.01, backoff=FAST)
    runner = history_runner(sink, settings=settings)
    with capture_logs() as logs:
        async with running(runner):
            for i in range(7):
                runner.submit(i)
            assert await runner.flush(5)
    assert sink.items == list(range(7))
    assert runner.failures == 4
    events = [e for e in logs if e["event"].startswith("influx.")]
    warnings = [e for e in events if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["influx.write_failed"]
    recovered = [e for e in events if e["event"] == "influx.write_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["failures"] == 4
    assert recovered[0]["destination"] == "influxdb"


async def test_rejected_items_are_isolated_and_dropped_alone() -> None:
    sink = ListSink(reject=[3])
    settings = RunnerSettings(batch_size=5, flush_interval=0.01, backoff=FAST)
    runner = history_runner(sink, settings=settings)
    with capture_logs() as logs:
        async with running(runner):
            for i in range(6):
                runner.submit(i)
            assert await runner.flush(5)
    assert sink.items == [0, 1, 2, 4, 5]
    assert runner.rejected == 1 and runner.written == 5
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["influx.point_rejected"]


async def test_overflow_drops_the_oldest_and_counts() -> None:
    sink = ListSink()
    runner = history_runner(sink, settings=RunnerSettings(max_queue=3, flush_interval=0.01))
    for i in range(5):  # not running yet: the queue fills up
        runner.submit(i)
    assert runner.dropped == 2 and runner.pending == 3
    async with running(runner):
        assert await runner.flush(5)
    assert sink.items == [2, 3, 4]


async def test_close_while_the_sink_is_down_returns_and_keeps_the_items() -> None:
    sink = ListSink(fail=10**6)
    queue: MemorySinkQueue[int] = MemorySinkQueue(100)
    settings = RunnerSettings(flush_interval=0.01, backoff=FAST)
    runner = history_runner(sink, settings=settings, queue=queue)
    task = asyncio.create_task(runner.run())
    runner.submit(1)
    runner.submit(2)
    async with asyncio.timeout(5):
        await runner.close(timeout=0.2)
        await task
    # Still there for whoever owns the queue (the outbox, next start).
    assert len(queue) == 2 and queue.in_flight == 0
    assert [queue.take(), queue.take()] == [(1, 1), (2, 2)]


async def test_report_feeds_the_gateway_metrics() -> None:
    now = [100.0]
    sink = ListSink(fail=10**6)
    runner = history_runner(
        sink, settings=RunnerSettings(max_queue=1000), clock=lambda: now[0], name="history"
    )
    runner.submit(1)
    now[0] = 130.0
    metrics = Metrics(gateway_id="gw", started_at=0.0, process=False)
    runner.report(metrics)
    view = metrics._s.destinations["history"]
    assert (view.connected, view.backlog, view.oldest_age, view.required) == (
        False,
        1,
        30.0,
        False,
    )


async def test_a_queue_that_fills_itself_wakes_the_runner_with_notify() -> None:
    sink = ListSink()
    queue: MemorySinkQueue[int] = MemorySinkQueue(100)
    runner = history_runner(sink, settings=RunnerSettings(flush_interval=0.01), queue=queue)
    async with running(runner):
        queue.push(7)  # as an outbox cursor would, behind the runner's back
        runner.notify()
        await sink.wait_batches(1)
    assert sink.items == [7]


def test_memory_queue_requeue_keeps_order() -> None:
    q: MemorySinkQueue[str] = MemorySinkQueue(10)
    for s in "abcd":
        q.push(s)
    assert [q.take(), q.take()] == [(1, "a"), (2, "b")]
    q.ack(1)
    q.requeue()
    assert q.oldest_key() == 2
    assert [q.take(), q.take(), q.take(), q.take()] == [(2, "b"), (3, "c"), (4, "d"), None]
    with pytest.raises(ValueError):
        MemorySinkQueue(0)


# ---------------------------------------------------------------------------- a real server


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    vm = VictoriaMetrics(tmp_path / "vm")
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


def _config(url: str, **kw: Any) -> InfluxConfig:
    return InfluxConfig(url=url, org="factory", bucket="shopfloor", token="secret", **kw)


async def _read_back(vm: VictoriaMetrics, want: int) -> dict[str, list[dict[str, Any]]]:
    """Metric name -> series, once at least ``want`` values are stored."""
    async with asyncio.timeout(10):
        while True:
            rows = await asyncio.to_thread(vm.export)
            if sum(len(r["values"]) for r in rows) >= want:
                out: dict[str, list[dict[str, Any]]] = {}
                for r in rows:
                    out.setdefault(r["metric"]["__name__"], []).append(r)
                return out
            await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_points_reach_a_real_v2_write_server_and_read_back(
    victoria: VictoriaMetrics,
) -> None:
    now = time.time()
    runner = runner_for(_config(victoria.url, batch_size=2, flush_interval=0.05))
    events = [
        Event("sew-01", "order.started", now, 1, {"order_id": "PO-1", "good": 0, "target": 6}),
        Event("sew-01", "machine.state.changed", now + 0.001, 2, {"state": "running"}),
        Event("sew-01", "order.progress", now + 0.002, 3, {"order_id": "PO-1", "good": 3}),
    ]
    async with running(runner):
        for ev in events:
            runner.submit(event_point(ev, LOC))
        tele = telemetry_point(LOC, [Sample("sew-01", "stitch_rate", 800.0, now)], "PO-1")
        assert tele is not None
        runner.submit(tele)
        assert await runner.flush(10)
    # started: good, target, sequence; state: state_code, sequence (strings are not
    # stored); progress: good, sequence; telemetry: stitch_rate.
    got = await _read_back(victoria, want=8)
    good = sorted(got["shopfloor_order_good"], key=lambda r: r["metric"]["type"])
    assert [(r["metric"]["type"], r["values"]) for r in good] == [
        ("order.progress", [3]),
        ("order.started", [0]),
    ]
    labels = good[0]["metric"]
    assert {k: labels[k] for k in ("site", "area", "line", "machine", "order")} == {
        "site": "plant-1",
        "area": "sewing",
        "line": "line-1",
        "machine": "sew-01",
        "order": "PO-1",
    }
    assert got["shopfloor_order_target"][0]["values"] == [6]
    assert got["shopfloor_machine_state_code"][0]["values"] == [STATE_CODES["running"]]
    assert got["shopfloor_telemetry_stitch_rate"][0]["values"] == [800]
    # The telemetry series key has no order: orders do not multiply its series.
    assert "order" not in got["shopfloor_telemetry_stitch_rate"][0]["metric"]
    # Millisecond timestamps survive the trip.
    assert got["shopfloor_order_good"][0]["timestamps"][0] in (
        round(now * 1000),
        round((now + 0.002) * 1000),
    )
    assert runner.written == 4 and runner.connected


@pytest.mark.integration
async def test_an_outage_loses_nothing(tmp_path: Path) -> None:
    # The server is down when the gateway starts writing, and comes up later.
    vm = VictoriaMetrics(tmp_path / "vm")
    settings = RunnerSettings(batch_size=50, flush_interval=0.02, backoff=FAST, write_timeout=5)
    config = _config(vm.url, timeout=2)
    runner = history_runner(InfluxSink(config), settings=settings)
    now = time.time()
    try:
        with capture_logs() as logs:
            async with running(runner):
                for i in range(120):
                    ev = Event("sew-01", "order.progress", now + i / 1000, i + 1, {"good": i})
                    runner.submit(event_point(ev, LOC))
                async with asyncio.timeout(10):
                    # The runner has no event for failures; poll the counter, bounded.
                    while runner.failures < 3:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                assert runner.written == 0 and runner.pending == 120
                await asyncio.to_thread(vm.start)
                assert await runner.flush(10)
        got = await _read_back(vm, want=120)
        values = sorted(v for r in got["shopfloor_order_good"] for v in r["values"])
        assert values == list(range(120))
    finally:
        vm.stop()
    names = [e["event"] for e in logs if e["event"].startswith("influx.write")]
    assert names.count("influx.write_failed") >= 3
    assert [e["log_level"] for e in logs if e["event"] == "influx.write_failed"].count(
        "warning"
    ) == 1
    recovered = [e for e in logs if e["event"] == "influx.write_recovered"]
    assert len(recovered) == 1 and recovered[0]["failures"] == runner.failures


@pytest.mark.integration
async def test_an_unwritable_point_is_refused_and_good_ones_still_go(
    victoria: VictoriaMetrics,
) -> None:
    # A point with no measurement cannot be written: the sink refuses the batch as
    # data (not as an outage), so the runner isolates it instead of retrying for ever.
    sink = InfluxSink(_config(victoria.url, flush_interval=0.02))
    now = time.time()
    good = Point("shopfloor_order", {"machine": "m"}, {"good": 1.0}, now)
    with pytest.raises(SinkRejected):
        await asyncio.to_thread(sink.write, [good, Point("", {}, {"x": 1.0}, now)])
    await asyncio.to_thread(sink.write, [good])
    got = await _read_back(victoria, want=1)
    assert got["shopfloor_order_good"][0]["values"] == [1]
