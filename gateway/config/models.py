"""The config file's shape: pydantic models (``extra="forbid"``, frozen), one per section.

They check shape and types only; what a section means is decided by its compile unit under
:mod:`gateway.config.units`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from gateway.config.influx import InfluxConfig
from gateway.config.listen import parse_listen
from gateway.config.telemetry import TelemetrySection
from gateway.core.telemetry import TelemetryConfig

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _identifier(value: str) -> str:
    # These values become MQTT topic segments: '+', '#' and '/' would change the meaning
    # of a topic filter, NUL is illegal in MQTT strings.
    if not _ID_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid identifier: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (it becomes an MQTT topic segment)"
        )
    return value


def _topic_prefix(value: str) -> str:
    for segment in value.split("/"):
        _identifier(segment)
    return value


def _sparkplug_id(value: str) -> str:
    # Sparkplug B 3.0: group, edge node, device and host ids are topic segments: any UTF-8
    # but the MQTT wildcards and the level separator. Control characters and blanks at the
    # ends are refused too: they make ids that look equal and are not.
    bad = sorted({c for c in value if c in "+#/" or not c.isprintable()})
    if not value or bad or value != value.strip() or len(value) > 64:
        raise ValueError(
            f"{value!r} is not a valid Sparkplug id: use 1-64 characters without '+', '#', "
            "'/', control characters or blanks at the ends (it becomes a topic segment)"
        )
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
SparkplugId = Annotated[str, AfterValidator(_sparkplug_id)]
TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]


class _Model(BaseModel):
    """The base of every section: unknown keys are errors, and a loaded config is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayConfig(_Model):
    """Who this gateway is and where its topics live."""

    id: Identifier
    site: Identifier
    topic_prefix: TopicPrefix = "shopfloor"


class TlsConfig(_Model):
    """MQTT over TLS; present (even empty) means TLS is on, with the system CAs by default."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True


class BrokerConfig(_Model):
    """The MQTT broker the gateway publishes to."""

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    #: A file holding the password (first line), e.g. a systemd credential or a secret mount.
    password_file: str | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    tls: TlsConfig | None = None
    #: MQTT protocol version.
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    #: Messages kept in memory per destination (telemetry, state, status) while the broker
    #: is slow or unreachable; past it the oldest telemetry goes first (counted). Events
    #: wait in the durable outbox (``outbox.max_events``) instead.
    max_queue: int = Field(default=100_000, ge=100, le=10_000_000)
    #: Accept plain TCP or anonymous MQTT to a broker on another machine (logged at start).
    allow_insecure: bool = False

    @field_validator("username", "password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # ``${MQTT_USERNAME:-}`` with the variable unset means "no credentials".
        return None if value == "" else value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # Not quoted back: a URL here often carries a password (mqtts://user:pw@host).
        if "://" in value or "@" in value or "/" in value or any(c.isspace() for c in value):
            raise ValueError(
                "host is a host name or IP address, not a URL: put the port in 'port', "
                "credentials in 'username'/'password', and use 'tls:' for mqtts"
            )
        return value


class RoutingConfig(_Model):
    """Which machines, event types and orders a destination receives; unset means all."""

    machines: list[str] = Field(default_factory=list)
    event_types: list[str] = Field(default_factory=list)
    customers: list[str] = Field(default_factory=list)
    order_ids: list[str] = Field(default_factory=list)


class DestinationConfig(BrokerConfig):
    """One broker the gateway publishes to, with its own routing and redaction."""

    name: Identifier
    routing: RoutingConfig = RoutingConfig()
    #: Send backlogs as CloudEvents batches (``application/cloudevents-batch+json``).
    batch: bool = False
    #: What happens to the ``operator`` signal: dropped, pseudonymised, or passed on.
    operator: Literal["drop", "pseudonymise", "pass"] = "drop"
    #: Whether order commands are taken from this destination's broker. Unset: yes, unless
    #: a destination listed before it already owns the commands of the same machines (see
    #: :func:`~gateway.config.units.destinations.command_owners`).
    commands: bool | None = None
    #: What goes out: the contract's CloudEvents, or a Sparkplug B 3.0 edge node.
    format: Literal["cloudevents", "sparkplug"] = "cloudevents"
    #: Sparkplug only: the group id (default: ``gateway.site``).
    group_id: SparkplugId | None = None
    #: Sparkplug only: the edge node id (default: ``gateway.id``).
    edge_node_id: SparkplugId | None = None
    #: Sparkplug only: publish only while this host application's STATE is online.
    primary_host_id: SparkplugId | None = None

    @model_validator(mode="after")
    def _sparkplug_keys(self) -> DestinationConfig:
        if self.format == "sparkplug":
            r = self.routing
            unsupported = [
                k
                for k, v in (
                    ("batch", self.batch),
                    ("commands", self.commands),
                    ("routing.event_types", r.event_types),
                    ("routing.customers", r.customers),
                    ("routing.order_ids", r.order_ids),
                )
                if v
            ]
            if unsupported:
                raise ValueError(
                    f"{', '.join(unsupported)}: not available with format: sparkplug (a "
                    "Sparkplug edge node publishes every metric of the machines in "
                    "routing.machines and takes no order commands)"
                )
        else:
            given = [
                k
                for k in ("group_id", "edge_node_id", "primary_host_id")
                if getattr(self, k) is not None
            ]
            if given:
                raise ValueError(f"{', '.join(given)}: only with format: sparkplug")
        return self


class OutboxConfig(_Model):
    """The durable outbox (SQLite); ``path`` defaults to ``{state_dir}/shopfloor-outbox.db``."""

    path: str | None = None
    #: Rows kept at most; beyond it superseded ``order.progress`` rows are dropped.
    max_events: int = Field(default=1_000_000, ge=100, le=100_000_000)
    #: Events sent later than this after they were committed carry ``"delayed": true``.
    delayed_after: float = Field(default=5.0, gt=0, le=86_400)


class RedactionConfig(_Model):
    """The site secret that keys operator pseudonyms."""

    secret: SecretStr | None = None
    secret_file: str | None = None

    @field_validator("secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class TrackerConfig(_Model):
    """Order-tracking settings; unset fields inherit from the profile, then the defaults."""

    progress_step_percent: float | None = Field(default=None, gt=0, le=100)
    progress_interval: float | None = Field(default=None, gt=0, le=86_400)
    rate_window: float | None = Field(default=None, gt=0, le=7 * 86_400)
    counter_mode: Literal["per_order", "lifetime"] | None = None
    counter_wrap: Literal[16, 32] | None = Field(
        default=None, description="bits after which the device counter wraps to 0"
    )
    scrap_source: Literal["counter", "total_minus_good", "none"] | None = None
    complete_on_target: bool | None = None
    #: What completes an order: any of good_reached, total_reached, device_ended (with
    #: order_changed, always). Unset: good_reached and order_changed.
    complete_when: (
        list[Literal["good_reached", "total_reached", "device_ended", "order_changed"]] | None
    ) = Field(default=None, min_length=1)

    @field_validator("complete_when")
    @classmethod
    def _completion(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if "order_changed" not in value:
            raise ValueError(
                "must include order_changed: a machine that moved to another order has "
                "ended this one"
            )
        if {"good_reached", "total_reached"} <= set(value):
            raise ValueError(
                "good_reached and total_reached together: the target has one basis, good "
                "pieces or all pieces"
            )
        return value

    #: Which order source wins when the device and the platform both name one.
    order_source: Literal["device", "platform", "device_then_platform"] | None = None
    #: Seconds of production history needed before a rate (and so an ETA) is given.
    rate_min_span: float | None = Field(default=None, ge=0, le=86_400)
    #: A fixed largest counter step in one reading; unset derives it from
    #: ``max_rate_per_hour`` and the time since the last reading (docs/tracker.md).
    max_counter_jump: int | None = Field(default=None, ge=1, le=2**32)
    #: Fastest the machine can count, pieces per hour per counter (bounds a plausible step).
    max_rate_per_hour: float | None = Field(default=None, gt=0, le=100_000_000)
    #: Consecutive agreeing readings that confirm a counter reset or a large jump.
    counter_confirm: int | None = Field(default=None, ge=1, le=10)
    #: A counter drop by at most this many counts is a glitch, not a reset.
    counter_glitch: int | None = Field(default=None, ge=0, le=1_000_000)


class HealthConfig(_Model):
    """The local HTTP endpoint: ``/healthz``, ``/metrics`` and the web console."""

    #: ``host:port`` (an IP address; ``[v6]:port``), or null to switch the endpoint off.
    listen: str | None = "127.0.0.1:9108"
    #: Not ready once a destination's oldest undelivered event is older than this (seconds)
    #: and it acknowledged nothing for as long: disconnected, or connected but stuck.
    max_pending_age: float = Field(default=60.0, gt=0, le=86_400)
    #: Serve the web console and its API on the same port (false: health and metrics only).
    console: bool = True
    #: The console's write token (``${VAR}``), or a file holding it; without one the
    #: console is read-only. Required when ``listen`` is not a loopback address.
    token: SecretStr | None = None
    token_file: str | None = None
    #: Hold console commands to this destination's routing rules (its customers, its
    #: machines); unset: the console may address every machine and order.
    commands_as: str | None = None

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


class LoggingConfig(_Model):
    """Log level and format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    #: Level per component, by logger name prefix:
    #: ``{gateway.delivery.outbox: debug, pymodbus: info}``.
    levels: dict[
        Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_.]*$")],
        Literal["debug", "info", "warning", "error"],
    ] = Field(default_factory=dict)


class ProfileConfig(_Model):
    """A reusable machine description."""

    protocol: str
    description: str = ""
    poll_interval: float | None = Field(default=None, ge=0.05, le=3600)
    tracker: TrackerConfig | None = None
    #: Connection defaults shared by every machine of the profile (word order, namespace
    #: aliases, browse root); a machine's own ``connection`` keys win.
    connection: dict[str, Any] = Field(default_factory=dict)
    #: When the profile's signals go out as MQTT telemetry (a signal's own block wins).
    telemetry: TelemetryConfig | None = None
    signals: dict[str, dict[str, Any] | None] = Field(default_factory=dict)


class MachineConfig(_Model):
    """One machine on the shop floor."""

    id: Identifier
    area: Identifier
    line: Identifier
    site: Identifier | None = None
    profile: str | None = None
    connection: dict[str, Any]
    poll_interval: float | None = Field(default=None, ge=0.05, le=3600)
    tracker: TrackerConfig | None = None
    #: When this machine's signals go out as MQTT telemetry (over the profile's rule).
    telemetry: TelemetryConfig | None = None
    signals: dict[str, dict[str, Any] | None] = Field(default_factory=dict)


class Config(_Model):
    """The whole config file."""

    gateway: GatewayConfig
    #: Shorthand for one destination named ``default``.
    broker: BrokerConfig | None = None
    destinations: list[DestinationConfig] = Field(default_factory=list)
    #: Where the gateway keeps its state (the outbox); see :func:`default_state_dir`.
    state_dir: str | None = None
    outbox: OutboxConfig = OutboxConfig()
    redaction: RedactionConfig = RedactionConfig()
    tracker: TrackerConfig = TrackerConfig()
    logging: LoggingConfig = LoggingConfig()
    health: HealthConfig = HealthConfig()
    #: Optional history in InfluxDB (v2 write API); null = off.
    influxdb: InfluxConfig | None = None
    #: Tag values over MQTT to destinations that admit ``telemetry``: QoS, retain, and
    #: the default publish rule of every signal.
    telemetry: TelemetrySection = TelemetrySection()
    profile_dirs: list[str] = Field(default_factory=list)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    machines: list[MachineConfig] = Field(min_length=1)
