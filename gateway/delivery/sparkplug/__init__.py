"""Sparkplug B 3.0 edge nodes: the ``format: sparkplug`` destinations.

:class:`SparkplugNodes` is all the runtime sees: built from the plan, started and closed
with the publishers, fed with every machine's mapped samples, tracker snapshots and
connection losses. Each destination is one :class:`~.client.SparkplugNode` (one edge
node, one MQTT session); the machines its ``routing.machines`` admits are its devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.config.loader import DestinationPlan, GatewayPlan
from gateway.core.model import Sample
from gateway.core.routing import machine_visible
from gateway.delivery.sparkplug.client import SparkplugNode, SparkplugSettings


def settings_for(d: DestinationPlan, state_dir: Path | None = None) -> SparkplugSettings:
    """A ``format: sparkplug`` destination's plan as edge node settings.

    ``state_dir``: where its ``bdSeq`` is kept across restarts (beside the outbox).
    """
    assert d.sparkplug is not None, "not a sparkplug destination"
    # The destination's broker plan as compiled (one plan per concept): TLS, secret password.
    broker = d.broker
    return SparkplugSettings(
        name=d.name,
        broker=broker,
        group_id=d.sparkplug.group_id,
        edge_node_id=d.sparkplug.edge_node_id,
        primary_host_id=d.sparkplug.primary_host_id,
        operator=d.route.operator,
        state_file=state_dir / f"sparkplug-{d.name}.bdseq" if state_dir is not None else None,
    )


class SparkplugNodes:
    """Every Sparkplug B edge node of one gateway, behind one narrow interface."""

    def __init__(
        self,
        destinations: Sequence[DestinationPlan],
        *,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
        state_dir: Path | None = None,
    ) -> None:
        self._clock = clock
        self.nodes = [
            (d.route.rules, SparkplugNode(settings_for(d, state_dir), secret=secret, clock=clock))
            for d in destinations
        ]
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_plan(
        cls, plan: GatewayPlan, secret: bytes | None, clock: Callable[[], float] = time.time
    ) -> SparkplugNodes:
        """The plan's ``format: sparkplug`` destinations (none: an inert instance)."""
        state_dir = plan.outbox.path.parent if plan.outbox is not None else None
        return cls(plan.sparkplug, secret=secret, clock=clock, state_dir=state_dir)

    def start(self) -> list[asyncio.Task[None]]:
        """Start every edge node's session; returns their tasks."""
        self._tasks = [
            asyncio.create_task(node.run(), name=f"sparkplug[{node.name}]")
            for _, node in self.nodes
        ]
        return list(self._tasks)

    async def close(self, grace: float) -> None:
        """Publish every NDEATH and end the sessions (within ``grace`` seconds)."""
        await asyncio.gather(*(n.close(grace) for _, n in self.nodes), return_exceptions=True)
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.shield(t)
            t.cancel()

    def samples(self, machine: str, mapped: Sequence[Sample]) -> None:
        """A machine's mapped samples of one poll."""
        for rules, node in self.nodes:
            if machine_visible(rules, machine):
                node.observe(machine, mapped)

    def state(self, machine: str, snapshot: Mapping[str, Any]) -> None:
        """A machine's tracker snapshot (its order metrics)."""
        for rules, node in self.nodes:
            if machine_visible(rules, machine):
                node.order_state(machine, snapshot)

    def connected(self, machine: str, connected: bool) -> None:
        """A machine's device connection went up or down (down: DDEATH)."""
        if connected:
            return
        for rules, node in self.nodes:
            if machine_visible(rules, machine):
                node.device_lost(machine)

    def health(self) -> dict[str, dict[str, Any]]:
        """Each edge node's health, by destination name."""
        return {node.name: node.health() for _, node in self.nodes}
