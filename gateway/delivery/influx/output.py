"""The InfluxDB history as outputs: events from the outbox, and (optionally) every poll's values."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config.loader import GatewayPlan
from gateway.core.model import Location, Sample
from gateway.core.routing import Route
from gateway.core.vocabulary import PERSONAL_SIGNALS
from gateway.delivery.influx.sink import (
    SINK_NAME,
    InfluxSink,
    RecordSink,
    TelemetryLine,
    history_runner,
    settings_for,
)
from gateway.delivery.registry import Output, OutputKind, TelemetryEncoder, Wiring


class _Lines:
    """A machine's telemetry as line protocol (one :class:`TelemetryLine` per machine)."""

    __slots__ = ("_line",)

    def __init__(self, order_tag: bool) -> None:
        # Signals that identify a person never go into the history.
        self._line = TelemetryLine(PERSONAL_SIGNALS, order_tag=order_tag)

    def encode(
        self, location: Location, samples: Sequence[Sample], order_id: str | None
    ) -> str | None:
        """The poll's line; ``None`` when no sample has a value a field can hold."""
        return self._line.line(location, samples, order_id)


def _positions(plan: GatewayPlan) -> list[str]:
    return [SINK_NAME] if plan.influxdb is not None else []


def _build(w: Wiring) -> list[Output]:
    config = w.plan.influxdb
    if config is None:
        return []
    settings = settings_for(config)
    # The events read the outbox like a destination, so an outage loses nothing.
    queue = w.outbox.record_queue(Route(SINK_NAME), clock=w.clock, delayed_after=w.delayed_after)
    events_sink = InfluxSink(config)
    events = history_runner(
        RecordSink(events_sink), name=SINK_NAME, queue=queue, clock=w.clock, settings=settings
    )
    queue.waker = events.notify
    outputs = [Output(SINK_NAME, events, queue=queue, release=[events_sink.close])]
    if config.telemetry:
        # Telemetry (every read) goes through memory only, bounded in count and bytes: a
        # history database slower than the load loses its oldest telemetry first (counted),
        # never an event, never a poll.
        telemetry_sink = InfluxSink(config)
        telemetry = history_runner(
            telemetry_sink, name=f"{SINK_NAME}.telemetry", clock=w.clock, settings=settings
        )
        order_tag = config.order_tag

        def encoder() -> TelemetryEncoder:
            return _Lines(order_tag)

        outputs.append(
            Output(
                telemetry.name,
                telemetry,
                telemetry=encoder,
                release=[telemetry_sink.close],
            )
        )
    return outputs


#: The registry entry: the ``influxdb:`` section.
INFLUXDB = OutputKind(positions=_positions, build=_build)
