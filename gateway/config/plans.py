"""The run plan: what the config compiles to, frozen and validated; nothing at runtime reads config.

One plan type per concept: a section's pydantic model (:mod:`gateway.config.models`) is what the
file says, its plan here is what the gateway runs with. :class:`BrokerPlan` is also what the MQTT
publisher consumes: the runtime adds the session parts (status topic and payloads) with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, SecretStr

from gateway.config.influx import InfluxConfig
from gateway.config.protocols import ProtocolSpec
from gateway.config.telemetry import TelemetryPlan
from gateway.core.backoff import Backoff
from gateway.core.model import Location
from gateway.core.routing import Route
from gateway.core.signals import SignalConfig
from gateway.core.telemetry import DEFAULT_RULE, PublishRule
from gateway.core.tracker import TrackerSettings

#: Packet ids in use at once must stay below MQTT's 65,535 (QoS 0 writes take one too).
MAX_WINDOW = 60_000


@dataclass(frozen=True, slots=True)
class TlsPlan:
    """TLS for a broker connection; no CA file means the system trust store."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True


@dataclass(frozen=True, slots=True)
class BrokerPlan:
    """Everything one publisher needs to reach one broker; the password stays a ``SecretStr``.

    The config compiles the connection fields; the runtime fills in the session fields
    (status topic and payloads) before handing the plan to a publisher.
    """

    host: str
    port: int = 1883
    client_id: str = "shopfloor"
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    tls: TlsPlan | None = None
    keepalive: int = 30
    status_topic: str = ""
    online_payload: bytes = b""
    will_payload: bytes = b""
    offline_payload: bytes = b""
    #: Builds the offline status when the publisher says goodbye, so that its ``time`` is
    #: the shutdown's; ``offline_payload`` when unset.
    offline_status: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)
    #: Messages kept in memory while the broker is unreachable (non-durable ones: state).
    max_queue: int = 100_000
    window: int = 100
    connect_timeout: float = 5.0
    backoff: Backoff = Backoff(base=0.5, cap=30.0)  # noqa: RUF009 - frozen, safe to share
    #: MQTT protocol version; "5" works through aiomqtt but the contract targets 3.1.1.
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    #: A PUBACK later than this means the link is stuck: reconnect and resend.
    ack_timeout: float = 30.0
    #: A link up this long (seconds) ends an outage for good: a cause seen before it is
    #: logged at warning again; links closed sooner count towards a session takeover.
    stable_after: float = 30.0

    def __post_init__(self) -> None:
        """Reject settings that cannot work, with a message naming the field."""
        password: object = self.password
        if isinstance(password, str):
            # Built in code with a plain string: wrap it, so it shows nowhere either.
            object.__setattr__(self, "password", SecretStr(password))
        if not self.host:
            raise ValueError("broker host must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port must be 1..65535, got {self.port}")
        if not 1 <= self.window <= MAX_WINDOW:
            # Each message in flight holds one of MQTT's 16-bit packet ids.
            raise ValueError(f"window must be 1..{MAX_WINDOW}, got {self.window}")
        if self.max_queue < self.window:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= window ({self.window})")
        if self.keepalive < 1:
            raise ValueError(f"keepalive must be >= 1 s, got {self.keepalive}")
        for name in ("connect_timeout", "ack_timeout", "stable_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.password is not None and self.username is None:
            raise ValueError("a broker password needs a username")
        if self.protocol not in ("3.1.1", "5"):
            raise ValueError(f"protocol must be '3.1.1' or '5', got {self.protocol!r}")

    @property
    def password_text(self) -> str | None:
        """The password in clear, for the MQTT client only."""
        return self.password.get_secret_value() if self.password is not None else None


@dataclass(frozen=True, slots=True)
class DestinationPlan:
    """One destination: its broker and its route (rules, batch mode, operator policy)."""

    name: str
    broker: BrokerPlan
    route: Route
    #: Whether this destination's broker is listened to for order commands.
    commands: bool = True
    #: Set for a ``format: sparkplug`` destination (a Sparkplug B edge node).
    sparkplug: SparkplugPlan | None = None


@dataclass(frozen=True, slots=True)
class SparkplugPlan:
    """The Sparkplug B ids of a ``format: sparkplug`` destination."""

    group_id: str
    edge_node_id: str
    primary_host_id: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxPlan:
    """Where and how big the durable outbox is."""

    path: Path
    max_events: int
    delayed_after: float


@dataclass(frozen=True, slots=True)
class MachinePlan:
    """Everything the runtime needs for one machine."""

    id: str
    location: Location
    protocol: ProtocolSpec
    profile: str | None
    connection: BaseModel
    signals: Mapping[str, SignalConfig]
    poll_interval: float
    tracker: TrackerSettings
    #: Telemetry publish rule per signal (signals left out follow the default rule).
    telemetry: Mapping[str, PublishRule] = field(default_factory=dict)
    #: The rule of values no signal config names (a state derived from the counters).
    telemetry_default: PublishRule = DEFAULT_RULE


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    """The compiled config: frozen, validated, ready to run."""

    source: str
    gateway_id: str
    site: str
    topic_prefix: str
    broker: BrokerPlan
    machines: tuple[MachinePlan, ...]
    log_level: str
    log_format: str
    warnings: tuple[str, ...] = field(default=())
    #: Every destination; ``broker`` is the first one's broker (commands listen there).
    destinations: tuple[DestinationPlan, ...] = field(default=())
    outbox: OutboxPlan | None = None
    redaction_secret: SecretStr | None = field(default=None, repr=False)
    #: ``(host, port)`` of ``/healthz`` and ``/metrics``; ``None`` = off.
    health_listen: tuple[str, int] | None = None
    #: Readiness bound on the oldest undelivered event (``health.max_pending_age``).
    health_max_pending_age: float = 60.0
    #: Whether the web console is served beside ``/healthz`` and ``/metrics``.
    console: bool = True
    #: The console's write token; ``None``: the console is read-only.
    console_token: SecretStr | None = field(default=None, repr=False)
    #: The destination whose routing rules console commands are held to; ``None``: none.
    console_scope: str | None = None
    influxdb: InfluxConfig | None = field(default=None, repr=False)
    #: Log level per component (logger name prefix).
    log_levels: Mapping[str, str] = field(default_factory=dict)
    #: QoS and retain flag of MQTT telemetry.
    telemetry: TelemetryPlan = field(default_factory=TelemetryPlan)
    #: The ``format: sparkplug`` destinations (not in ``destinations``: no outbox queue,
    #: no CloudEvents, no commands).
    sparkplug: tuple[DestinationPlan, ...] = field(default=())
