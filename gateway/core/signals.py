"""Protocol-neutral part of a signal definition: how a raw device value is mapped.

Every protocol's signal config (``adapters/<protocol>/config.py``) extends
:class:`SignalConfig` with its own addressing fields; the mapping fields here are applied
by :mod:`gateway.core.mapping` after the adapter decoded the raw value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.core.telemetry import TelemetryConfig


class SignalConfig(BaseModel):
    """Mapping from a decoded device value to the canonical value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Enum map: device value (as written in YAML, int or str) to canonical value,
    #: e.g. ``{0: idle, 1: running}`` for a state register.
    map: dict[int | str | bool, str | int | float | bool] | None = None
    #: What an unmapped value becomes; ``None`` keeps the raw value.
    map_default: str | int | float | bool | None = None
    scale: float = 1.0
    offset: float = 0.0
    #: Absolute deadband for numeric telemetry: smaller changes are not forwarded (the
    #: OPC UA adapter also asks the server for it; see :mod:`gateway.core.telemetry`).
    deadband: float = Field(default=0.0, ge=0.0)
    #: When this signal's values go out as MQTT telemetry (overrides machine and profile).
    telemetry: TelemetryConfig | None = None
    #: Counters only: whether this counter restarts per order or counts for ever (default:
    #: the tracker's ``counter_mode``).
    mode: Literal["per_order", "lifetime"] | None = None
    #: Counters only: bits after which this counter wraps to 0 (default: ``counter_wrap``).
    wrap: Literal[16, 32] | None = None
