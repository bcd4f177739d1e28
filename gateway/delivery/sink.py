"""One output interface: the :class:`Sink` protocol and the one runner that feeds every sink.

A *sink* is a destination (an MQTT broker, an InfluxDB history, later Sparkplug B): it knows
how to open a link, hand a batch of records over, and acknowledge each record once the
destination took it. The :class:`SinkRunner` does everything else, the same way for all of
them:

* drains a :class:`~gateway.delivery.sendqueue.SinkQueue` (a durable outbox cursor or a
  bounded memory queue) in order, at most ``batch_size`` records in flight, a partial batch
  waiting up to ``flush_interval`` seconds to fill (0: sent at once, the MQTT fast path);
* keeps the link up: opens it, notices it break (:meth:`Sink.watch`, :meth:`Sink.check`,
  a failed :meth:`Sink.send`), puts every unacknowledged record back in front
  (``requeue``) and opens it again after a jittered backoff;
* logs each new cause of an outage once at warning (repeats at debug) and the recovery once;
* counts what was delivered, dropped and rejected, answers ``flush`` waiters, closes within
  a grace period, and reports its state to :class:`~gateway.delivery.reporting.DestinationStates`.

A record leaves the queue only when the sink calls ``ack(key)`` for it: the destination
took it, or refused it for good (then the sink counts it as rejected). Nothing is lost while
the queue holds it; a durable queue holds it across restarts.

Adding an output: a folder under ``gateway/delivery/`` with a class that satisfies
:class:`Sink`, and one entry in :mod:`gateway.delivery.registry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog

from gateway.core.backoff import Backoff
from gateway.delivery.reporting import DestinationStates
from gateway.delivery.sendqueue import BacklogClock, FlushWaiters, SinkQueue

log = structlog.get_logger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

#: What a record is: an order or machine event, a retained state snapshot, the gateway's
#: status, or a poll's telemetry.
RECORD_KINDS = frozenset({"event", "state", "status", "telemetry"})


@dataclass(frozen=True, slots=True)
class Accepts:
    """What a sink takes: record kinds, and (for events) optionally only some types."""

    kinds: frozenset[str]
    #: Event types taken; ``None``: every type.
    event_types: frozenset[str] | None = None

    def __post_init__(self) -> None:
        """Reject kinds nobody produces (a typo would silently admit nothing)."""
        unknown = self.kinds - RECORD_KINDS
        if unknown:
            raise ValueError(f"unknown record kinds {sorted(unknown)}: use {sorted(RECORD_KINDS)}")

    def __call__(self, kind: str, event_type: str | None = None) -> bool:
        """Whether a record of ``kind`` (and, for events, ``event_type``) goes to the sink."""
        if kind not in self.kinds:
            return False
        return kind != "event" or self.event_types is None or event_type in self.event_types


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a link failed or ended: a short stable ``key`` and words for the log.

    The key decides what is logged at warning: each new key once per outage, repeats at
    debug, so an operator sees every *change* of cause (the broker down, then a rotated
    password) and not a line per retry.
    """

    key: str
    text: str


class LinkLost(Exception):
    """The link to the destination broke; the runner requeues and opens it again."""

    def __init__(self, text: str, cause: str = "link") -> None:
        """``cause`` is a :class:`Cause` key: ``closed`` when the other side ended it."""
        super().__init__(text)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class SinkLog:
    """The log event names of one kind of sink (operators' alerts key on them)."""

    #: Opening the link failed.
    unreachable: str
    #: An open link broke (or, for a link-less sink, a write failed).
    lost: str
    #: The first success after an outage.
    recovered: str
    #: The first open without an outage before it; ``None``: not logged.
    connected: str | None
    overflow: str
    overflow_ended: str
    submit_failed: str
    close_unflushed: str
    close_timeout: str
    closed: str | None
    #: A bug inside the sink (logged with its traceback; the link is opened again).
    internal: str
    rejected: str


Ack = Callable[[int], None]


class Sink(Protocol[T_contra]):
    """A destination the :class:`SinkRunner` drains a queue into.

    The runner calls :meth:`bind` once, then per link: :meth:`open`, any number of
    :meth:`send` (with :meth:`watch` running beside), and :meth:`release`; at the end
    :meth:`goodbye` (a clean close) or :meth:`abort` (a lost link, a cancel).
    """

    #: Kind of destination, as the config and the registry name it (``mqtt``, ``influxdb``).
    kind: str
    #: Which records the destination takes.
    accepts: Accepts
    #: Whether readiness depends on it (MQTT destinations yes, the history no).
    required: bool
    #: True when the sink has no link of its own (HTTP writes): it counts as up until a write
    #: fails, and its recovery is the first write that succeeds again.
    linkless: bool
    #: Exceptions from :meth:`watch` / :meth:`send` that mean "link lost, try again".
    link_errors: tuple[type[Exception], ...]
    log_names: SinkLog

    @property
    def delivered(self) -> int:
        """Records the destination took since start (hello and goodbye messages included)."""
        ...

    def bind(
        self,
        ack: Ack,
        progress: Callable[[], None],
        wake: Callable[[], None],
        reject: Callable[[int, str], None],
    ) -> None:
        """The runner's callbacks.

        ``ack(key)`` per record the destination took, ``progress()`` after a run of acks
        (may be coalesced), ``wake()`` when :meth:`check` has news, ``reject(key, why)``
        for a record the destination refuses for good (acknowledged, counted, logged).
        """
        ...

    async def open(self) -> None:
        """Open a link (connect, say hello); raise when it cannot."""
        ...

    def send(self, batch: Sequence[tuple[int, T_contra]]) -> Awaitable[None] | None:
        """Hand a batch over; ack each record when the destination took it.

        May ack later (a PUBACK), or before an awaitable it returns completes (an HTTP
        write). Raise :class:`LinkLost` (or one of ``link_errors``) when the link broke.
        """
        ...

    def check(self) -> None:
        """Raise :class:`LinkLost` when the link has failed since the last call."""
        ...

    async def watch(self) -> None:
        """Return never; raise :class:`LinkLost` once the link breaks by itself."""
        ...

    def release(self) -> None:
        """The link is over: forget what is in flight (late acks must not count)."""
        ...

    async def goodbye(self) -> None:
        """End the link cleanly (offline status, disconnect)."""
        ...

    def abort(self) -> None:
        """Drop the link without a goodbye (a lost link, a cancel)."""
        ...

    def classify(self, exc: BaseException) -> Cause:
        """Why opening failed or the link was lost, from the exception."""
        ...


class RunnerCallbacks:
    """The runner's callbacks as a sink keeps them (:meth:`Sink.bind`); a base to inherit.

    Until the runner binds, an acknowledgement or refusal raises (a sink used without its
    runner is a bug); progress and wake-ups are no-ops.
    """

    def __init__(self) -> None:
        """Callbacks that are not bound yet."""
        self._ack: Ack = _unbound
        self._progress: Callable[[], None] = _nothing
        self._wake: Callable[[], None] = _nothing
        self._reject: Callable[[int, str], None] = _unbound_reject

    def bind(
        self,
        ack: Ack,
        progress: Callable[[], None],
        wake: Callable[[], None],
        reject: Callable[[int, str], None],
    ) -> None:
        """The runner's callbacks (see :meth:`Sink.bind`)."""
        self._ack, self._progress, self._wake, self._reject = ack, progress, wake, reject


def _unbound(key: int) -> None:
    raise RuntimeError("the sink is not bound to a runner")


def _unbound_reject(key: int, why: str) -> None:
    raise RuntimeError("the sink is not bound to a runner")


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """Batching, bounds and retry settings of a :class:`SinkRunner`."""

    #: Records in flight at most, and the largest batch handed to the sink at once.
    batch_size: int = 1000
    #: Seconds a partial batch waits to fill; 0: sent at once.
    flush_interval: float = 1.0
    max_queue: int = 100_000
    #: Memory bound of the runner's own queue (text items weighed by length); ``None``: none.
    max_bytes: int | None = None
    #: Upper bound on one write of a sink that stores synchronously (HTTP).
    write_timeout: float = 30.0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0))
    #: A link up this long (seconds) ends an outage for good: a cause seen before it is
    #: logged at warning again; links closed sooner count towards a takeover.
    stable_after: float = 30.0
    #: The limit the metrics show for the backlog (the outbox's, when it is the queue).
    limit: int | None = None

    def __post_init__(self) -> None:
        """Reject settings that cannot work, naming the field."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.flush_interval) and self.flush_interval >= 0):
            raise ValueError(f"flush_interval must be >= 0 s, got {self.flush_interval!r}")
        if not (math.isfinite(self.write_timeout) and self.write_timeout > 0):
            raise ValueError(f"write_timeout must be > 0 s, got {self.write_timeout!r}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")


class _StopRequested(Exception):
    """close() asked the link to wind down (internal)."""


class SinkRunner(Generic[T]):
    """Drains one queue into one :class:`Sink`, in order, until closed."""

    def __init__(
        self,
        sink: Sink[T],
        queue: SinkQueue[T],
        *,
        name: str,
        settings: RunnerSettings | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """Set up; nothing is sent until :meth:`run`."""
        self.sink = sink
        self.name = name
        self.settings = settings or RunnerSettings()
        self._queue = queue
        self._clock = clock
        self._rng = rng
        self._ages = BacklogClock()
        self._log = log.bind(destination=name)
        self._names = sink.log_names
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._finished.set()
        self._running = False
        self._closing = False
        self._closed = False
        self._linked = False
        #: True after a failure until the next success (a link-less sink's "connected").
        self._failing = False
        self._flush_waiters = FlushWaiters(queue)
        # Records the queue dropped to stay bounded (and records that never got in).
        self._dropped = 0
        #: Records the destination refused for good (acknowledged, not delivered).
        self.rejected = 0
        #: Failed opens and lost links since start.
        self.failures = 0
        # The last awaited send succeeded (a link-less sink's "connected").
        self._ok = False
        self._overflow_from: int | None = None
        #: The last failure, in words (for the web console).
        self.last_error: str | None = None
        # The current outage: since when (loop time), whether a warning was logged.
        self._outage_since: float | None = None
        self._outage_warned = False
        self._attempts = 0
        sink.bind(queue.ack, self._progress, self._wake.set, self.reject)

    # -- state --

    @property
    def queue(self) -> SinkQueue[T]:
        """The queue this runner drains."""
        return self._queue

    @property
    def connected(self) -> bool:
        """Linked (a link-less sink: the last write succeeded)."""
        return self._ok if self.sink.linkless else self._linked

    @property
    def dropped(self) -> int:
        """Records the queue dropped to stay bounded (and records that never got in)."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Records submitted and not yet acknowledged."""
        return len(self._queue)

    @property
    def written(self) -> int:
        """Records the destination took since start (its own hello messages included)."""
        return self.sink.delivered

    def oldest_age(self, now: float | None = None) -> float | None:
        """Seconds the oldest pending record has waited (since it was submitted)."""
        now = self._clock() if now is None else now
        return self._ages.oldest_age(self._queue.oldest_key(), now)

    def report(
        self,
        states: DestinationStates,
        *,
        backlog: int | None = None,
        oldest_age: float | None = None,
    ) -> None:
        """Copy this destination's state into the metrics (a durable queue knows its own
        backlog and ages better: pass them)."""
        states.destination_state(
            self.name,
            connected=self.connected,
            backlog=self.pending if backlog is None else backlog,
            oldest_age=self.oldest_age() if backlog is None else oldest_age,
            published_total=self.written,
            dropped_total=self._dropped + self.rejected,
            limit=self.settings.max_queue if self.settings.limit is None else self.settings.limit,
            required=self.sink.required,
        )

    # -- producer side --

    def notify(self) -> None:
        """Wake the runner: the queue has something new (a durable queue filled itself)."""
        self._ages.note(self._queue.last_key, self._clock())
        self._wake.set()

    def submit(self, item: T) -> None:
        """Queue one record; never blocks, never raises (call it on the loop's thread)."""
        try:
            dropped = self._queue.push(item)
        except Exception:
            # A broken queue must not take the producer down with it.
            self._dropped += 1
            self._log.exception(self._names.submit_failed)
            return
        self._ages.note(self._queue.last_key, self._clock())
        if dropped:
            self._note_dropped(dropped)
            self._progress()
        self._wake.set()

    def reject(self, key: int, error: str) -> None:
        """The destination refuses record ``key`` for good: acknowledge it, count it, log it."""
        self._queue.ack(key)
        self.rejected += 1
        self._log.error(self._names.rejected, error=error, rejected_total=self.rejected)
        self._progress()

    def _note_dropped(self, n: int) -> None:
        self._dropped += n
        if self._overflow_from is None:
            # Once per episode: the destination is slower than the load, or down.
            self._overflow_from = self._dropped - n
            self._log.warning(
                self._names.overflow,
                max_queue=self.settings.max_queue,
                max_bytes=self.settings.max_bytes,
                pending=len(self._queue),
                dropped_now=n,
                dropped_total=self._dropped,
                hint="the oldest records are dropped first",
            )

    def _check_overflow_end(self) -> None:
        # Hysteresis: the episode ends once the queue is down to half, so a queue
        # hovering at the bound does not log a warning per record.
        if self._overflow_from is not None and len(self._queue) <= self.settings.max_queue // 2:
            self._log.info(
                self._names.overflow_ended,
                dropped=self._dropped - self._overflow_from,
                dropped_total=self._dropped,
            )
            self._overflow_from = None

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 - a budget, not a guard
        """Wait until everything submitted so far is acknowledged; False on timeout."""
        # A partial batch does not wait for its interval while somebody flushes.
        self._wake.set()
        return await self._flush_waiters.wait(timeout)

    def _progress(self) -> None:
        self._wake.set()
        self._check_overflow_end()
        self._flush_waiters.progress()

    # -- lifecycle --

    async def close(self, timeout: float = 3.0) -> None:  # noqa: ASYNC109 - grace period
        """Send what can be sent within ``timeout``, then end the link cleanly.

        With the destination unreachable there is nothing to wait for: what is pending stays
        in the queue (a durable queue keeps it for the next start).
        """
        if self._closed:
            return
        self._closed = True
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._running:
            up = not self._failing if self.sink.linkless else self._linked
            # Keep a slice of the budget for the goodbye.
            if up and self.pending and not await self.flush(timeout * 0.7):
                self._log.warning(self._names.close_unflushed, pending=self.pending)
            self._stop.set()
            self._wake.set()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._finished.wait()
            except TimeoutError:
                self._log.warning(self._names.close_timeout, pending=self.pending)
        self._stop.set()
        self._wake.set()
        if self._names.closed is not None:
            self._log.info(self._names.closed, pending=self.pending, dropped=self._dropped)

    async def run(self) -> None:
        """Open, reopen and feed the sink until cancelled or closed."""
        if self._running:
            raise RuntimeError(f"sink {self.name} is already running")
        self._running = True
        self._finished.clear()
        loop = asyncio.get_running_loop()
        sink = self.sink
        names = self._names
        backoff = self.settings.backoff
        # Causes already logged at warning since the link was last stable: a repeat goes to
        # debug.
        warned: set[str] = set()
        # Links in a row the destination closed soon after accepting them: the sign of a
        # second client with our identity (an MQTT 3.1.1 broker just closes the old one).
        closed_early = 0

        def failed(event: str, cause: Cause, **fields: Any) -> None:
            self.last_error = cause.text
            self.failures += 1
            self._failing = True
            self._ok = False
            if self._outage_since is None:
                self._outage_since = loop.time()
            if cause.key in warned:
                self._log.debug(event, cause=cause.key, error=cause.text, **fields)
                return
            warned.add(cause.key)
            self._outage_warned = True
            self._log.warning(event, cause=cause.key, error=cause.text, **fields)

        try:
            while not self._stop.is_set():
                try:
                    await sink.open()
                except Exception as exc:  # any failure to open is one more attempt
                    self._attempts += 1
                    closed_early = 0
                    failed(names.unreachable, sink.classify(exc), attempt=self._attempts)
                    await self._pause(backoff.delay(self._attempts - 1, self._rng))
                    continue
                if not sink.linkless:
                    self._recovered(loop.time())
                connected_at = loop.time()
                lost = await self._serve()
                if lost is None:
                    return  # closed cleanly
                stable = loop.time() - connected_at > self.settings.stable_after
                if stable:
                    warned.clear()
                    closed_early = 0
                # A link that dies right after opening keeps the attempt count, so a
                # flapping destination meets a growing backoff rather than a storm.
                if loop.time() - connected_at > backoff.cap and not self._failing:
                    self._attempts = 0
                self._attempts += 1
                if lost.key == "closed" and not stable:
                    closed_early += 1
                    if closed_early >= 2:
                        lost = sink.classify(
                            LinkLost(
                                f"the destination closed {closed_early} links in a row soon "
                                "after accepting them",
                                "session-taken-over",
                            )
                        )
                elif lost.key != "closed":
                    closed_early = 0
                failed(names.lost, lost, pending=self.pending, attempt=self._attempts)
                await self._pause(backoff.delay(self._attempts - 1, self._rng))
        finally:
            self._linked = False
            self._running = False
            self._queue.requeue()
            self._finished.set()

    def _recovered(self, now: float) -> None:
        """The destination took something (or accepted the link) after an outage."""
        self._failing = False
        if self._outage_since is not None:
            (self._log.info if self._outage_warned else self._log.debug)(
                self._names.recovered,
                outage_s=round(now - self._outage_since, 3),
                attempts=self._attempts,
                failures=self._attempts,
                last_error=self.last_error,
                pending=self.pending,
            )
        elif self._names.connected is not None:
            self._log.info(self._names.connected, pending=self.pending)
        self._outage_since = None
        self._outage_warned = False
        if self.sink.linkless:
            # A link-less sink's outage is its failed writes: the next one starts afresh.
            self._attempts = 0

    async def _serve(self) -> Cause | None:
        """Feed one link until it breaks (returns why) or close() stops it (returns None)."""
        sink = self.sink
        self._linked = True
        reason: Cause | None = None
        lost: tuple[type[Exception], ...] = (LinkLost, *sink.link_errors)
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(sink.watch(), name=f"{self.name}/{sink.kind}-watch")
                    tg.create_task(self._pump(), name=f"{self.name}/{sink.kind}-pump")
                    tg.create_task(self._await_stop(), name=f"{self.name}/{sink.kind}-stop")
            except* _StopRequested:
                pass
            except* lost as group:
                causes = [sink.classify(e) for e in group.exceptions]
                reason = Cause(causes[0].key, "; ".join(c.text for c in causes))
            except* Exception as group:
                # A bug must not end delivery for good: log it and open the link again.
                self._log.error(self._names.internal, exc_info=group)
                reason = Cause("internal", "internal error")
        except asyncio.CancelledError:
            # Cancelled without close(): no goodbye (an MQTT broker then sends the will).
            sink.abort()
            raise
        finally:
            self._linked = False
            # Late acknowledgements of this link must not ack what is requeued below.
            sink.release()
            self._queue.requeue()
        if reason is not None:
            sink.abort()
            return reason
        await sink.goodbye()
        return None

    async def _await_stop(self) -> None:
        await self._stop.wait()
        raise _StopRequested

    async def _pump(self) -> None:
        # The hot path: no task, future or timeout per record. A sink that acks later (MQTT)
        # returns None from send() and the loop refills as acks free the window; a sink that
        # stores synchronously (HTTP) is awaited (it bounds its own writes).
        queue = self._queue
        sink = self.sink
        check = sink.check
        send = sink.send
        size = self.settings.batch_size
        batching = self.settings.flush_interval > 0
        wake = self._wake
        loop = asyncio.get_running_loop()
        while True:
            check()
            room = size - queue.in_flight
            batch = await self._next_batch(room) if batching else _take(queue, room)
            if batch:
                pending = send(batch)
                if pending is not None:
                    await pending
                    self._ok = True
                    if self._failing or self._outage_since is not None:
                        self._recovered(loop.time())
                continue
            wake.clear()
            await wake.wait()

    async def _next_batch(self, room: int) -> list[tuple[int, T]]:
        """The next batch: the first record, then up to ``flush_interval`` for it to fill.

        Every turn that takes nothing awaits a wake-up: a queue may count records it cannot
        hand out yet (the outbox counts rows still being committed or read back, and both
        land through the event loop), so "something is pending" is never a reason to try
        again at once. Returns ``[]`` only when there is no room or it is stopping.
        """
        if room <= 0:
            return []
        loop = asyncio.get_running_loop()
        batch: list[tuple[int, T]] = []
        deadline: float | None = None
        while True:
            while len(batch) < room and (item := self._queue.take()) is not None:
                batch.append(item)
            if len(batch) >= room:
                return batch
            if batch:
                if self._closing or self._flush_waiters or self._stop.is_set():
                    return batch
                if deadline is None:
                    deadline = loop.time() + self.settings.flush_interval
                elif loop.time() >= deadline:
                    return batch
            elif self._stop.is_set():
                return batch
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()

    async def _pause(self, seconds: float) -> None:
        # Interruptible by close(): a runner waiting for a dead destination stops at once.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()


def _take(queue: SinkQueue[T], room: int) -> list[tuple[int, T]]:
    """Up to ``room`` records from the queue, now in flight."""
    batch: list[tuple[int, T]] = []
    append = batch.append
    take = queue.take
    while room > 0 and (item := take()) is not None:
        append(item)
        room -= 1
    return batch


def describe(exc: BaseException) -> str:
    """An exception in a few words: its type and the first line of its text."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
