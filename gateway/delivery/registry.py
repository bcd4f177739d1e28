"""The registry of outputs: kind -> how to build that kind's destinations from the config plan.

The runtime builds every destination through :func:`build` and then treats them alike: it
runs and closes their runners, routes each event to the outputs whose rules accept it,
hands retained state and status to those that take them, offers every poll's telemetry to
those with a telemetry encoder, tells every output's :class:`Observer` what happens to the
machines (the samples of each poll, connection changes, retained-state snapshots, machines
removed at reload, a reloaded plan), runs the observers' tasks, closes them, and reports
their state. Nothing in the runtime names a kind of output.

Adding an output (Sparkplug B, Kafka, a web feed): a folder under ``gateway/delivery/``
with a :class:`~gateway.delivery.sink.Sink` and an :class:`OutputKind`, and one entry in
:data:`KINDS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config.loader import GatewayPlan, MachinePlan
from gateway.contract.envelope import Topics
from gateway.core.model import Location, Sample
from gateway.core.routing import OperatorPolicy, RouteRules
from gateway.delivery.outbox import Outbox, OutboxQueue
from gateway.delivery.reporting import DestinationStates
from gateway.delivery.sink import Accepts, SinkRunner

#: What an output without a sink runner takes from the outbox and the status: nothing.
_NOTHING = Accepts(frozenset())


class Figures(DestinationStates, Protocol):
    """The metrics an observer may report into (besides a destination's state)."""

    def telemetry(self, submitted: Mapping[str, int], dropped: Mapping[str, int]) -> None:
        """Telemetry messages queued and dropped so far per destination (totals)."""
        ...


class Observer:
    """What an output learns about the machines besides their events; every hook a no-op.

    The runtime calls each hook for every output that has an observer, in one loop over
    the outputs, and never asks what kind of output it is. Hooks run on the event loop and
    must not block: they hand work to their own queue or task.
    """

    def configure(self, plan: GatewayPlan) -> None:
        """The plan at start and after every reload (machines added, changed, removed)."""

    def samples(self, machine: MachinePlan, mapped: Sequence[Sample], now: float) -> None:
        """A machine's mapped samples of one poll."""

    def connection(self, machine: str, connected: bool) -> None:
        """A machine's device connection went up or down."""

    def state(self, machine: str, snapshot: Mapping[str, Any]) -> None:
        """A machine's tracker snapshot (whenever its retained state is published)."""

    def removed(self, machine: str) -> None:
        """A machine was removed from the config at reload."""

    def start(self) -> list[asyncio.Task[None]]:
        """Start the output's own tasks (sessions); the runtime supervises them."""
        return []

    async def close(self, grace: float) -> None:
        """Flush and end within ``grace`` seconds (at shutdown, beside the runners)."""

    def report(self, metrics: Figures) -> None:
        """Copy the output's own figures into the metrics (once a second)."""


class TelemetryEncoder(Protocol):
    """Turns one machine's poll into one record of an output (one per machine: it may cache)."""

    def encode(
        self, location: Location, samples: Sequence[Sample], order_id: str | None
    ) -> Any | None:
        """The poll's record; ``None`` when there is nothing to send."""
        ...


@dataclass(slots=True)
class Output:
    """One built destination: its runner and how the runtime feeds it."""

    name: str
    #: The runner that drains its sink; ``None`` for an output that runs its own session
    #: (a Sparkplug B edge node) and is fed through its :attr:`observer` only.
    runner: SinkRunner[Any] | None
    #: Which machines, events and orders it may see (routing); the default sees all.
    rules: RouteRules = RouteRules()  # noqa: RUF009 - frozen, safe to share
    #: What happens to the operator badge in what it receives.
    operator: OperatorPolicy = "drop"
    #: The durable outbox queue it drains (events), ``None`` when it drains memory only.
    queue: OutboxQueue | None = None
    #: A new per-machine encoder of poll telemetry, when it takes telemetry.
    telemetry: Callable[[], TelemetryEncoder] | None = None
    #: Told about the machines besides their events (see :class:`Observer`).
    observer: Observer | None = None
    #: Called once at the very end (releases clients, connection pools).
    release: list[Callable[[], None]] = field(default_factory=list)

    @property
    def accepts(self) -> Accepts:
        """What its sink takes (an output without a runner: nothing)."""
        return self.runner.sink.accepts if self.runner is not None else _NOTHING


@dataclass(frozen=True, slots=True)
class Wiring:
    """What a kind's builder may use."""

    plan: GatewayPlan
    outbox: Outbox
    topics: Topics
    started_at: float
    clock: Callable[[], float]
    #: The redaction secret (pseudonyms), if configured.
    secret: bytes | None
    #: Seconds after which a row sent late carries ``"delayed": true``.
    delayed_after: float
    #: The outbox's bound, shown as the durable outputs' limit.
    outbox_limit: int


@dataclass(frozen=True, slots=True)
class OutputKind:
    """One kind of output: the outbox positions it needs, and how to build it."""

    #: Names of the outbox positions (durable queues) the plan asks this kind for.
    positions: Callable[[GatewayPlan], list[str]]
    build: Callable[[Wiring], list[Output]]


def _kinds() -> dict[str, OutputKind]:
    # Imported here: each kind's module imports this one for Output and Wiring.
    from gateway.delivery.influx.output import INFLUXDB
    from gateway.delivery.mqtt.output import MQTT
    from gateway.delivery.sparkplug.output import SPARKPLUG

    return {"mqtt": MQTT, "influxdb": INFLUXDB, "sparkplug": SPARKPLUG}


#: Every kind of output, by the name the config uses for it.
KINDS: dict[str, OutputKind] = {}


def kinds() -> dict[str, OutputKind]:
    """The registry (filled on first use)."""
    if not KINDS:
        KINDS.update(_kinds())
    return KINDS


def positions(plan: GatewayPlan) -> list[str]:
    """Every outbox position the plan's outputs read, in registry order."""
    return [name for kind in kinds().values() for name in kind.positions(plan)]


def build(wiring: Wiring) -> list[Output]:
    """Every output the plan asks for, in registry order (the first MQTT destination first)."""
    outputs = [o for kind in kinds().values() for o in kind.build(wiring)]
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise ValueError(f"output names must be unique, got {names}")
    return outputs


def observers(outputs: Sequence[Output]) -> list[Observer]:
    """The observers of ``outputs``, in order."""
    return [o.observer for o in outputs if o.observer is not None]
