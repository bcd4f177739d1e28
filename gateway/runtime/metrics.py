"""Gateway metrics in Prometheus format, readiness, and the status summary.

:class:`Metrics` keeps plain counters and states that the runtime updates through small
methods (``device_polled``, ``device_connected``, ``event_emitted``, ``destination_state``)
and renders them on demand: it is a custom collector on a private ``CollectorRegistry``, so
two gateways in one process (tests) never share numbers, and a machine removed by a config
reload disappears from the output instead of lingering as a stale label set.

Exported (all prefixed ``shopfloor_``)::

    gateway_info{gateway_id,version}            1
    gateway_start_time_seconds                  process start (epoch)
    gateway_ready                               1 when /healthz says ready
    outbox_writable                             0 while a full disk holds events back
    outbox_dropped_total{class}                 rows dropped by the overflow policy
                                                (class="progress": superseded order.progress)
    device_connected{machine}                   1 connected, 0 not
    device_polls_total{machine}                 reads (polls) that returned samples
    device_notifications_total{machine}         notification batches of a subscription
                                                (OPC UA), counted apart from polls
    device_read_errors_total{machine}           failed reads and connects
    device_rejected_readings_total{machine}     counter readings rejected as glitches (drops,
                                                spikes, torn reads not confirmed)
    device_missed_deadlines_total{machine}      poll deadlines skipped because a read (or
                                                its processing) overran the interval
    device_poll_duration_seconds{machine}       histogram: how long one poll's reads took
    device_last_sample_age_seconds{machine}     absent until the first sample
    destination_connected{destination}          MQTT broker or sink link up
    destination_published_total{destination}    messages acknowledged (rate() = publish rate)
    destination_dropped_total{destination}      messages lost to a full queue
    destination_backlog_messages{destination}   messages waiting (outbox rows)
    destination_oldest_pending_age_seconds{destination}
    events_total{type}                          events emitted by type
    destination_telemetry_total{destination}    MQTT telemetry messages queued for sending
    destination_telemetry_dropped_total{destination}  telemetry messages dropped, oldest first,
                                                because the queue's memory (max_queue) was full
    commands_dropped_total{destination,reason}  commands dropped unanswered: ``rate`` (over
                                                the listener's rate limit) or ``inbox``
                                                (its queue was full: a flood)
    event_delivery_seconds{destination}         histogram: from an event's emission (its
                                                sample in hand) to the destination's
                                                acknowledgement (PUBACK); a few ms live, a
                                                drained backlog's age after an outage
    asyncio_tasks                               tasks alive on the gateway's event loop
                                                (flat over time; a rise is a leak)
    event_loop_lag_seconds                      worst lateness of the loop in the last second
    event_loop_stalls_total                     times the loop did not turn for over 1 s

plus ``process_*`` (resident memory, CPU, open files) from prometheus-client's
``ProcessCollector``.

Readiness (:func:`evaluate_health`) is pure: config loaded, outbox writable, every core
task alive, the event loop turning, and at least one required destination delivering or
buffering within its limits (a connected destination that acknowledges nothing while its
oldest pending message ages past ``max_pending_age`` is not delivering).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import __version__

Clock = Callable[[], float]

#: A destination is "buffering within limits" while its backlog is below this share of
#: its limit; beyond it, data will soon be dropped and the gateway is not healthy.
DEFAULT_MAX_FILL = 0.9


# ---------------------------------------------------------------------------- pure parts


@dataclass(frozen=True, slots=True)
class DestinationView:
    """One destination's state as the runtime last reported it."""

    name: str
    connected: bool = False
    backlog: int = 0
    oldest_age: float | None = None
    published_total: int = 0
    dropped_total: int = 0
    #: Queue bound (``max_queue`` or outbox size); ``None`` when unbounded or unknown.
    limit: int | None = None
    #: Whether readiness depends on it (MQTT brokers yes, the optional history sink no).
    required: bool = True
    #: When it last made progress: acknowledged something, or had nothing to send.
    progress_at: float | None = None


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The outcome of the readiness checks; ``problems`` says why when not ready."""

    ready: bool
    checks: Mapping[str, bool]
    problems: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """JSON-ready body for ``/healthz``."""
        return {
            "status": "ok" if self.ready else "unavailable",
            "checks": dict(self.checks),
            "problems": list(self.problems),
        }


def destination_ok(
    d: DestinationView,
    *,
    max_fill: float = DEFAULT_MAX_FILL,
    max_age: float | None = None,
    now: float | None = None,
) -> tuple[bool, str]:
    """Whether a destination delivers, or buffers within limits, and why not.

    Connected is not enough: a broker that takes the connection but acknowledges nothing
    (dropped PUBACKs) is stuck once its oldest pending message is older than ``max_age``
    and nothing was acknowledged for that long. A connected destination draining an old
    backlog makes progress and stays usable.
    """
    old = max_age is not None and d.oldest_age is not None and d.oldest_age > max_age
    if d.connected:
        if old and d.backlog > 0 and now is not None and max_age is not None:
            idle = None if d.progress_at is None else now - d.progress_at
            if idle is None or idle > max_age:
                return False, (
                    f"{d.name}: connected but nothing acknowledged for "
                    f"{max_age:g} s or more; oldest pending message is "
                    f"{d.oldest_age:.0f} s old"
                )
        return True, ""
    if d.limit is not None and d.backlog >= max_fill * d.limit:
        return False, f"{d.name}: disconnected and backlog {d.backlog} near its limit {d.limit}"
    if old:
        return False, (
            f"{d.name}: disconnected and oldest pending message is "
            f"{d.oldest_age:.0f} s old (limit {max_age:g} s)"
        )
    return True, ""


def evaluate_health(
    *,
    config_loaded: bool,
    outbox_writable: bool,
    destinations: Iterable[DestinationView],
    max_fill: float = DEFAULT_MAX_FILL,
    max_age: float | None = None,
    now: float | None = None,
    dead_tasks: Iterable[str] = (),
    loop_stalled: bool = False,
) -> HealthReport:
    """Ready when the config is loaded, the outbox writable, every core task alive, the event
    loop turning, and a destination usable.

    A destination is usable when it delivers, or is disconnected but still buffering within
    limits (backlog below ``max_fill`` of its bound, oldest pending younger than
    ``max_age``): a short broker outage is what the outbox is for, not a reason to
    restart the gateway.
    """
    problems: list[str] = []
    if not config_loaded:
        problems.append("config not loaded")
    if not outbox_writable:
        problems.append("outbox not writable")
    dead = sorted(dead_tasks)
    for name in dead:
        problems.append(f"task {name} has ended")
    if loop_stalled:
        problems.append("the event loop is stalled")
    required = [d for d in destinations if d.required]
    usable = False
    for d in required:
        ok, why = destination_ok(d, max_fill=max_fill, max_age=max_age, now=now)
        usable = usable or ok
        if not ok:
            problems.append(why)
    if not required:
        problems.append("no destination configured")
    checks = {
        "config": config_loaded,
        "outbox": outbox_writable,
        "tasks": not dead and not loop_stalled,
        "destinations": usable,
    }
    return HealthReport(ready=all(checks.values()), checks=checks, problems=tuple(problems))


# ---------------------------------------------------------------------------- the shell side


#: Upper bounds (seconds) of the poll duration histogram: few buckets, since it is per
#: machine (12 series each); a Modbus read is milliseconds, a timeout seconds.
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: Upper bounds (seconds) of the delivery histogram: fine around the few milliseconds a
#: live event takes, coarse up to the hour a drained backlog may be old.
DELIVERY_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip


class Histogram:
    """Counts of observations per bucket (Prometheus style, cumulative on output)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float] = DELIVERY_BUCKETS) -> None:
        """Empty; ``bounds`` are the buckets' upper bounds, increasing (+Inf is implied)."""
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must increase")
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (negative clock steps count as 0)."""
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of observations <= le)`` per bucket, ``+Inf`` last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(bound), running))
        return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``q`` from cumulative ``(le, count)`` pairs.

    Linear within the bucket that holds the quantile; ``None`` without observations. A
    quantile in the ``+Inf`` bucket is the highest finite bound.
    """
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower, below = 0.0, 0.0
    for le, count in pairs:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


@dataclass(slots=True)
class _Device:
    connected: bool = False
    polls: int = 0
    notifications: int = 0
    read_errors: int = 0
    last_sample_at: float | None = None
    missed_deadlines: int = 0
    #: The adapter's own cumulative count at the last update (a new adapter restarts at 0).
    missed_seen: int = 0
    rejected_readings: int = 0
    #: The tracker's own count at the last update (a rebuilt tracker restarts at 0).
    rejected_seen: int = 0
    poll_duration: Histogram = field(default_factory=lambda: Histogram(POLL_BUCKETS))


@dataclass(slots=True)
class _State:
    devices: dict[str, _Device] = field(default_factory=dict)
    destinations: dict[str, DestinationView] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    delivery: dict[str, Histogram] = field(default_factory=dict)
    commands_dropped: dict[tuple[str, str], int] = field(default_factory=dict)
    config_loaded: bool = False
    outbox_writable: bool = True
    #: Worst event-loop lag of the last report period, and stalls over 1 s so far.
    loop_lag: float = 0.0
    loop_stalls: int = 0
    outbox_dropped: dict[str, int] = field(default_factory=dict)
    #: MQTT telemetry per destination: (messages queued, messages dropped), totals.
    telemetry: dict[str, tuple[int, int]] = field(default_factory=dict)


class Metrics:
    """The gateway's metrics, readiness and status summary behind small update methods."""

    def __init__(
        self,
        *,
        gateway_id: str,
        started_at: float,
        version: str = __version__,
        clock: Clock = time.time,
        process: bool = True,
        max_fill: float = DEFAULT_MAX_FILL,
        max_pending_age: float | None = None,
    ) -> None:
        """A fresh registry; ``process=False`` leaves out the ``process_*`` metrics."""
        self.gateway_id = gateway_id
        self.version = version
        self.started_at = started_at
        self._clock = clock
        self._max_fill = max_fill
        self._max_age = max_pending_age
        self._s = _State()
        #: Names of core tasks that ended by themselves (set by the runtime).
        self.dead_tasks: Callable[[], Iterable[str]] = tuple
        #: Whether the event loop is stalled right now (set by the runtime's loop watch).
        self.loop_stalled: Callable[[], bool] = bool
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=self.registry)

    # -- config and outbox --

    def configure(self, machines: Iterable[str]) -> None:
        """A config is loaded: these are the machines (others are forgotten, for reloads)."""
        wanted = list(machines)
        self._s.devices = {m: self._s.devices.get(m, _Device()) for m in wanted}
        self._s.config_loaded = True

    def set_outbox_writable(self, writable: bool) -> None:
        """The outbox's last write (or probe) succeeded or failed."""
        self._s.outbox_writable = writable

    def outbox_dropped(self, progress: int) -> None:
        """Superseded ``order.progress`` rows the outbox dropped so far (a total).

        The only class it drops; the ``class`` label stays for dashboards that sum it.
        """
        self._s.outbox_dropped = {"progress": progress}

    def telemetry(self, submitted: Mapping[str, int], dropped: Mapping[str, int]) -> None:
        """MQTT telemetry messages queued and dropped so far per destination (totals)."""
        self._s.telemetry = {n: (submitted.get(n, 0), dropped.get(n, 0)) for n in submitted}

    # -- devices --

    def _device(self, machine: str) -> _Device:
        dev = self._s.devices.get(machine)
        if dev is None:
            dev = self._s.devices[machine] = _Device()
        return dev

    def device_connected(self, machine: str, connected: bool) -> None:
        """The device answers (True) or cannot be reached (False)."""
        self._device(machine).connected = connected

    def device_polled(
        self, machine: str, ok: bool, at: float | None = None, *, notification: bool = False
    ) -> None:
        """One read finished: ``ok`` with samples (at time ``at``), or failed.

        ``notification``: the samples came from a subscription, not from a poll.
        """
        dev = self._device(machine)
        if ok:
            if notification:
                dev.notifications += 1
            else:
                dev.polls += 1
            dev.last_sample_at = self._clock() if at is None else at
        else:
            dev.read_errors += 1

    def device_poll_timing(self, machine: str, seconds: float | None, missed_total: int) -> None:
        """A poll's duration (``None``: not a poll) and the adapter's missed deadlines so far."""
        dev = self._device(machine)
        if seconds is not None:
            dev.poll_duration.observe(seconds)
        new = missed_total - dev.missed_seen if missed_total >= dev.missed_seen else missed_total
        dev.missed_deadlines += new
        dev.missed_seen = missed_total

    # -- events and destinations --

    def counter_readings_rejected(self, machine: str, tracker_total: int) -> None:
        """The machine's tracker has rejected ``tracker_total`` counter readings so far."""
        dev = self._device(machine)
        seen = dev.rejected_seen
        dev.rejected_readings += tracker_total - seen if tracker_total >= seen else tracker_total
        dev.rejected_seen = tracker_total

    def event_emitted(self, type_: str, n: int = 1) -> None:
        """``n`` events of this type were emitted (committed to the outbox)."""
        self._s.events[type_] = self._s.events.get(type_, 0) + n

    def destination_state(
        self,
        name: str,
        *,
        connected: bool,
        backlog: int,
        oldest_age: float | None = None,
        published_total: int | None = None,
        dropped_total: int | None = None,
        limit: int | None = None,
        required: bool = True,
    ) -> None:
        """Latest state of one destination; totals are absolute (monotonic) counts."""
        old = self._s.destinations.get(name)
        published = _total(published_total, old.published_total if old else 0)
        progress_at = old.progress_at if old else None
        if backlog <= 0 or old is None or published != old.published_total:
            progress_at = self._clock()
        self._s.destinations[name] = DestinationView(
            name=name,
            connected=connected,
            backlog=max(0, backlog),
            oldest_age=finite_or_none(oldest_age),
            published_total=published,
            dropped_total=_total(dropped_total, old.dropped_total if old else 0),
            limit=limit,
            required=required,
            progress_at=progress_at,
        )

    def commands_dropped(self, destination: str, *, rate: int, inbox: int) -> None:
        """The command listener's running totals of dropped commands."""
        self._s.commands_dropped[(destination, "rate")] = rate
        self._s.commands_dropped[(destination, "inbox")] = inbox

    def published(self, name: str, n: int = 1) -> None:
        """``n`` messages to ``name`` were acknowledged (push-style alternative to totals)."""
        old = self._s.destinations.get(name) or DestinationView(name=name)
        self._s.destinations[name] = replace(old, published_total=old.published_total + n)

    def delivery(self, name: str) -> Histogram:
        """The delivery-time histogram of destination ``name`` (its queue observes into it)."""
        hist = self._s.delivery.get(name)
        if hist is None:
            hist = self._s.delivery[name] = Histogram()
        return hist

    def destination_views(self) -> list[DestinationView]:
        """Every destination and sink as last reported (for the web console)."""
        return list(self._s.destinations.values())

    def forget_destination(self, name: str) -> None:
        """Drop a destination removed by a config reload."""
        self._s.destinations.pop(name, None)
        self._s.delivery.pop(name, None)

    # -- reading --

    def health(self) -> HealthReport:
        """Readiness now."""
        return evaluate_health(
            config_loaded=self._s.config_loaded,
            outbox_writable=self._s.outbox_writable,
            destinations=self._s.destinations.values(),
            max_fill=self._max_fill,
            max_age=self._max_age,
            now=self._clock(),
            dead_tasks=self.dead_tasks(),
            loop_stalled=self.loop_stalled(),
        )

    def loop_lag(self, seconds: float, stalls: int) -> None:
        """The worst event-loop lag of the last period, and the stalls seen so far."""
        self._s.loop_lag = max(0.0, seconds) if math.isfinite(seconds) else 0.0
        self._s.loop_stalls = stalls

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The health summary for the retained status topic and ``/healthz``."""
        now = self._clock() if now is None else now
        devices = self._s.devices.values()
        return {
            "version": self.version,
            "uptime_s": round(max(0.0, now - self.started_at), 1),
            "devices_online": sum(1 for d in devices if d.connected),
            "devices_total": len(self._s.devices),
            "backlog": sum(d.backlog for d in self._s.destinations.values()),
        }

    def status_line(self, now: float | None = None) -> str:
        """One line for ``systemctl status`` (sd_notify ``STATUS=``)."""
        s = self.summary(now)
        links = ", ".join(
            f"{d.name} {'up' if d.connected else 'down'}"
            for d in sorted(self._s.destinations.values(), key=lambda d: d.name)
        )
        line = f"{s['devices_online']}/{s['devices_total']} devices online, backlog {s['backlog']}"
        return f"{line}; {links}" if links else line

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry)

    def _families(self) -> Iterator[Metric]:
        now = self._clock()
        s = self._s
        info = GaugeMetricFamily(
            "shopfloor_gateway_info", "Gateway identity.", labels=["gateway_id", "version"]
        )
        info.add_metric([self.gateway_id, self.version], 1)
        yield info
        yield GaugeMetricFamily(
            "shopfloor_gateway_start_time_seconds",
            "When the gateway started (Unix time).",
            value=self.started_at,
        )
        yield GaugeMetricFamily(
            "shopfloor_gateway_ready",
            "1 when the gateway is ready (see /healthz).",
            value=1 if self.health().ready else 0,
        )
        yield GaugeMetricFamily(
            "shopfloor_outbox_writable",
            "0 while a full disk holds events back (outbox.disk_full), else 1.",
            value=1 if s.outbox_writable else 0,
        )
        dropped = CounterMetricFamily(
            "shopfloor_outbox_dropped",
            "Rows the outbox dropped by its overflow policy (bound or full disk).",
            labels=["class"],
        )
        for cls, n in s.outbox_dropped.items():
            dropped.add_metric([cls], n)
        yield dropped
        conn = GaugeMetricFamily(
            "shopfloor_device_connected", "1 while the device answers.", labels=["machine"]
        )
        polls = CounterMetricFamily(
            "shopfloor_device_polls",
            "Device reads (polls) that returned samples.",
            labels=["machine"],
        )
        notes = CounterMetricFamily(
            "shopfloor_device_notifications",
            "Notification batches from a device subscription (OPC UA).",
            labels=["machine"],
        )
        missed = CounterMetricFamily(
            "shopfloor_device_missed_deadlines",
            "Poll deadlines skipped because a read or its processing overran the interval.",
            labels=["machine"],
        )
        duration = HistogramMetricFamily(
            "shopfloor_device_poll_duration_seconds",
            "How long one poll's reads took.",
            labels=["machine"],
        )
        errors = CounterMetricFamily(
            "shopfloor_device_read_errors",
            "Failed device reads and connection attempts.",
            labels=["machine"],
        )
        rejected = CounterMetricFamily(
            "shopfloor_device_rejected_readings",
            "Counter readings rejected as glitches (drops, spikes, torn reads not confirmed).",
            labels=["machine"],
        )
        age = GaugeMetricFamily(
            "shopfloor_device_last_sample_age_seconds",
            "Seconds since the device last delivered samples.",
            labels=["machine"],
        )
        for name, dev in sorted(s.devices.items()):
            conn.add_metric([name], 1 if dev.connected else 0)
            polls.add_metric([name], dev.polls)
            notes.add_metric([name], dev.notifications)
            errors.add_metric([name], dev.read_errors)
            missed.add_metric([name], dev.missed_deadlines)
            rejected.add_metric([name], dev.rejected_readings)
            duration.add_metric(
                [name], dev.poll_duration.cumulative(), sum_value=dev.poll_duration.total
            )
            if dev.last_sample_at is not None:
                age.add_metric([name], max(0.0, now - dev.last_sample_at))
        yield from (conn, polls, notes, errors, missed, duration, rejected, age)

        d_conn = GaugeMetricFamily(
            "shopfloor_destination_connected",
            "1 while the destination is connected.",
            labels=["destination"],
        )
        d_pub = CounterMetricFamily(
            "shopfloor_destination_published",
            "Messages the destination acknowledged.",
            labels=["destination"],
        )
        d_drop = CounterMetricFamily(
            "shopfloor_destination_dropped",
            "Messages dropped because the queue was full.",
            labels=["destination"],
        )
        d_back = GaugeMetricFamily(
            "shopfloor_destination_backlog_messages",
            "Messages waiting for the destination.",
            labels=["destination"],
        )
        d_age = GaugeMetricFamily(
            "shopfloor_destination_oldest_pending_age_seconds",
            "Age of the oldest message waiting for the destination (0 when none).",
            labels=["destination"],
        )
        for name, d in sorted(s.destinations.items()):
            d_conn.add_metric([name], 1 if d.connected else 0)
            d_pub.add_metric([name], d.published_total)
            d_drop.add_metric([name], d.dropped_total)
            d_back.add_metric([name], d.backlog)
            d_age.add_metric([name], d.oldest_age or 0.0)
        yield from (d_conn, d_pub, d_drop, d_back, d_age)

        delivery = HistogramMetricFamily(
            "shopfloor_event_delivery_seconds",
            "From an event's emission (its sample in hand) to the destination's acknowledgement.",
            labels=["destination"],
        )
        for name, hist in sorted(s.delivery.items()):
            delivery.add_metric([name], hist.cumulative(), sum_value=hist.total)
        yield delivery

        events = CounterMetricFamily(
            "shopfloor_events", "Events emitted, by type.", labels=["type"]
        )
        for type_, n in sorted(s.events.items()):
            events.add_metric([type_], n)
        yield events

        yield GaugeMetricFamily(
            "shopfloor_event_loop_lag_seconds",
            "Worst lateness of the event loop over the last second (a blocked loop stops "
            "polls and publishing alike).",
            value=s.loop_lag,
        )
        yield CounterMetricFamily(
            "shopfloor_event_loop_stalls",
            "Times the event loop did not turn for more than a second.",
            value=s.loop_stalls,
        )
        if s.telemetry:
            queued = CounterMetricFamily(
                "shopfloor_destination_telemetry",
                "MQTT telemetry messages queued for sending.",
                labels=["destination"],
            )
            lost = CounterMetricFamily(
                "shopfloor_destination_telemetry_dropped",
                "Telemetry messages dropped, oldest first, because the queue's memory was full.",
                labels=["destination"],
            )
            for name, (n_queued, n_lost) in sorted(s.telemetry.items()):
                queued.add_metric([name], n_queued)
                lost.add_metric([name], n_lost)
            yield queued
            yield lost
        dropped = CounterMetricFamily(
            "shopfloor_commands_dropped",
            "Commands dropped without an answer: over the rate limit, or the inbox was full.",
            labels=["destination", "reason"],
        )
        for (destination, reason), n in sorted(s.commands_dropped.items()):
            dropped.add_metric([destination, reason], n)
        yield dropped

        tasks = _tasks_alive()
        if tasks is not None:
            yield GaugeMetricFamily(
                "shopfloor_asyncio_tasks",
                "Tasks alive on the gateway's event loop (flat over time; a rise is a leak).",
                value=tasks,
            )


def _tasks_alive() -> int | None:
    """Tasks on the running event loop; ``None`` when rendered outside one (tests, tools)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None


def _total(new: int | None, old: int) -> int:
    # A component that restarted (config reload) restarts its count; Prometheus' rate()
    # understands counter resets, so the new value is passed on as it is.
    return old if new is None else max(0, new)


class _Collector(Collector):
    """Adapts :class:`Metrics` to prometheus-client's collector interface."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """Metric families built from the current state."""
        return list(self._metrics._families())


def finite_or_none(value: float | None) -> float | None:
    """``None`` for missing or non-finite values (so a bad clock never breaks a scrape)."""
    if value is None or not math.isfinite(value):
        return None
    return value
