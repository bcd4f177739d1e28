"""Sparkplug B edge nodes as outputs: one per ``format: sparkplug`` destination.

An edge node runs its own MQTT session (NBIRTH/NDEATH, the primary host's STATE, rebirth
requests), so it has no sink runner and no outbox position: the runtime feeds it through
its :class:`~gateway.delivery.registry.Observer` (each poll's mapped samples become DDATA,
a lost or removed machine DDEATH, the tracker snapshots the order metrics) and runs and
closes its session task like any output's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config.loader import GatewayPlan, MachinePlan
from gateway.core.model import Sample
from gateway.delivery.registry import Observer, Output, OutputKind, Wiring
from gateway.delivery.sparkplug import SparkplugNodes


class SparkplugObserver(Observer):
    """Feeds one edge node (:class:`SparkplugNodes` of one destination) from the runtime."""

    def __init__(self, nodes: SparkplugNodes) -> None:
        self.nodes = nodes

    def samples(self, machine: MachinePlan, mapped: Sequence[Sample], now: float) -> None:
        """A poll's values: DBIRTH on first sight, DDATA for what changed."""
        self.nodes.samples(machine.id, mapped)

    def connection(self, machine: str, connected: bool) -> None:
        """A lost device: DDEATH."""
        self.nodes.connected(machine, connected)

    def state(self, machine: str, snapshot: Mapping[str, Any]) -> None:
        """The tracker snapshot: the order metrics."""
        self.nodes.state(machine, snapshot)

    def removed(self, machine: str) -> None:
        """A machine gone from the config: DDEATH, as for a lost device."""
        self.nodes.connected(machine, False)

    def start(self) -> list[asyncio.Task[None]]:
        """The edge node's session task."""
        return self.nodes.start()

    async def close(self, grace: float) -> None:
        """NDEATH and the end of the session."""
        await self.nodes.close(grace)


def _positions(plan: GatewayPlan) -> list[str]:
    # Fed from memory: the edge node holds what it cannot send and replays it with
    # is_historical (its own store-and-forward).
    return []


def _build(w: Wiring) -> list[Output]:
    state_dir = w.plan.outbox.path.parent if w.plan.outbox is not None else None
    return [
        Output(
            d.name,
            None,
            rules=d.route.rules,
            operator=d.route.operator,
            observer=SparkplugObserver(
                SparkplugNodes([d], secret=w.secret, clock=w.clock, state_dir=state_dir)
            ),
        )
        for d in w.plan.sparkplug
    ]


#: The registry entry: every ``format: sparkplug`` destination.
SPARKPLUG = OutputKind(positions=_positions, build=_build)
