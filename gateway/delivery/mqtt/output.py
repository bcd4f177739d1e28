"""MQTT destinations as outputs: one publisher per configured destination, fed from the outbox."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway import __version__
from gateway.config.loader import DestinationPlan, GatewayPlan
from gateway.contract.envelope import Topics, encode_status
from gateway.core.routing import Route
from gateway.delivery.mqtt.publisher import BrokerSettings, MqttPublisher, TlsSettings
from gateway.delivery.registry import Output, OutputKind, Wiring

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


def _positions(plan: GatewayPlan) -> list[str]:
    return [d.name for d in destinations(plan)]


def _build(w: Wiring) -> list[Output]:
    outputs = []
    for d in destinations(w.plan):
        queue = w.outbox.queue(
            d.route,
            clock=w.clock,
            delayed_after=w.delayed_after,
            batch_topic=batch_topic(w.topics) if d.route.batch else None,
            secret=w.secret,
        )
        pub = MqttPublisher(
            broker_settings(w.plan, w.topics, w.started_at, d, w.clock),
            name=d.name,
            queue=queue,
            limit=w.outbox_limit,
        )
        queue.waker = pub.notify
        outputs.append(
            Output(d.name, pub, rules=d.route.rules, operator=d.route.operator, queue=queue)
        )
    return outputs


#: The registry entry: every ``destinations:`` entry (or the lone ``broker:``).
MQTT = OutputKind(positions=_positions, build=_build)
