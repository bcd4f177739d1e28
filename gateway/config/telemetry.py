"""The ``telemetry:`` section: how tag values go out over MQTT, and the gateway-wide rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.core.telemetry import TelemetryConfig


class TelemetrySection(TelemetryConfig):
    """The ``telemetry:`` section: delivery options plus the default publish rule.

    Telemetry goes only to destinations whose ``routing.event_types`` names ``telemetry``.
    """

    #: MQTT QoS of telemetry messages (0: at most once, the usual choice for a value stream).
    qos: Literal[0, 1] = 0
    #: Publish telemetry retained, so a late subscriber gets each machine's last message.
    retain: bool = False


@dataclass(frozen=True, slots=True)
class TelemetryPlan:
    """Delivery options of telemetry after validation."""

    qos: Literal[0, 1] = 0
    retain: bool = False


__all__ = ["TelemetryPlan", "TelemetrySection"]
