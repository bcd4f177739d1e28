"""The console's view of the gateway: a bounded, in-process copy of what the runtime emits.

The runtime calls :class:`ConsoleFeed` where it already emits events, publishes retained
state and reads samples; nothing here sends, stores or decides anything for the runtime.
Memory is bounded whatever runs: the last :data:`EVENTS_PER_MACHINE` events and
:data:`CONNECTIONS_PER_MACHINE` connection changes per machine, the last signal value per
signal, and the last :data:`RECENT_ORDERS` orders with :data:`EVENTS_PER_ORDER` events each.

The machine's tracker snapshot (state, order, counts) is not copied here: the console reads
it from the tracker when it answers. Subscribers (the Server-Sent Events streams) are told
which machines changed; the console reads them at most once per :data:`PUSH_INTERVAL`, so a
busy floor costs one JSON encoding per machine and second, not one per event.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.core.model import Event, Sample

EVENTS_PER_MACHINE = 20
CONNECTIONS_PER_MACHINE = 10
ALARMS_PER_MACHINE = 10
RECENT_ORDERS = 50
EVENTS_PER_ORDER = 20
#: Seconds between two pushes to the browsers: counts move every poll, eyes do not.
PUSH_INTERVAL = 1.0


@dataclass(slots=True)
class MachineFeed:
    """What the console keeps about one machine."""

    signals: dict[str, Sample] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_PER_MACHINE))
    connections: deque[tuple[float, bool, str]] = field(
        default_factory=lambda: deque(maxlen=CONNECTIONS_PER_MACHINE)
    )
    alarms: deque[Event] = field(default_factory=lambda: deque(maxlen=ALARMS_PER_MACHINE))
    at_risk: bool = False
    last_event: Event | None = None
    #: ``last_event`` and its JSON-ready view (made once, reused by every push).
    last_event_view: tuple[Event, dict[str, Any]] | None = None


@dataclass(slots=True)
class OrderFeed:
    """One order seen in events: where it runs and what happened to it."""

    machine: str
    order_id: str
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_PER_ORDER))


@dataclass(slots=True)
class ReloadResult:
    """The last config reload: when, whether it was applied, and the problems if not."""

    at: float
    applied: bool
    problems: list[str]


class ConsoleFeed:
    """Bounded recent state and events per machine, and the machines changed since a mark."""

    def __init__(self) -> None:
        """An empty feed."""
        self.machines: dict[str, MachineFeed] = {}
        self.orders: OrderedDict[tuple[str, str], OrderFeed] = OrderedDict()
        self.last_reload: ReloadResult | None = None
        #: Bumped on every change; subscribers compare it with what they sent.
        self.version = 0
        self._changed: dict[str, int] = {}
        self._wake = asyncio.Event()
        self.subscribers = 0

    def _machine(self, machine: str) -> MachineFeed:
        feed = self.machines.get(machine)
        if feed is None:
            feed = self.machines[machine] = MachineFeed()
        return feed

    def _touch(self, machine: str) -> None:
        if self.subscribers:
            self.version += 1
            self._changed[machine] = self.version
            self._wake.set()

    # -- what the runtime calls --

    def configure(self, machines: Iterable[str]) -> None:
        """The running machines (after start and every reload); others are forgotten."""
        wanted = set(machines)
        for gone in set(self.machines) - wanted:
            del self.machines[gone]
            self._touch(gone)
        for machine in wanted:
            self._machine(machine)

    def events(self, machine: str, events: Sequence[Event]) -> None:
        """Events the runtime just committed for a machine."""
        feed = self._machine(machine)
        for event in events:
            feed.events.append(event)
            kind = event.type
            if kind == "machine.connection.changed":
                feed.connections.append(
                    (event.time, bool(event.data.get("connected")), str(event.data.get("reason")))
                )
            elif kind.startswith("machine.alarm."):
                feed.alarms.append(event)
            elif kind == "order.at_risk":
                feed.at_risk = True
            elif kind in ("order.back_on_track", "order.started", "order.completed"):
                feed.at_risk = False
            order_id = event.data.get("order_id")
            if isinstance(order_id, str) and kind.startswith("order."):
                key = (machine, order_id)
                order = self.orders.get(key)
                if order is None:
                    order = self.orders[key] = OrderFeed(machine, order_id)
                    if len(self.orders) > RECENT_ORDERS:
                        self.orders.popitem(last=False)
                else:
                    self.orders.move_to_end(key)
                order.events.append(event)
        if events:
            feed.last_event = events[-1]
            self._touch(machine)

    def samples(self, machine: str, samples: Iterable[Sample]) -> None:
        """The latest mapped values of a machine (one poll or notification)."""
        signals = self._machine(machine).signals
        for s in samples:
            signals[s.signal] = s
        self._touch(machine)

    def reloaded(self, at: float, applied: bool, problems: Sequence[str] = ()) -> None:
        """A config reload finished (applied, or refused with these problems)."""
        self.last_reload = ReloadResult(at, applied, list(problems))

    # -- what the console reads --

    def changed_since(self, mark: int) -> tuple[int, list[str]]:
        """The current version and the machines changed after ``mark``."""
        return self.version, [m for m, v in self._changed.items() if v > mark]

    async def wait_change(self) -> None:
        """Until something changes (for one subscriber; the feed wakes all of them)."""
        await self._wake.wait()

    def settle(self) -> None:
        """Every subscriber saw the current version: sleep until the next change."""
        self._wake.clear()
        if len(self._changed) > 4 * len(self.machines) + 16:
            # Only the newest marks matter; machines removed long ago go.
            self._changed = {m: v for m, v in self._changed.items() if m in self.machines}

    def order_events(self, machine: str) -> Mapping[str, OrderFeed]:
        """The recent orders of one machine by order id."""
        return {o.order_id: o for (m, _), o in self.orders.items() if m == machine}
