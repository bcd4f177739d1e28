"""The ``telemetry:`` section: how tag values go out over MQTT, and the gateway-wide rule."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from gateway.core.telemetry import TelemetryConfig


class TelemetrySection(TelemetryConfig):
    """The ``telemetry:`` section: delivery options plus the default publish rule.

    Telemetry goes only to destinations whose ``routing.event_types`` names ``telemetry``.
    """

    #: MQTT QoS of telemetry messages (0: at most once, the usual choice for a value stream).
    qos: Literal[0, 1] = 0
    #: Publish telemetry retained, so a late subscriber gets each machine's last message.
    retain: bool = False
    #: Payload MiB of telemetry each destination holds in memory at most (with the count
    #: bound ``max_queue`` of its broker); past either the oldest telemetry is dropped.
    max_queue_mib: float = Field(default=16.0, ge=0.1, le=4096)


@dataclass(frozen=True, slots=True)
class TelemetryPlan:
    """Delivery options of telemetry after validation."""

    qos: Literal[0, 1] = 0
    retain: bool = False
    max_queue_mib: float = 16.0

    @property
    def max_queue_bytes(self) -> int:
        """``max_queue_mib`` in bytes."""
        return round(self.max_queue_mib * 1024 * 1024)


def idle_telemetry(configured: bool, event_types: Iterable[Sequence[str]]) -> list[str]:
    """A warning when telemetry rules are set but no destination admits telemetry."""
    if not configured or any("telemetry" in types for types in event_types):
        return []
    return [
        "telemetry: publish rules are set but no destination admits telemetry, so none is "
        "sent; add telemetry to a destination's routing.event_types (a destinations: entry: "
        "broker: has no routing)"
    ]


__all__ = ["TelemetryPlan", "TelemetrySection", "idle_telemetry"]
