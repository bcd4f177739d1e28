"""MQTT destinations as outputs: one publisher per configured destination, fed from the outbox.

Tag telemetry (:mod:`gateway.delivery.mqtt.telemetry`) is one :class:`TelemetryOutput` for
all destinations that admit it (``event_types: [telemetry]``), so each poll is filtered once
and encoded once per operator policy; it is the observer of the first such destination and
pushes into every admitting destination's memory queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from gateway import __version__
from gateway.config.loader import DestinationPlan, GatewayPlan, MachinePlan
from gateway.config.plans import BrokerPlan
from gateway.contract.envelope import Topics, encode_status
from gateway.core.model import Sample
from gateway.core.routing import Route
from gateway.delivery.mqtt.publisher import MqttPublisher
from gateway.delivery.mqtt.telemetry import TelemetryOutput
from gateway.delivery.outbox import OutboxQueue
from gateway.delivery.registry import Figures, Observer, Output, OutputKind, Wiring

Clock = Callable[[], float]


def destinations(plan: GatewayPlan) -> tuple[DestinationPlan, ...]:
    """The plan's destinations (a plan built by hand: its broker as ``default``)."""
    if plan.destinations:
        return plan.destinations
    return (DestinationPlan("default", plan.broker, Route("default")),)


def batch_topic(topics: Topics) -> str:
    """Topic of CloudEvents batches (``application/cloudevents-batch+json``) of a gateway."""
    return f"{topics.prefix}/{topics.site}/gateway/{topics.gateway_id}/batch"


def broker_settings(
    plan: GatewayPlan,
    topics: Topics,
    started_at: float,
    destination: DestinationPlan | None = None,
    clock: Clock = time.time,
) -> BrokerPlan:
    """One destination's broker plan (default: the first) with the gateway's status messages.

    The offline status of a clean shutdown is built when it is sent (``clock()`` then), so
    its ``time`` says when the gateway stopped; the last will's is the registration time.
    """
    b = destination.broker if destination is not None else plan.broker

    def status(state: str, reason: str | None, now: float = started_at) -> bytes:
        return encode_status(
            state,  # type: ignore[arg-type]
            gateway_id=plan.gateway_id,
            version=__version__,
            started_at=started_at,
            now=now,
            reason=reason,
        )

    return replace(
        b,
        status_topic=topics.status(),
        online_payload=status("online", None),
        will_payload=status("offline", "connection lost"),
        offline_payload=status("offline", "shutdown"),
        offline_status=lambda: status("offline", "shutdown", clock()),
    )


class TelemetryObserver(Observer):
    """Feeds the MQTT destinations' tag telemetry from the polls, and reloads its rules."""

    def __init__(self, telemetry: TelemetryOutput) -> None:
        self.telemetry = telemetry

    def configure(self, plan: GatewayPlan) -> None:
        """The machines' publish rules and the telemetry settings (start and reload)."""
        self.telemetry.configure(plan.machines, plan.telemetry)

    def samples(self, machine: MachinePlan, mapped: Sequence[Sample], now: float) -> None:
        """The poll's due values to every destination that admits them."""
        self.telemetry.observe(machine, mapped, now)

    def report(self, metrics: Figures) -> None:
        """Telemetry messages queued and dropped per destination."""
        metrics.telemetry(self.telemetry.submitted, self.telemetry.dropped())


def _positions(plan: GatewayPlan) -> list[str]:
    return [d.name for d in destinations(plan)]


def _build(w: Wiring) -> list[Output]:
    outputs = []
    queues: dict[str, OutboxQueue] = {}
    for d in destinations(w.plan):
        queue = w.outbox.queue(
            d.route,
            clock=w.clock,
            delayed_after=w.delayed_after,
            batch_topic=batch_topic(w.topics) if d.route.batch else None,
            secret=w.secret,
            # broker.max_queue bounds what waits in memory (telemetry first to go);
            # TelemetryOutput adds telemetry.max_queue_mib for its bytes.
            max_memory=d.broker.max_queue,
        )
        pub = MqttPublisher(
            broker_settings(w.plan, w.topics, w.started_at, d, w.clock),
            name=d.name,
            queue=queue,
            limit=w.outbox_limit,
        )
        queue.waker = pub.notify
        queues[d.name] = queue
        outputs.append(
            Output(d.name, pub, rules=d.route.rules, operator=d.route.operator, queue=queue)
        )
    telemetry = TelemetryOutput(
        destinations(w.plan),
        queues,
        w.topics,
        w.plan.telemetry,
        gateway_id=w.plan.gateway_id,
        secret=w.secret,
    )
    if telemetry.active:
        first = next(o for o in outputs if o.name in telemetry.submitted)
        first.observer = TelemetryObserver(telemetry)
    return outputs


#: The registry entry: every ``destinations:`` entry (or the lone ``broker:``).
MQTT = OutputKind(positions=_positions, build=_build)
