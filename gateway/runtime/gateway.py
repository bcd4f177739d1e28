"""The imperative shell: wires adapters, mapping, trackers and the publisher together.

Task layout (one root ``asyncio.TaskGroup``)::

    outbox               commits events with their tracker state (SQLite, worker thread)
    publisher[<name>]    one per destination: connect / reconnect / send its outbox queue
    device[<id>]         one supervisor per machine: connect, read, map, track, emit
    ticker               time-driven tracker work (progress interval, ETA) once a second
    commands             the downlink: order commands from platforms
    influxdb             optional history sink, fed from its own outbox position
    health               /healthz, /metrics and the web console on a local port (aiohttp);
                         sd_notify watchdog pings

Device supervisors never let an ordinary exception escape (a TaskGroup would cancel all
siblings): the first failure of an episode is logged at warning, repeats at debug, the
recovery at info with the episode's length and attempts; reconnects back off with full
jitter. A slow or dead device never delays another: each has its own task, connection and
timeouts.

Every event goes through the durable outbox (:mod:`gateway.delivery.outbox`): it is committed in
one transaction with the tracker state that produced it, then each destination whose
routing rules accept it (:mod:`gateway.core.routing`) sends it. At start the trackers are
restored from the outbox, so sequences continue and nothing committed is lost. The outbox
is not supervised: if SQLite fails, the gateway stops with an error and systemd restarts it.

Shutdown order (SIGTERM/SIGINT): stop the devices first, let the trackers emit what they
have, then give the publishers a grace period to flush and publish the offline status.
Whatever a broker did not acknowledge by then stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from adapters import registry as adapter_registry
from adapters.base import AdapterError, ConnectError, ConnectionLost, poll_phase
from gateway import __version__
from gateway.config.loader import (
    ConfigError,
    DestinationPlan,
    GatewayPlan,
    MachinePlan,
    OutboxPlan,
    load_config,
)
from gateway.contract.envelope import (
    Topics,
    encode_state,
    encode_status,
    new_event_id,
)
from gateway.core.backoff import Backoff, aligned
from gateway.core.derive import StateFromCounts
from gateway.core.mapping import Mapper
from gateway.core.model import Event, Location, Quality, Sample
from gateway.core.routing import (
    Route,
    RouteRules,
    Subject,
    accepts,
    machine_visible,
    redact,
    state_view,
)
from gateway.core.tracker import CommandResult, MachineTracker, Rejection, TrackerSettings
from gateway.delivery.influx.sink import (
    SINK_NAME,
    InfluxSink,
    RecordSink,
    SinkRunner,
    TelemetryLine,
    settings_for,
)
from gateway.delivery.mqtt.publisher import BrokerSettings, Message, MqttPublisher, TlsSettings
from gateway.delivery.outbox import Entry, Outbox, OutboxQueue
from gateway.delivery.records import Record, wire_payload
from gateway.runtime.commands import Command, CommandListener
from gateway.runtime.console.feed import ConsoleFeed
from gateway.runtime.health import HealthServer
from gateway.runtime.loopwatch import LoopWatch
from gateway.runtime.metrics import Metrics
from gateway.runtime.systemd import Notifier

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


#: Signals that identify a person; they stay inside the gateway.
PERSONAL_SIGNALS = frozenset({"operator"})


#: Distinct causes logged at warning per outage at most (a cause text that varies on every
#: attempt must not turn into one warning per retry).
_CAUSES_LOGGED = 5


@dataclass(slots=True)
class _Episode:
    """Bookkeeping for 'log once per outage'."""

    failing_since: float | None = None
    attempts: int = 0
    last_reason: str = ""
    #: Causes already logged at warning in this outage (one warning per cause).
    causes: set[str] = field(default_factory=set)


@dataclass(slots=True)
class DeviceStatus:
    """What the runtime knows about one device, for health output and tests."""

    connected: bool = False
    polls: int = 0
    read_errors: int = 0
    last_sample_at: float | None = None


@dataclass(slots=True)
class _Machine:
    plan: MachinePlan
    tracker: MachineTracker
    mapper: Mapper
    status: DeviceStatus = field(default_factory=DeviceStatus)
    problems_logged: set[str] = field(default_factory=set)
    #: Signals whose values the tracker refuses right now (logged once per episode).
    rejections_logged: set[str] = field(default_factory=set)
    #: For machines that map no ``state`` signal: a state derived from the counters.
    derived_state: StateFromCounts | None = None
    #: The history's line for each poll; the operator badge is personal data and never
    #: goes into the history.
    telemetry_line: TelemetryLine = field(default_factory=lambda: TelemetryLine(PERSONAL_SIGNALS))

    def __post_init__(self) -> None:
        self.refresh_derived()

    def refresh_derived(self) -> None:
        """Derive a state only when the config maps none (after start and every reload)."""
        if "state" in self.plan.signals:
            self.derived_state = None
        elif self.derived_state is None:
            self.derived_state = StateFromCounts(self.plan.id)


#: How many finished orders keep their customer per machine, for routing (the running and
#: queued orders always keep theirs).
_FINISHED_CUSTOMERS = 64
#: How often the retained status is refreshed with the outbox backlog, in seconds.
STATUS_INTERVAL = 10.0


def broker_settings(
    plan: GatewayPlan,
    topics: Topics,
    started_at: float,
    destination: DestinationPlan | None = None,
    clock: Clock = time.time,
) -> BrokerSettings:
    """Translate one destination's broker (default: the first) into publisher settings.

    The offline status of a clean shutdown is built when it is sent (``clock()`` then), so
    its ``time`` says when the gateway stopped; the last will's is the registration time.
    """
    b = destination.broker if destination is not None else plan.broker
    tls = (
        TlsSettings(
            ca_file=b.tls.ca_file,
            cert_file=b.tls.cert_file,
            key_file=b.tls.key_file,
            verify_hostname=b.tls.verify_hostname,
        )
        if b.tls is not None
        else None
    )

    def status(state: str, reason: str | None, now: float = started_at) -> bytes:
        return encode_status(
            state,  # type: ignore[arg-type]
            gateway_id=plan.gateway_id,
            version=__version__,
            started_at=started_at,
            now=now,
            reason=reason,
        )

    return BrokerSettings(
        host=b.host,
        port=b.port,
        client_id=b.client_id,
        username=b.username,
        password=b.password.get_secret_value() if b.password is not None else None,
        tls=tls,
        keepalive=b.keepalive,
        status_topic=topics.status(),
        online_payload=status("online", None),
        will_payload=status("offline", "connection lost"),
        offline_payload=status("offline", "shutdown"),
        offline_status=lambda: status("offline", "shutdown", clock()),
        max_queue=b.max_queue,
        protocol=b.protocol,
    )


#: Seconds after which a shutdown that has not finished logs what it is waiting for.
SLOW_SHUTDOWN = 5.0
#: Seconds from SIGTERM (or a core task's failure) to the end of the process, whatever a
#: task does: the publishers' grace, the outbox's last commit and a margin. Past it the
#: loop watch ends the process (exit code 70); systemd's TimeoutStopSec is longer.
SHUTDOWN_DEADLINE = 10.0


#: Seconds the listeners, devices and ticker get to end when cancelled at shutdown.
STOP_TASKS_WITHIN = 3.0


async def finish(tasks: Sequence[asyncio.Task[Any]], within: float) -> None:
    """Cancel ``tasks`` and wait until they end, cancelling again those that swallowed it.

    On Python 3.11 a cancel that lands as a library's ``wait_for`` completes can be lost
    (seen in aiomqtt's message iteration): the task then waits on as if nothing happened.
    Repeating the cancel every half second ends it; past ``within`` the rest are left to the
    shutdown deadline, with a warning naming them.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning("gateway.tasks_not_stopping", tasks=sorted(t.get_name() for t in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(0.5, left))


async def _report_slow_shutdown() -> None:
    """Log the tasks a shutdown still waits for, with where each one is stuck."""
    await asyncio.sleep(SLOW_SHUTDOWN)
    me = asyncio.current_task()
    pending = []
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        frames = task.get_stack(limit=3)
        where = [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}" for f in frames]
        pending.append(f"{task.get_name()} at {' > '.join(where)}")
    log.warning("gateway.shutdown_slow", after_s=SLOW_SHUTDOWN, waiting_for=pending)


def batch_topic(topics: Topics) -> str:
    """Topic of CloudEvents batches (``application/cloudevents-batch+json``) of a gateway."""
    return f"{topics.prefix}/{topics.site}/gateway/{topics.gateway_id}/batch"


def outbox_plan(plan: GatewayPlan) -> OutboxPlan:
    """The plan's outbox settings (a plan built by hand gets ``./var``)."""
    if plan.outbox is not None:
        return plan.outbox
    from pathlib import Path

    return OutboxPlan(Path("var") / "shopfloor-outbox.db", 1_000_000, 5.0)


def destinations(plan: GatewayPlan) -> tuple[DestinationPlan, ...]:
    """The plan's destinations (a plan built by hand: its broker as ``default``)."""
    if plan.destinations:
        return plan.destinations
    from gateway.core.routing import Route

    return (DestinationPlan("default", plan.broker, Route("default")),)


#: Reconnect delays of a device: a device that is back is read again within 31 s at worst.
#: Equal jitter (15..30 s once at the cap) keeps a whole floor that is down, e.g. 500
#: machines switched off for the weekend, at 22 attempts a second instead of 33, and the
#: long waits end on whole seconds so those attempts share wake-ups (``aligned``).
DEVICE_BACKOFF = Backoff(base=0.5, cap=30.0, jitter=0.5)


class Gateway:
    """The running daemon for one compiled config."""

    def __init__(
        self,
        plan: GatewayPlan,
        *,
        clock: Clock = time.time,
        backoff: Backoff | None = None,
        shutdown_grace: float = 3.0,
        rng: random.Random | None = None,
        watch: LoopWatch | None = None,
    ) -> None:
        self.plan = plan
        #: Event-loop lag, stall reports and the hard shutdown deadline (``shopfloor run``).
        self.watch = watch
        #: Tasks the gateway cannot work without, by name; one that ends by itself while
        #: running makes the gateway unready (and, with an error, ends it).
        self._core: dict[str, asyncio.Task[Any]] = {}
        self._stopping = False
        self._clock = clock
        self._backoff = backoff or DEVICE_BACKOFF
        self._grace = shutdown_grace
        self._rng = rng or random.Random()
        self.topics = Topics(prefix=plan.topic_prefix, site=plan.site, gateway_id=plan.gateway_id)
        self.started_at = clock()
        self.destinations = destinations(plan)
        ob = outbox_plan(plan)
        sink_names = [SINK_NAME] if plan.influxdb is not None else []
        self.outbox = Outbox(
            ob.path, [d.name for d in self.destinations] + sink_names, max_events=ob.max_events
        )
        secret = (
            plan.redaction_secret.get_secret_value().encode() if plan.redaction_secret else None
        )
        self.publishers: dict[str, MqttPublisher] = {}
        self.queues: dict[str, OutboxQueue] = {}
        for d in self.destinations:
            q = self.outbox.queue(
                d.route,
                clock=clock,
                delayed_after=ob.delayed_after,
                batch_topic=batch_topic(self.topics) if d.route.batch else None,
                secret=secret,
            )
            pub = MqttPublisher(
                broker_settings(plan, self.topics, self.started_at, d, clock),
                name=d.name,
                queue=q,
            )
            q.waker = pub.notify
            self.publishers[d.name] = pub
            self.queues[d.name] = q
        self._secret = secret
        #: The history sink reads the outbox like a destination, so an outage loses nothing.
        self.influx: SinkRunner[Any] | None = None
        self._influx_sinks: list[InfluxSink] = []
        if plan.influxdb is not None:
            iq = self.outbox.record_queue(
                Route(SINK_NAME), clock=clock, delayed_after=ob.delayed_after
            )
            events_sink = InfluxSink(plan.influxdb)
            self._influx_sinks.append(events_sink)
            self.influx = SinkRunner(
                RecordSink(events_sink),
                name=SINK_NAME,
                queue=iq,
                clock=clock,
                settings=settings_for(plan.influxdb),
            )
            iq.waker = self.influx.notify
            self.queues[SINK_NAME] = iq
        #: Telemetry (every read) goes to the history through memory only: in an outage it
        #: is the first thing to give up, as the outbox's overflow policy says.
        self.telemetry: SinkRunner[Any] | None = None
        if plan.influxdb is not None and plan.influxdb.telemetry:
            telemetry_sink = InfluxSink(plan.influxdb)
            self._influx_sinks.append(telemetry_sink)
            # Bounded in count and bytes: a history database slower than the load loses
            # its oldest telemetry first (counted), never an event, never a poll.
            self.telemetry = SinkRunner(
                telemetry_sink,
                name=f"{SINK_NAME}.telemetry",
                clock=clock,
                settings=settings_for(plan.influxdb),
            )
        self.metrics = Metrics(
            gateway_id=plan.gateway_id,
            started_at=self.started_at,
            clock=clock,
            max_pending_age=plan.health_max_pending_age,
        )
        self.metrics.dead_tasks = self.dead_tasks
        if watch is not None:
            self.metrics.loop_stalled = lambda: not watch.healthy()
        self.metrics.configure(m.id for m in plan.machines)
        for name, queue in self.queues.items():
            queue.on_delivered = self.metrics.delivery(name).observe
        self._sinks = frozenset(sink_names)
        # Every destination and sink when no destination filters events (the common case:
        # no per-event routing then); None when some do.
        self._everywhere: frozenset[str] | None = (
            frozenset(d.name for d in self.destinations) | self._sinks
            if all(d.route.rules == RouteRules() for d in self.destinations)
            else None
        )
        self._outbox_limit = ob.max_events
        #: What the web console shows: a bounded copy of recent state, events and values.
        self.feed = ConsoleFeed()
        self.feed.configure(m.id for m in plan.machines)
        self.health: HealthServer | None = (
            HealthServer(self.metrics, *plan.health_listen, console=self if plan.console else None)
            if plan.health_listen
            else None
        )
        self.notifier = Notifier()
        #: The first destination's publisher.
        self.publisher = self.publishers[self.destinations[0].name]
        self._customers: dict[str, dict[str, str | None]] = {}
        self._status_sent: dict[str, int] = {}
        #: The order as a tag of the telemetry history (a series per order) or a field.
        self._order_tag = plan.influxdb is not None and plan.influxdb.order_tag
        self.machines: dict[str, _Machine] = {m.id: self._new_machine(m) for m in plan.machines}
        self.events_emitted = 0
        #: Where each machine lives; shared with the command listener and kept current.
        self.locations: dict[str, Location] = {m.id: m.location for m in plan.machines}
        #: One command listener per destination that takes commands (the config allows one
        #: owner per machine and broker): each platform sends its commands to its own broker,
        #: and each is held to its destination's routing rules.
        self.listeners = [
            CommandListener(
                broker_settings(plan, self.topics, self.started_at, d),
                self.topics,
                self.locations,
                self,
                clock=clock,
                rules=d.route.rules,
                name=d.name,
            )
            for d in self.destinations
            if d.commands
        ]
        #: The first command listener; ``None`` when no destination takes commands.
        self.commands: CommandListener | None = self.listeners[0] if self.listeners else None
        self._tg: asyncio.TaskGroup | None = None
        self._device_tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_requested = asyncio.Event()

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        log.info(
            "gateway.starting",
            gateway_id=self.plan.gateway_id,
            version=__version__,
            machines=len(self.machines),
            destinations=[f"{d.name}={d.broker.host}:{d.broker.port}" for d in self.destinations],
            outbox=str(self.outbox.path),
        )
        for warning in self.plan.warnings:
            log.warning("config.insecure", detail=warning)
        await self.outbox.open()
        self.metrics.set_outbox_writable(True)
        # Destinations are "buffering within limits" until their first connect: the
        # health check is ready from the start, as the outbox holds what they miss.
        self._report(self._clock())
        restored = self._restore_trackers()
        publisher_tasks: list[asyncio.Task[None]] = []
        if self.health is not None:
            try:
                await self.health.start()
            except OSError as exc:
                # Health is for operators; a taken port must not keep the machines dark.
                log.warning("health.listen_failed", error=str(exc), listen=self.plan.health_listen)
                self.health = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.watch is not None:
                    self.watch.start()
                    self._core_task(tg.create_task(self.watch.run(), name="loop-watch"))
                # Not supervised: a failing outbox ends the TaskGroup and the gateway.
                outbox_task = self._core_task(tg.create_task(self.outbox.run(), name="outbox"))
                for q in self.queues.values():
                    q.start()
                publisher_tasks = [
                    self._core_task(asyncio.create_task(pub.run(), name=f"publisher[{name}]"))
                    for name, pub in self.publishers.items()
                ]
                for runner in (self.influx, self.telemetry):
                    if runner is not None:
                        publisher_tasks.append(
                            self._core_task(asyncio.create_task(runner.run(), name=runner.name))
                        )
                for machine in restored:
                    # The last run may have died before its latest state went out.
                    m = self.machines[machine]
                    self._publish_state(m, m.tracker.snapshot(), self._clock())
                for m in self.machines.values():
                    self._start_device(m)
                ticker = self._core_task(tg.create_task(self._tick(), name="ticker"))
                listeners = [
                    self._core_task(tg.create_task(c.run(), name=f"commands[{c.name}]"))
                    for c in self.listeners
                ]
                reloader = self._core_task(tg.create_task(self._reloader(), name="reloader"))
                # The watchdog is fed only while the gateway is healthy: a stalled loop or a
                # dead core task stops the pings, and systemd restarts the service.
                keepalive = tg.create_task(
                    self.notifier.keepalive(self.metrics.status_line, healthy=self.alive),
                    name="watchdog",
                )
                self.notifier.ready(self.metrics.status_line())
                # Everything built at start-up (modules, config, plans) lives as long as the
                # process: keep it out of the cyclic collector's full passes, which would
                # otherwise walk all of it every few minutes and stall the loop for tens of ms.
                gc.freeze()
                await stop.wait()
                self._stopping = True
                if self.watch is not None:
                    self.watch.arm(SHUTDOWN_DEADLINE, "shutdown")
                log.info("gateway.stopping")
                slow = asyncio.create_task(_report_slow_shutdown(), name="shutdown-watch")
                self.notifier.stopping()
                keepalive.cancel()
                # Stop taking orders and config changes first, then stop the devices.
                await finish([reloader, *listeners], STOP_TASKS_WITHIN)
                await finish([*self._device_tasks.values(), ticker], STOP_TASKS_WITHIN)
                # Everything the trackers emitted is committed before the publishers' grace.
                await self.outbox.flush()
                await self._close_publishers(publisher_tasks)
                await self.outbox.flush()
                outbox_task.cancel()
                if "loop-watch" in self._core:
                    self._core["loop-watch"].cancel()
        finally:
            self._stopping = True
            for m in self.machines.values():
                if m.status.connected:
                    m.status.connected = False
            await self._close_publishers(publisher_tasks)
            await self.outbox.close()
            for sink in self._influx_sinks:
                with contextlib.suppress(Exception):
                    sink.close()
            if self.health is not None:
                await self.health.close()
            self.notifier.close()
            if "slow" in locals():
                slow.cancel()
            log.info(
                "gateway.stopped",
                events=self.events_emitted,
                unsent={n: self.outbox.backlog(n) for n in self.publishers},
            )

    def _core_task(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Track a task the gateway cannot work without (see :meth:`dead_tasks`)."""
        self._core[task.get_name()] = task
        task.add_done_callback(self._core_task_done)
        return task

    def _core_task_done(self, task: asyncio.Task[Any]) -> None:
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        if error is None:
            log.error("gateway.task_ended", task=task.get_name())
            return
        # The task group now cancels everything and the gateway exits with the error;
        # a task that swallows its cancel must not keep the process alive for ever.
        log.error(
            "gateway.task_failed",
            task=task.get_name(),
            error=f"{type(error).__name__}: {error}",
            deadline_s=SHUTDOWN_DEADLINE,
        )
        if self.watch is not None:
            self.watch.arm(SHUTDOWN_DEADLINE, f"task {task.get_name()} failed")

    def dead_tasks(self) -> list[str]:
        """Core tasks that ended although the gateway was not stopping (for readiness)."""
        if self._stopping:
            return []
        return [name for name, task in self._core.items() if task.done()]

    def alive(self) -> bool:
        """Whether the systemd watchdog may be fed: the loop turns, no core task ended."""
        if self.watch is not None and not self.watch.healthy():
            return False
        return not self.dead_tasks()

    async def _close_publishers(self, tasks: list[asyncio.Task[None]]) -> None:
        # Destinations flush in parallel: one dead broker does not eat another's grace.
        closing = [pub.close(timeout=self._grace) for pub in self.publishers.values()]
        for runner in (self.influx, self.telemetry):
            if runner is not None:
                closing.append(runner.close(self._grace))
        await asyncio.gather(*closing, return_exceptions=True)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _restore_trackers(self) -> list[str]:
        restored: list[str] = []
        for machine, m in self.machines.items():
            state = self.outbox.trackers.get(machine)
            if state is None:
                # An unreadable state: never hand out a sequence its stored events used.
                last = self.outbox.recovered_sequences.get(machine)
                if last:
                    m.tracker = _tracker_at(machine, m.plan.tracker, last)
                    log.warning("tracker.sequence_recovered", machine=machine, sequence=last)
                continue
            try:
                m.tracker = MachineTracker.restore(machine, m.plan.tracker, state)
            except ValueError as exc:
                log.error("tracker.restore_failed", machine=machine, error=str(exc))
                last = state.get("sequence")
                if type(last) is int and last > 0:
                    m.tracker = _tracker_at(machine, m.plan.tracker, last)
                continue
            self._learn_customers(machine, state)
            restored.append(machine)
            log.info("tracker.restored", machine=machine, sequence=m.tracker.sequence)
        return restored

    def _learn_customers(self, machine: str, state: dict[str, Any]) -> None:
        """Remember which customer assigned which order (the tracker state knows).

        Every order the tracker still holds (the current one and the whole queue) keeps its
        customer, or its events would stop reaching its platform; only finished orders are
        forgotten, the oldest first, beyond :data:`_FINISHED_CUSTOMERS`.
        """
        known = self._customers.setdefault(machine, {})
        order = state.get("order")
        orders = [order] if isinstance(order, dict) else []
        orders += [q for q in state.get("queue") or [] if isinstance(q, dict)]
        live: dict[str, str | None] = {}
        for o in orders:
            order_id = o.get("order_id")
            if isinstance(order_id, str):
                customer = o.get("customer")
                live[order_id] = customer if isinstance(customer, str) else None
        for order_id in live:
            known.pop(order_id, None)
        # What is left is finished (late events of those still route), oldest first.
        for _ in range(len(known) - _FINISHED_CUSTOMERS):
            del known[next(iter(known))]
        known.update(live)

    def backlog(self) -> dict[str, int]:
        """Events stored per destination and not yet acknowledged by its broker."""
        return {name: self.outbox.backlog(name) for name in self.publishers}

    # ------------------------------------------------------------------ reload

    def request_reload(self) -> None:
        """Ask for the config file to be read again (SIGHUP, ``systemctl reload``)."""
        self._reload_requested.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            # What the old config leaves behind must be collectable again (see run()).
            gc.unfreeze()
            await self.reload()
            gc.freeze()

    def _start_device(self, m: _Machine) -> None:
        assert self._tg is not None
        self._device_tasks[m.plan.id] = self._tg.create_task(
            self._supervise(m), name=f"device[{m.plan.id}]"
        )

    async def _stop_device(self, machine: str) -> None:
        task = self._device_tasks.pop(machine, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def reload(self) -> bool:
        """Apply a changed config file; an invalid one is refused and the old one keeps running.

        Machines added, removed or changed are started, stopped or restarted; untouched ones
        keep running without a gap. A changed machine keeps its tracker, so an order in
        progress continues with its counts. Gateway identity and broker settings cannot
        change at runtime (topics and sessions hang on them): such changes are logged and
        wait for a restart, and the rest of the new config is applied.
        """
        self.notifier.reloading()
        try:
            new = await asyncio.to_thread(load_config, self.plan.source)
        except ConfigError as exc:
            self.notifier.ready(self.metrics.status_line())
            log.error(
                "config.reload_rejected",
                problems=[str(e) for e in exc.errors],
                detail="the running config stays in force; fix the file and reload again",
            )
            self.feed.reloaded(self._clock(), False, [str(e) for e in exc.errors])
            return False
        except Exception as exc:  # an unreadable file must not stop the gateway
            self.notifier.ready(self.metrics.status_line())
            log.error("config.reload_rejected", problems=[f"{type(exc).__name__}: {exc}"])
            self.feed.reloaded(self._clock(), False, [f"{type(exc).__name__}: {exc}"])
            return False
        frozen = [
            name
            for name in (
                "gateway_id",
                "site",
                "topic_prefix",
                "broker",
                "destinations",
                "outbox",
                "redaction_secret",
            )
            if getattr(new, name) != getattr(self.plan, name)
        ]
        if frozen:
            log.warning("config.reload_needs_restart", fields=frozen)
            new = replace(
                new,
                gateway_id=self.plan.gateway_id,
                site=self.plan.site,
                topic_prefix=self.plan.topic_prefix,
                broker=self.plan.broker,
                destinations=self.plan.destinations,
                outbox=self.plan.outbox,
                redaction_secret=self.plan.redaction_secret,
            )
        old = {m.id: m for m in self.plan.machines}
        fresh = {m.id: m for m in new.machines}
        removed = sorted(old.keys() - fresh.keys())
        added = sorted(fresh.keys() - old.keys())
        changed = sorted(k for k in old.keys() & fresh.keys() if old[k] != fresh[k])
        now = self._clock()
        for machine in [*removed, *changed]:
            await self._stop_device(machine)
        for machine in removed:
            m = self.machines.pop(machine)
            del self.locations[machine]
            self._emit(m, m.tracker.connection(False, now, "removed from config"))
            # An empty retained message deletes the snapshot: late joiners must not see a
            # machine that no longer exists.
            self._clear_state(m.plan.id, m.plan.location)
        for machine in changed:
            m = self.machines[machine]
            plan = fresh[machine]
            if plan.tracker != m.plan.tracker:
                # Rebuilt with new settings while running: nothing went unobserved.
                m.tracker = MachineTracker.restore(
                    machine, plan.tracker, m.tracker.export_state(), downtime=False
                )
            if plan.location != m.plan.location:
                self._clear_state(machine, m.plan.location)
                self.locations[machine] = plan.location
            m.plan = plan
            m.refresh_derived()
            m.mapper = Mapper(plan.signals)
            m.problems_logged.clear()
            m.rejections_logged.clear()
            self._start_device(m)
        for machine in added:
            plan = fresh[machine]
            m = self._new_machine(plan)
            self.machines[machine] = m
            self.locations[machine] = plan.location
            self._start_device(m)
        self.plan = new
        self.metrics.configure(fresh)
        self.feed.configure(fresh)
        self.feed.reloaded(now, True, [f"needs a restart: {f}" for f in frozen])
        self.notifier.ready(self.metrics.status_line())
        log.info(
            "config.reloaded",
            added=added,
            removed=removed,
            changed=changed,
            unchanged=len(fresh) - len(added) - len(changed),
        )
        return True

    async def _tick(self) -> None:
        last_status = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            for m in self.machines.values():
                self._emit(m, m.tracker.tick(now))
            self._report(now)
            if now - last_status >= STATUS_INTERVAL:
                last_status = now
                self._publish_status(now)

    def _report(self, now: float) -> None:
        """Destination figures into the metrics (once a second)."""
        # A full disk holds events in memory: not ready until the outbox has room again.
        self.metrics.set_outbox_writable(not self.outbox.disk_full)
        stats = self.outbox.stats
        self.metrics.outbox_dropped(stats.dropped_telemetry, stats.dropped_progress)
        for name, pub in self.publishers.items():
            queue = self.queues[name]
            self.metrics.destination_state(
                name,
                connected=pub.connected,
                backlog=self.outbox.backlog(name),
                oldest_age=self._oldest_age(queue, now),
                published_total=pub.published,
                dropped_total=pub.dropped,
                limit=self._outbox_limit,
            )
        for c in self.listeners:
            self.metrics.commands_dropped(c.name, rate=c.dropped, inbox=c.inbox_dropped)
        for runner in (self.influx, self.telemetry):
            if runner is not None:
                runner.report(self.metrics)
        if self.watch is not None:
            self.metrics.loop_lag(self.watch.take_worst_lag(), self.watch.stalls)

    @staticmethod
    def _oldest_age(queue: OutboxQueue, now: float) -> float | None:
        created = queue.oldest_created()
        return None if created is None else max(0.0, now - created)

    def _publish_status(self, now: float) -> None:
        """Refresh the retained online status when a destination's backlog changed."""
        for name, pub in self.publishers.items():
            backlog = self.outbox.backlog(name)
            if self._status_sent.get(name) == backlog:
                continue
            self._status_sent[name] = backlog
            payload = encode_status(
                "online",
                gateway_id=self.plan.gateway_id,
                version=__version__,
                started_at=self.started_at,
                now=now,
                extra={**self.metrics.summary(now), "backlog": backlog},
            )
            pub.submit(Message(self.topics.status(), payload, 1, True))

    def _new_machine(self, plan: MachinePlan) -> _Machine:
        """A machine's runtime state; its history line never carries personal signals."""
        return _Machine(
            plan,
            MachineTracker(plan.id, plan.tracker),
            Mapper(plan.signals),
            telemetry_line=TelemetryLine(PERSONAL_SIGNALS, order_tag=self._order_tag),
        )

    async def _supervise(self, m: _Machine) -> None:
        plan = m.plan
        episode = _Episode()
        # Spread the polls of many devices over one interval in slots, so a hundred devices
        # do not hit the network in lockstep but those sharing a slot share one wake-up of
        # the event loop; stable per machine id.
        offset = poll_phase(plan.id, plan.poll_interval)
        bound = log.bind(machine=plan.id)
        # One adapter for the machine's lifetime, re-entered on every reconnect: it keeps
        # what it learned about the device (e.g. blocks the device refused to read whole).
        adapter = adapter_registry.create(
            plan.protocol.name, plan.id, plan.connection, plan.signals, plan.poll_interval, offset
        )
        while True:
            try:
                async with adapter:
                    answered = False
                    async for batch in adapter.samples():
                        if not answered:
                            # Connected means "answers", not "accepts TCP": a hung PLC
                            # that takes the connection but never replies stays offline
                            # instead of flapping on every reconnect.
                            answered = True
                            self._connected(m, True, "connected")
                            if episode.failing_since is not None:
                                bound.info(
                                    "device.reachable",
                                    outage_s=round(self._clock() - episode.failing_since, 1),
                                    attempts=episode.attempts,
                                )
                            episode = _Episode()
                        acq = getattr(adapter, "acquisition", None)
                        self._on_batch(
                            m, batch, notification=acq is not None and acq.kind == "notification"
                        )
                        if acq is not None:
                            self.metrics.device_poll_timing(
                                plan.id, acq.seconds, acq.missed_deadlines
                            )
                        # Not kept while the adapter waits for the next poll (see
                        # ModbusAdapter.samples: young samples make the collector's passes long).
                        del batch
                        task = asyncio.current_task()
                        if task is not None and task.cancelling():
                            # Python 3.11's wait_for (inside the device libraries) can
                            # swallow a cancel that coincides with a reply; honour it.
                            raise asyncio.CancelledError
                raise ConnectionLost("the adapter stopped yielding samples")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A library turned the shutdown's cancel into its own error while
                    # cleaning up; retrying would keep this device alive past shutdown.
                    raise asyncio.CancelledError from exc
                reason = self._failure(bound, exc)
            m.status.read_errors += 1
            self.metrics.device_polled(plan.id, False)
            self._connected(m, False, reason)
            if episode.failing_since is None:
                episode.failing_since = self._clock()
                episode.causes.add(reason)
                bound.warning("device.unreachable", error=reason)
            elif reason not in episode.causes and len(episode.causes) < _CAUSES_LOGGED:
                # The device answers differently now (e.g. it is back but refuses the
                # gateway's certificate): the operator needs the new cause, once.
                episode.causes.add(reason)
                bound.warning("device.unreachable_cause", error=reason, attempts=episode.attempts)
            else:
                bound.debug("device.still_unreachable", error=reason, attempts=episode.attempts)
            delay = self._backoff.delay(episode.attempts, self._rng)
            episode.attempts += 1
            await asyncio.sleep(aligned(asyncio.get_running_loop().time(), delay))

    @staticmethod
    def _failure(bound: Any, exc: Exception) -> str:
        """What went wrong with a device, in words; a bug is logged with its traceback."""
        if isinstance(exc, ConnectError | ConnectionLost):
            return str(exc) or type(exc).__name__
        if isinstance(exc, AdapterError):
            return f"{type(exc).__name__}: {exc}"
        # A bug must not take the other devices down: log it, treat it as an outage.
        reason = f"unexpected {type(exc).__name__}: {exc}"
        bound.exception("device.task_failed", error=reason)
        return reason

    def apply_command(self, machine: str, command: Command, now: float) -> CommandResult:
        """Run a platform command on a machine's tracker and publish what it caused."""
        m = self.machines.get(machine)
        if m is None:
            return CommandResult(False, f"unknown machine {machine}")
        result, events = m.tracker.command(command, now)
        # Persist even without events: a queued platform order must survive a restart.
        self._emit(m, events, persist=True)
        return result

    def customer_of(self, machine: str, order_id: str) -> str | None:
        """The customer an order on a machine was assigned for (``None``: none or unknown)."""
        return self._customers.get(machine, {}).get(order_id)

    def queued_orders(self, machine: str) -> list[tuple[str, str | None]]:
        """The platform orders waiting on a machine (for the web console)."""
        m = self.machines.get(machine)
        return m.tracker.queued_orders() if m is not None else []

    def snapshot(self, machine: str) -> dict[str, Any] | None:
        """A machine's current tracker snapshot (for the web console); ``None``: unknown."""
        m = self.machines.get(machine)
        return m.tracker.snapshot() if m is not None else None

    def delivery_errors(self) -> dict[str, str | None]:
        """The last error of each destination and sink (for the web console)."""
        errors: dict[str, str | None] = {n: p.last_error for n, p in self.publishers.items()}
        for runner in (self.influx, self.telemetry):
            if runner is not None:
                errors[runner.name] = runner.last_error
        return errors

    def in_flight(self) -> dict[str, int]:
        """Events handed to each destination and sink, not yet acknowledged (web console)."""
        return {name: queue.in_flight for name, queue in self.queues.items()}

    def console_rules(self) -> tuple[RouteRules, str]:
        """The routing rules console commands are held to (``health.commands_as``)."""
        scope = self.plan.console_scope
        for d in self.destinations:
            if d.name == scope:
                return d.route.rules, d.name
        return RouteRules(), "console"

    def _connected(self, m: _Machine, connected: bool, reason: str) -> None:
        m.status.connected = connected
        self.metrics.device_connected(m.plan.id, connected)
        self._emit(m, m.tracker.connection(connected, self._clock(), reason))

    def _on_batch(
        self, m: _Machine, batch: Sequence[Sample], *, notification: bool = False
    ) -> None:
        m.status.polls += 1
        now = self._clock()
        m.status.last_sample_at = now
        if len(batch) >= len(m.plan.signals) and all(s[4] is not Quality.GOOD for s in batch):
            # A poll in which no signal could be read (a device answering every read with
            # an exception) is a failed read, even though the device answered.
            m.status.read_errors += 1
            self.metrics.device_polled(m.plan.id, False)
        else:
            self.metrics.device_polled(m.plan.id, True, now, notification=notification)
        mapped, problems = m.mapper.apply(batch)
        for p in problems:
            # Once per signal until it maps cleanly again: a wrong map would otherwise log
            # every poll.
            if p.signal not in m.problems_logged:
                m.problems_logged.add(p.signal)
                log.warning(
                    "device.value_rejected",
                    machine=m.plan.id,
                    signal=p.signal,
                    value=repr(p.value),
                    reason=p.reason,
                )
        if m.problems_logged:
            bad = {p.signal for p in problems}
            for signal in list(m.problems_logged - bad):
                m.problems_logged.discard(signal)
                log.info("device.value_accepted", machine=m.plan.id, signal=signal)
        if m.derived_state is not None:
            mapped.append(m.derived_state.observe(mapped, now))
        self.feed.samples(m.plan.id, mapped)
        self._emit(m, m.tracker.observe(mapped, now))
        rejections = m.tracker.drain_rejections()
        if rejections or m.rejections_logged:
            self._log_rejections(m, rejections)
            if rejections:
                self.metrics.counter_readings_rejected(m.plan.id, m.tracker.rejected_total)
        if self.telemetry is not None:
            line = m.telemetry_line.line(m.plan.location, mapped, m.tracker.order_id)
            if line is not None:
                self.telemetry.submit(line)

    @staticmethod
    def _log_rejections(m: _Machine, rejections: Sequence[Rejection]) -> None:
        """Warn once per signal and episode, like the mapping's problems."""
        rejected = set()
        for r in rejections:
            rejected.add(r.signal)
            if r.signal not in m.rejections_logged:
                m.rejections_logged.add(r.signal)
                log.warning(
                    "tracker.value_rejected",
                    machine=m.plan.id,
                    signal=r.signal,
                    value=r.value,
                    reason=r.reason,
                )
        m.rejections_logged &= rejected

    def _emit(self, m: _Machine, events: Sequence[Event], *, persist: bool = False) -> None:
        """Commit events with the tracker state (outbox), then refresh the retained state."""
        if not events and not persist:
            return
        loc = m.plan.location
        machine = m.plan.id
        state = m.tracker.export_state()
        self._learn_customers(machine, state)
        customers = self._customers.get(machine, {})
        gateway_id = self.plan.gateway_id
        epoch = self.outbox.epoch or None
        everywhere = self._everywhere
        created = self._clock()
        debug = _debug_enabled()
        entries: list[Entry] = []
        # The plain CloudEvents encoding of each record: made here so that an event that
        # cannot be encoded fails where it is emitted, and kept for the destinations, which
        # would make the same bytes on read.
        encoded: list[bytes] = []
        for event in events:
            order_id = event.data.get("order_id")
            order_id = order_id if isinstance(order_id, str) else None
            customer = customers.get(order_id or "")
            record = Record(
                machine,
                event.type,
                loc,
                event.sequence,
                event.time,
                event.data,
                new_event_id(event.time, self._rng.getrandbits(74)),
                gateway_id,
                epoch,
                order_id,
                customer,
            )
            encoded.append(wire_payload(record))
            if everywhere is not None:
                names = everywhere
            else:
                subject = Subject(machine, "event", event.type, order_id, customer)
                names = (
                    frozenset(d.name for d in self.destinations if accepts(d.route.rules, subject))
                    | self._sinks
                )
            entries.append(
                Entry(
                    machine=machine,
                    topic=self.topics.event(loc, event.type),
                    payload=b"",
                    destinations=names,
                    event_type=event.type,
                    order_id=order_id,
                    created=created,
                    record=record,
                )
            )
            self.metrics.event_emitted(event.type)
            if debug:
                log.debug(
                    "event.emitted",
                    machine=machine,
                    type=event.type,
                    sequence=event.sequence,
                    order_id=order_id,
                )
        self.events_emitted += len(events)
        seqs = self.outbox.append(entries, {machine: state})
        if len(seqs) == len(encoded):
            prime = self.outbox.encodings.prime
            for seq, payload in zip(seqs, encoded, strict=True):
                prime(seq, payload)
        if events:
            self.feed.events(machine, events)
            self._publish_state(m, m.tracker.snapshot(), events[-1].time)

    def _publish_state(self, m: _Machine, snapshot: dict[str, Any], now: float) -> None:
        """Retained state to every destination that may see the machine, order filtered."""
        loc = m.plan.location
        order = snapshot.get("order")
        order_id = order.get("order_id") if isinstance(order, dict) else None
        customer = self._customers.get(m.plan.id, {}).get(order_id) if order_id else None
        topic = self.topics.state(loc)
        # Order-scoped destinations count only the waiting orders they may see.
        queue = m.tracker.queued_orders() if self._everywhere is None else None
        gateway_id = self.plan.gateway_id
        # Destinations that see the whole snapshot (the common case: all) share one encoding,
        # and one per operator policy when the snapshot names an operator.
        plain: bytes | None = None
        redacted: dict[str, bytes] = {}
        for d in self.destinations:
            if not machine_visible(d.route.rules, m.plan.id):
                continue
            view = state_view(d.route.rules, snapshot, customer, queue)
            whole = view is snapshot
            if not whole:
                payload = encode_state(view, loc, gateway_id=gateway_id, now=now)
            elif plain is None:
                payload = plain = encode_state(view, loc, gateway_id=gateway_id, now=now)
            else:
                payload = plain
            policy = d.route.operator
            if policy != "pass" and b'"operator' in payload:
                # Redaction acts on the typed snapshot, before it is encoded.
                if whole and policy in redacted:
                    payload = redacted[policy]
                else:
                    typed = redact(view, policy, self._secret)
                    payload = encode_state(typed, loc, gateway_id=gateway_id, now=now)
                    if whole:
                        redacted[policy] = payload
            self.publishers[d.name].submit(Message(topic, payload, 1, True))

    def _clear_state(self, machine: str, loc: Location) -> None:
        for d in self.destinations:
            if machine_visible(d.route.rules, machine):
                self.publishers[d.name].submit(Message(self.topics.state(loc), b"", 1, True))


#: The stdlib logger behind ``log``: its level decides whether a debug line goes anywhere.
_stdlog = logging.getLogger(__name__)


def _tracker_at(machine: str, settings: TrackerSettings, sequence: int) -> MachineTracker:
    """A fresh tracker whose next event takes ``sequence + 1`` (its state was lost)."""
    state = MachineTracker(machine, settings).export_state()
    return MachineTracker.restore(machine, settings, {**state, "sequence": sequence})


def _debug_enabled() -> bool:
    """Whether this module's debug lines are wanted (checked before building one per event)."""
    return _stdlog.isEnabledFor(logging.DEBUG)
