"""Device supervision: one task per machine that connects, reads, maps and tracks.

A supervisor never lets an ordinary exception escape (a TaskGroup would cancel all siblings):
the first failure of an episode is logged at warning, repeats at debug, the recovery at info
with the episode's length and attempts; reconnects back off with full jitter. A slow or dead
device never delays another: each has its own task, connection and timeouts. What the tracker
makes of a poll goes to the emitter (:mod:`gateway.runtime.emitter`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.config.loader import MachinePlan
from gateway.core.backoff import Backoff, aligned
from gateway.core.derive import StateFromCounts
from gateway.core.mapping import Mapper
from gateway.core.model import Event, Quality, Sample
from gateway.core.tracker import MachineTracker, Rejection, TrackerSettings
from gateway.delivery.outbox import Outbox
from gateway.delivery.registry import Output, TelemetryEncoder, observers
from gateway.delivery.sink import SinkRunner
from gateway.runtime.console.feed import ConsoleFeed
from gateway.runtime.metrics import Metrics
from shopfloor_gateway.adapters import registry as adapter_registry
from shopfloor_gateway.adapters.base import AdapterError, ConnectError, ConnectionLost, poll_phase

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


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
class Machine:
    """One machine at runtime: its plan, tracker, mapper and what is logged about it."""

    plan: MachinePlan
    tracker: MachineTracker
    mapper: Mapper
    status: DeviceStatus = field(default_factory=DeviceStatus)
    problems_logged: set[str] = field(default_factory=set)
    #: Signals whose values the tracker refuses right now (logged once per episode).
    rejections_logged: set[str] = field(default_factory=set)
    #: For machines that map no ``state`` signal: a state derived from the counters.
    derived_state: StateFromCounts | None = None
    #: Each telemetry-taking output's runner with this machine's encoder for it.
    telemetry: list[tuple[SinkRunner[Any], TelemetryEncoder]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.refresh_derived()

    def refresh_derived(self) -> None:
        """Derive a state only when the config maps none (after start and every reload)."""
        if "state" in self.plan.signals:
            self.derived_state = None
        elif self.derived_state is None:
            self.derived_state = StateFromCounts(self.plan.id)


#: Reconnect delays of a device: a device that is back is read again within 31 s at worst.
#: Equal jitter (15..30 s once at the cap) keeps a whole floor that is down, e.g. 500
#: machines switched off for the weekend, at 22 attempts a second instead of 33, and the
#: long waits end on whole seconds so those attempts share wake-ups (``aligned``).
DEVICE_BACKOFF = Backoff(base=0.5, cap=30.0, jitter=0.5)


class Devices:
    """The machines at runtime and one supervisor task per machine."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        feed: ConsoleFeed,
        emit: Callable[[Machine, Sequence[Event]], None],
        clock: Clock,
        backoff: Backoff,
        rng: random.Random,
        outputs: Sequence[Output],
    ) -> None:
        self.metrics = metrics
        self.feed = feed
        #: Where the tracker's events go (:meth:`gateway.runtime.emitter.Emitter.emit`).
        self._emit = emit
        self._clock = clock
        self._backoff = backoff
        self._rng = rng
        #: Outputs that take each poll's values (through memory only: in an outage telemetry
        #: is the first thing to give up, as the outbox's overflow policy says).
        self._telemetry = [o for o in outputs if o.telemetry is not None and o.runner is not None]
        #: Outputs told about every poll and connection change (MQTT tag telemetry, Sparkplug
        #: B edge nodes, ...).
        self._observers = observers(outputs)
        self.machines: dict[str, Machine] = {}
        #: Builds the machines' adapters and owns what they share (the Modbus lines); a new
        #: one per run (:meth:`gateway.runtime.gateway.Gateway.run`), closed when it ends.
        self.adapters = adapter_registry.Adapters()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        #: The gateway's task group, set while it runs.
        self.tg: asyncio.TaskGroup | None = None

    def new_machine(self, plan: MachinePlan) -> Machine:
        """A machine's runtime state, with its own encoder for every telemetry output."""
        return Machine(
            plan,
            MachineTracker(plan.id, plan.tracker),
            Mapper(plan.signals),
            telemetry=[
                (o.runner, o.telemetry()) for o in self._telemetry if o.telemetry and o.runner
            ],
        )

    def start(self, m: Machine) -> None:
        """Start the machine's supervisor in the gateway's task group."""
        assert self.tg is not None
        self.tasks[m.plan.id] = self.tg.create_task(self._supervise(m), name=f"device[{m.plan.id}]")

    async def stop(self, machine: str) -> None:
        """Cancel a machine's supervisor and wait until it ended."""
        task = self.tasks.pop(machine, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def restore(self, outbox: Outbox, learn: Callable[[str, dict[str, Any]], None]) -> list[str]:
        """Trackers from the outbox's stored state; the machines restored."""
        restored: list[str] = []
        for machine, m in self.machines.items():
            state = outbox.trackers.get(machine)
            if state is None:
                # An unreadable state: never hand out a sequence its stored events used.
                last = outbox.recovered_sequences.get(machine)
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
            learn(machine, state)
            restored.append(machine)
            log.info("tracker.restored", machine=machine, sequence=m.tracker.sequence)
        return restored

    async def _supervise(self, m: Machine) -> None:
        plan = m.plan
        episode = _Episode()
        # Spread the polls of many devices over one interval in slots, so a hundred devices
        # do not hit the network in lockstep but those sharing a slot share one wake-up of
        # the event loop; stable per machine id.
        offset = poll_phase(plan.id, plan.poll_interval)
        bound = log.bind(machine=plan.id)
        # One adapter for the machine's lifetime, re-entered on every reconnect: it keeps
        # what it learned about the device (e.g. blocks the device refused to read whole).
        adapter = self.adapters.create(
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
                        self.on_batch(
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

    def _connected(self, m: Machine, connected: bool, reason: str) -> None:
        m.status.connected = connected
        self.metrics.device_connected(m.plan.id, connected)
        for observer in self._observers:
            observer.connection(m.plan.id, connected)
        self._emit(m, m.tracker.connection(connected, self._clock(), reason))

    def on_batch(self, m: Machine, batch: Sequence[Sample], *, notification: bool = False) -> None:
        """One poll's samples: status and metrics, mapping, tracking, telemetry."""
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
        for observer in self._observers:
            observer.samples(m.plan, mapped, now)
        self._emit(m, m.tracker.observe(mapped, now))
        rejections = m.tracker.drain_rejections()
        if rejections or m.rejections_logged:
            self._log_rejections(m, rejections)
            if rejections:
                self.metrics.counter_readings_rejected(m.plan.id, m.tracker.rejected_total)
        for runner, encoder in m.telemetry:
            record = encoder.encode(m.plan.location, mapped, m.tracker.order_id)
            if record is not None:
                runner.submit(record)

    @staticmethod
    def _log_rejections(m: Machine, rejections: Sequence[Rejection]) -> None:
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


def _tracker_at(machine: str, settings: TrackerSettings, sequence: int) -> MachineTracker:
    """A fresh tracker whose next event takes ``sequence + 1`` (its state was lost)."""
    state = MachineTracker(machine, settings).export_state()
    return MachineTracker.restore(machine, settings, {**state, "sequence": sequence})
