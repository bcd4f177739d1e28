"""The emitter: encode a machine's events, route them, and commit them with the tracker state.

Every event goes through the durable outbox (:mod:`gateway.delivery.outbox`): it is committed in
one transaction with the tracker state that produced it, then each destination whose routing
rules accept it (:mod:`gateway.core.routing`) sends it. Routing by customer needs to know which
customer assigned which order: :class:`Customers` learns that from the tracker state.
After the events, the machine's retained state is refreshed (:mod:`gateway.runtime.retained`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from gateway.contract.envelope import Topics, new_event_id
from gateway.core.model import Event
from gateway.core.routing import RouteRules, Subject, accepts
from gateway.delivery.outbox import Entry, Outbox
from gateway.delivery.records import Record, wire_payload
from gateway.delivery.registry import Output
from gateway.runtime.console.feed import ConsoleFeed
from gateway.runtime.devices import Machine
from gateway.runtime.metrics import Metrics
from gateway.runtime.retained import RetainedState

log = structlog.get_logger(__name__)

#: How many finished orders keep their customer per machine, for routing (the running and
#: queued orders always keep theirs).
_FINISHED_CUSTOMERS = 64


def everywhere(outputs: Sequence[Output]) -> frozenset[str] | None:
    """Every output that reads the outbox when none filters events (the common case: no
    per-event routing then); ``None`` when some do."""
    durable = [o for o in outputs if o.queue is not None]
    return (
        frozenset(o.name for o in durable)
        if all(o.rules == RouteRules() for o in durable)
        else None
    )


class Customers:
    """Which customer assigned which order, per machine (the tracker state knows)."""

    def __init__(self) -> None:
        self._by_machine: dict[str, dict[str, str | None]] = {}

    def learn(self, machine: str, state: dict[str, Any]) -> None:
        """Remember which customer assigned which order (the tracker state knows).

        Every order the tracker still holds (the current one and the whole queue) keeps its
        customer, or its events would stop reaching its platform; only finished orders are
        forgotten, the oldest first, beyond :data:`_FINISHED_CUSTOMERS`.
        """
        known = self._by_machine.setdefault(machine, {})
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

    def customer_of(self, machine: str, order_id: str) -> str | None:
        """The customer an order on a machine was assigned for (``None``: none or unknown)."""
        return self._by_machine.get(machine, {}).get(order_id)

    def of(self, machine: str) -> dict[str, str | None]:
        """Order id -> customer for one machine (empty when none is known)."""
        return self._by_machine.get(machine, {})


class Emitter:
    """Encodes, routes and commits a machine's events, then refreshes its retained state."""

    def __init__(
        self,
        *,
        gateway_id: str,
        topics: Topics,
        outputs: Sequence[Output],
        outbox: Outbox,
        metrics: Metrics,
        feed: ConsoleFeed,
        retained: RetainedState,
        customers: Customers,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.gateway_id = gateway_id
        self.topics = topics
        #: The outputs that read the outbox (events).
        self.durable = [o for o in outputs if o.queue is not None]
        self._everywhere = everywhere(outputs)
        self.outbox = outbox
        self.metrics = metrics
        self.feed = feed
        self.retained = retained
        self.customers = customers
        self._clock = clock
        self._rng = rng
        self.events_emitted = 0

    def emit(self, m: Machine, events: Sequence[Event], *, persist: bool = False) -> None:
        """Commit events with the tracker state (outbox), then refresh the retained state."""
        if not events and not persist:
            return
        loc = m.plan.location
        machine = m.plan.id
        state = m.tracker.export_state()
        self.customers.learn(machine, state)
        customers = self.customers.of(machine)
        gateway_id = self.gateway_id
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
                names = frozenset(o.name for o in self.durable if accepts(o.rules, subject))
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
            self.retained.publish(m, m.tracker.snapshot(), events[-1].time)


#: The stdlib logger behind ``log``: its level decides whether a debug line goes anywhere.
_stdlog = logging.getLogger(__name__)


def _debug_enabled() -> bool:
    """Whether this module's debug lines are wanted (checked before building one per event)."""
    return _stdlog.isEnabledFor(logging.DEBUG)
