"""The imperative shell: builds the gateway's parts from a plan, runs them, stops them in order.

Task layout (one root ``asyncio.TaskGroup``)::

    outbox               commits events with their tracker state (SQLite, worker thread)
    publisher[<name>]    one per output (:mod:`gateway.delivery.registry`: MQTT destinations,
                         the history): one runner each, feeding its outbox queue or memory
    <observer tasks>     what an output's observer starts (a Sparkplug B node's session)
    device[<id>]         one supervisor per machine: connect, read, map, track, emit
    ticker               time-driven tracker work (progress interval, ETA) once a second
    commands             the downlink: order commands from platforms
    health               /healthz, /metrics and the web console on a local port (aiohttp);
                         sd_notify watchdog pings

The parts live in their own modules; this one only builds and connects them:
:mod:`gateway.runtime.devices` supervises the devices, :mod:`gateway.runtime.emitter` encodes,
routes and commits their events, :mod:`gateway.runtime.retained` publishes each machine's
retained state per destination, and :mod:`gateway.runtime.reload` applies a changed config.
At start the trackers are restored from the outbox, so sequences continue and nothing
committed is lost. The outbox is not supervised: if SQLite fails, the gateway stops with an
error and systemd restarts it.

Shutdown order (SIGTERM/SIGINT): stop the devices first, let the trackers emit what they
have, then give the publishers a grace period to flush and publish the offline status.
Whatever a broker did not acknowledge by then stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from gateway import __version__
from gateway.config.loader import GatewayPlan, OutboxPlan
from gateway.contract.envelope import Topics, encode_status
from gateway.core.backoff import Backoff
from gateway.core.model import Location
from gateway.core.routing import RouteRules
from gateway.core.tracker import CommandResult
from gateway.delivery import registry as output_registry
from gateway.delivery.mqtt.output import broker_settings, destinations
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.outbox import Outbox, OutboxQueue
from gateway.delivery.registry import Output, Wiring
from gateway.delivery.sink import SinkRunner
from gateway.runtime.commands import Command, CommandListener
from gateway.runtime.console.feed import ConsoleFeed
from gateway.runtime.devices import DEVICE_BACKOFF, Devices
from gateway.runtime.emitter import Customers, Emitter, everywhere
from gateway.runtime.health import HealthServer
from gateway.runtime.loopwatch import LoopWatch
from gateway.runtime.metrics import Metrics
from gateway.runtime.reload import reload as reload_config
from gateway.runtime.retained import RetainedState
from gateway.runtime.systemd import Notifier
from shopfloor_gateway.adapters import registry as adapter_registry

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


#: How often the retained status is refreshed with the outbox backlog, in seconds.
STATUS_INTERVAL = 10.0


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


def outbox_plan(plan: GatewayPlan) -> OutboxPlan:
    """The plan's outbox settings (a plan built by hand gets ``./var``)."""
    if plan.outbox is not None:
        return plan.outbox
    from pathlib import Path

    return OutboxPlan(Path("var") / "shopfloor-outbox.db", 1_000_000, 5.0)


class Gateway:
    """The running daemon for one compiled config.

    Longer than 300 lines on purpose: ``__init__`` wires every part in dependency order (most
    of it the destinations and the history sink), and ``run`` keeps the start and stop order
    in one place, where it can be read top to bottom. The rest is the small interface the
    console and the command listeners call (``apply_command``, ``snapshot``, ...).
    """

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
        self.clock = clock
        self._backoff = backoff or DEVICE_BACKOFF
        self._grace = shutdown_grace
        self._rng = rng or random.Random()
        self.topics = Topics(prefix=plan.topic_prefix, site=plan.site, gateway_id=plan.gateway_id)
        self.started_at = clock()
        self.destinations = destinations(plan)
        ob = outbox_plan(plan)
        self.outbox = Outbox(ob.path, output_registry.positions(plan), max_events=ob.max_events)
        secret = (
            plan.redaction_secret.get_secret_value().encode() if plan.redaction_secret else None
        )
        #: Every output (MQTT destinations, the history, Sparkplug B edge nodes, ...), built
        #: through the registry.
        self.outputs: dict[str, Output] = {
            o.name: o
            for o in output_registry.build(
                Wiring(
                    plan=plan,
                    outbox=self.outbox,
                    topics=self.topics,
                    started_at=self.started_at,
                    clock=clock,
                    secret=secret,
                    delayed_after=ob.delayed_after,
                    outbox_limit=ob.max_events,
                )
            )
        }
        #: Every output's runner, by name (outputs that run their own session have none).
        self.publishers: dict[str, SinkRunner[Any]] = {
            name: o.runner for name, o in self.outputs.items() if o.runner is not None
        }
        #: The outbox queue of each output that reads the outbox.
        self.queues: dict[str, OutboxQueue] = {
            name: o.queue for name, o in self.outputs.items() if o.queue is not None
        }
        #: What the outputs learn about the machines besides their events.
        self.observers = output_registry.observers(list(self.outputs.values()))
        for observer in self.observers:
            observer.configure(plan)
        #: Outputs that take the retained status.
        self._status = [o for o in self.outputs.values() if o.accepts("status")]
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
        self._status_sent: dict[str, int] = {}
        #: Which customer assigned which order, for routing.
        self.customers = Customers()
        self.retained = RetainedState(
            gateway_id=plan.gateway_id,
            topics=self.topics,
            outputs=list(self.outputs.values()),
            secret=secret,
            customer_of=self.customers.customer_of,
            routed=everywhere(list(self.outputs.values())) is None,
            observers=self.observers,
        )
        self.emitter = Emitter(
            gateway_id=plan.gateway_id,
            topics=self.topics,
            outputs=list(self.outputs.values()),
            outbox=self.outbox,
            metrics=self.metrics,
            feed=self.feed,
            retained=self.retained,
            customers=self.customers,
            clock=clock,
            rng=self._rng,
        )
        self.devices = Devices(
            metrics=self.metrics,
            feed=self.feed,
            emit=self.emitter.emit,
            clock=clock,
            backoff=self._backoff,
            rng=self._rng,
            outputs=list(self.outputs.values()),
        )
        #: The machines at runtime (the devices' own dict: reload changes it in place).
        self.machines = self.devices.machines
        for mp in plan.machines:
            self.machines[mp.id] = self.devices.new_machine(mp)
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
        restored = self.devices.restore(self.outbox, self.customers.learn)
        self.devices.adapters = adapter_registry.Adapters()
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
                self.devices.tg = tg
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
                for observer in self.observers:
                    publisher_tasks += map(self._core_task, observer.start())
                for machine in restored:
                    # The last run may have died before its latest state went out.
                    m = self.machines[machine]
                    self.retained.publish(m, m.tracker.snapshot(), self._clock())
                for m in self.machines.values():
                    self.devices.start(m)
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
                await finish([*self.devices.tasks.values(), ticker], STOP_TASKS_WITHIN)
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
            self.devices.adapters.close()
            await self._close_publishers(publisher_tasks)
            await self.outbox.close()
            for o in self.outputs.values():
                for release in o.release:
                    with contextlib.suppress(Exception):
                        release()
            if self.health is not None:
                await self.health.close()
            self.notifier.close()
            if "slow" in locals():
                slow.cancel()
            log.info(
                "gateway.stopped",
                events=self.events_emitted,
                unsent=self.backlog(),
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
        closing += [observer.close(self._grace) for observer in self.observers]
        await asyncio.gather(*closing, return_exceptions=True)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    @property
    def events_emitted(self) -> int:
        """Events emitted since start (all machines)."""
        return self.emitter.events_emitted

    def backlog(self) -> dict[str, int]:
        """Events stored per outbox reader and not yet acknowledged by its destination."""
        return {name: self.outbox.backlog(name) for name in self.queues}

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

    async def reload(self) -> bool:
        """Apply a changed config file (see :func:`gateway.runtime.reload.reload`)."""
        return await reload_config(self)

    async def _tick(self) -> None:
        last_status = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            for m in self.machines.values():
                self.emitter.emit(m, m.tracker.tick(now))
            self._report(now)
            if now - last_status >= STATUS_INTERVAL:
                last_status = now
                self._publish_status(now)

    def _report(self, now: float) -> None:
        """Destination figures into the metrics (once a second)."""
        # A full disk holds events in memory: not ready until the outbox has room again.
        self.metrics.set_outbox_writable(not self.outbox.disk_full)
        stats = self.outbox.stats
        self.metrics.outbox_dropped(stats.dropped_progress)
        for name, o in self.outputs.items():
            if o.runner is not None and o.queue is None:
                o.runner.report(self.metrics)
            elif o.runner is not None and o.queue is not None:
                o.runner.report(
                    self.metrics,
                    backlog=self.outbox.backlog(name),
                    oldest_age=self._oldest_age(o.queue, now),
                )
            if o.observer is not None:
                o.observer.report(self.metrics)
        for c in self.listeners:
            self.metrics.commands_dropped(c.name, rate=c.dropped, inbox=c.inbox_dropped)
        if self.watch is not None:
            self.metrics.loop_lag(self.watch.take_worst_lag(), self.watch.stalls)

    @staticmethod
    def _oldest_age(queue: OutboxQueue, now: float) -> float | None:
        created = queue.oldest_created()
        return None if created is None else max(0.0, now - created)

    def _publish_status(self, now: float) -> None:
        """Refresh the retained online status when a destination's backlog changed."""
        for o in self._status:
            name = o.name
            if o.runner is None:
                continue
            backlog = self.outbox.backlog(name) if o.queue is not None else o.runner.pending
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
            o.runner.submit(Message(self.topics.status(), payload, 1, True))

    def apply_command(self, machine: str, command: Command, now: float) -> CommandResult:
        """Run a platform command on a machine's tracker and publish what it caused."""
        m = self.machines.get(machine)
        if m is None:
            return CommandResult(False, f"unknown machine {machine}")
        result, events = m.tracker.command(command, now)
        # Persist even without events: a queued platform order must survive a restart.
        self.emitter.emit(m, events, persist=True)
        return result

    def customer_of(self, machine: str, order_id: str) -> str | None:
        """The customer an order on a machine was assigned for (``None``: none or unknown)."""
        return self.customers.customer_of(machine, order_id)

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
        return {n: p.last_error for n, p in self.publishers.items()}

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
