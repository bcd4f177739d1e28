"""Tag telemetry to MQTT destinations: publish rules, routing, personal data, bounded memory.

Fed with every poll's mapped samples (:meth:`TelemetryOutput.observe`) through the first
telemetry-admitting MQTT destination's observer (:mod:`gateway.delivery.mqtt.output`):

1. the machine's :class:`~gateway.core.telemetry.TelemetryFilter` keeps the values that are
   due by their publish rules (every poll, on change, deadband, min/max interval);
2. each destination whose ``routing`` admits telemetry for the machine
   (``event_types: [..., telemetry]``, :func:`gateway.core.routing.accepts`) gets one message
   on ``{prefix}/{site}/{area}/{line}/{machine}/telemetry``
   (:func:`gateway.contract.telemetry.encode_telemetry`), encoded once per operator policy
   when the badge is among the values, else once for all;
3. the message goes into the destination's queue in memory only
   (:meth:`gateway.delivery.outbox.OutboxQueue.push_telemetry`): it follows the events
   committed before it, and when the queue's memory (``broker.max_queue``) is full the
   oldest telemetry is dropped first and counted; an event is never dropped for telemetry.

Nothing is done, and nothing costs, when no destination admits telemetry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from gateway.config.loader import DestinationPlan, MachinePlan
from gateway.config.telemetry import TelemetryPlan
from gateway.contract.envelope import Topics
from gateway.contract.telemetry import encode_telemetry
from gateway.core.model import Sample, Value
from gateway.core.routing import OPERATOR_KEY, OperatorPolicy, Subject, accepts, pseudonym
from gateway.core.telemetry import TelemetryFilter
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.outbox import OutboxQueue

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    queue: OutboxQueue
    policy: OperatorPolicy


class TelemetryOutput:
    """Publishes the due values of every poll to the destinations that admit telemetry."""

    def __init__(
        self,
        destinations: Sequence[DestinationPlan],
        queues: Mapping[str, OutboxQueue],
        topics: Topics,
        settings: TelemetryPlan,
        *,
        gateway_id: str,
        secret: bytes | None,
    ) -> None:
        """Telemetry for the destinations among ``destinations`` that admit it."""
        self._destinations = [d for d in destinations if "telemetry" in d.route.rules.event_types]
        self._queues = queues
        self._topics = topics
        self._qos = settings.qos
        self._retain = settings.retain
        self._bytes = settings.max_queue_bytes
        self._gateway_id = gateway_id
        self._secret = secret
        self._filters: dict[str, TelemetryFilter] = {}
        self._targets: dict[str, list[_Target]] = {}
        #: Telemetry messages handed to each destination's queue.
        self.submitted: dict[str, int] = {d.name: 0 for d in self._destinations}
        #: Destinations dropping telemetry right now, with the count at the episode's start.
        self._overflowing: dict[str, int] = {}

    @property
    def active(self) -> bool:
        """Whether any destination admits telemetry at all."""
        return bool(self._destinations)

    def configure(
        self, machines: Iterable[MachinePlan], settings: TelemetryPlan | None = None
    ) -> None:
        """(Re)build the rules and destinations of changed machines; forget removed ones.

        A machine whose rules stay the same keeps its filter, so a reload does not send
        every value again. ``settings``: new QoS and retain flag (a reload).
        """
        if settings is not None:
            self._qos, self._retain = settings.qos, settings.retain
            self._bytes = settings.max_queue_bytes
        for d in self._destinations:
            self._queues[d.name].max_telemetry_bytes = self._bytes
        fresh = {m.id: m for m in machines}
        for machine in list(self._filters):
            if machine not in fresh:
                del self._filters[machine]
                self._targets.pop(machine, None)
        for machine, plan in fresh.items():
            old = self._filters.get(machine)
            rules = dict(plan.telemetry)
            if old is None or old.rules != rules or old.default != plan.telemetry_default:
                self._filters[machine] = TelemetryFilter(rules, plan.telemetry_default)
            subject = Subject(machine, "telemetry")
            self._targets[machine] = [
                _Target(d.name, self._queues[d.name], d.route.operator)
                for d in self._destinations
                if accepts(d.route.rules, subject)
            ]

    def observe(self, plan: MachinePlan, samples: Sequence[Sample], now: float) -> None:
        """One poll of a machine: send what is due to every destination that takes it."""
        targets = self._targets.get(plan.id)
        if not targets:
            return
        due = self._filters[plan.id].due(samples, now)
        if not due:
            return
        topic = self._topics.telemetry(plan.location)
        # Checked on the values themselves, not on the config: personal data must not
        # slip out through a sample the config did not foresee.
        badge = any(s[1] == OPERATOR_KEY and s[2] is not None for s in due)
        encoded: dict[OperatorPolicy | None, bytes | None] = {}
        for t in targets:
            # Without a badge among the values every destination gets the same bytes.
            key: OperatorPolicy | None = t.policy if badge else None
            if key not in encoded:
                encoded[key] = self._encode(plan, due, now, key)
            payload = encoded[key]
            if payload is None:
                continue
            dropped = t.queue.push_telemetry(Message(topic, payload, self._qos, self._retain))
            self.submitted[t.name] += 1
            if dropped or t.name in self._overflowing:
                self._overflow(t, dropped)

    def _overflow(self, t: _Target, dropped: int) -> None:
        """Log a destination's telemetry overflow once per episode, not per message."""
        total = t.queue.dropped_telemetry
        start = self._overflowing.get(t.name)
        if dropped and start is None:
            self._overflowing[t.name] = total - dropped
            log.warning(
                "telemetry.dropping",
                destination=t.name,
                detail="memory (max_queue) full: the oldest telemetry goes first; events wait "
                "in the outbox",
                dropped_total=total,
            )
        elif not dropped and start is not None:
            del self._overflowing[t.name]
            log.info("telemetry.dropping_ended", destination=t.name, dropped=total - start)

    def _encode(
        self, plan: MachinePlan, due: Sequence[Sample], now: float, policy: OperatorPolicy | None
    ) -> bytes | None:
        secret = self._secret
        if policy is None or policy == "pass":
            return encode_telemetry(plan.location, due, gateway_id=self._gateway_id, now=now)
        if policy == "pseudonymise" and secret is not None:

            def hide(s: Sample) -> Value:
                return None if s[2] is None else pseudonym(secret, s[2])

            return encode_telemetry(
                plan.location,
                due,
                gateway_id=self._gateway_id,
                now=now,
                skip=OPERATOR_KEY,
                rewrite=hide,
            )
        # drop, or pseudonymise without a secret: no pseudonym without a key, so drop.
        return encode_telemetry(
            plan.location, due, gateway_id=self._gateway_id, now=now, skip=OPERATOR_KEY
        )

    def dropped(self) -> dict[str, int]:
        """Telemetry messages each destination's queue dropped because memory was full."""
        return {d.name: self._queues[d.name].dropped_telemetry for d in self._destinations}
