"""The gateway's one YAML config file: models, validation and compilation into a run plan.

Reading a config happens in three steps, and every step collects *all* problems instead of
stopping at the first, each with file, line and field path:

1. :mod:`gateway.config.yamlsource` parses YAML, remembering lines and refusing duplicate keys;
   ``${ENV}`` references are substituted (``$$`` is a literal ``$``).
2. Pydantic models (``extra="forbid"``, frozen) check shape and types.
3. :func:`compile_config` resolves profiles, merges signals, validates each signal with its
   protocol's model, checks cross-field rules, and returns a frozen :class:`GatewayPlan`.
   Nothing at runtime looks at raw config.

A profile is a reusable machine description (protocol, poll interval, signals, tracker
settings): built-in ones live in ``config/profiles/*.yaml``; a config may add its own under
``profiles:`` or point ``profile_dirs:`` at more files. A machine names a profile and adds or
overrides single signals (``signals: {stitch_rate: null}`` removes one).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
)

from gateway.config.influx import InfluxConfig
from gateway.config.listen import parse_listen
from gateway.config.protocols import ProtocolSpec, installed
from gateway.config.telemetry import TelemetryPlan, TelemetrySection, idle_telemetry
from gateway.config.yamlsource import (
    Located,
    Path_,
    SourceError,
    format_path,
    load,
    lookup,
    strip_url_credentials,
)
from gateway.core.model import CANONICAL_SIGNALS, Location, MachineState
from gateway.core.routing import (
    OperatorPolicy,
    Route,
    RouteRules,
    idle_operator_policies,
    machine_visible,
)
from gateway.core.signals import SignalConfig
from gateway.core.telemetry import DEFAULT_RULE, PublishRule, TelemetryConfig, resolve
from gateway.core.tracker import COUNTER_SIGNALS, TrackerSettings

#: Built-in profiles shipped with the project.
#: ``gateway/data`` is a link to the checkout's ``config/`` folder, so the profiles are the
#: same files in a checkout and inside an installed wheel (where the link becomes a copy).
BUILTIN_PROFILE_DIR = Path(__file__).resolve().parents[1] / "data" / "profiles"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SIGNAL_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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


Identifier = Annotated[str, AfterValidator(_identifier)]
TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]


class _Model(BaseModel):
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
    #: Messages kept in memory while the broker is unreachable (non-durable ones: state).
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
    #: :func:`_command_owners`).
    commands: bool | None = None


class OutboxConfig(_Model):
    """The durable outbox (SQLite); ``path`` defaults to ``{state_dir}/shopfloor-outbox.db``."""

    path: str | None = None
    #: Rows kept at most; beyond it telemetry, then superseded progress are dropped.
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


# ---------------------------------------------------------------------------- run plan


@dataclass(frozen=True, slots=True)
class TlsPlan:
    """TLS settings after validation."""

    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify_hostname: bool


@dataclass(frozen=True, slots=True)
class BrokerPlan:
    """Broker settings after validation; the password stays a ``SecretStr``."""

    host: str
    port: int
    client_id: str
    username: str | None
    password: SecretStr | None
    keepalive: int
    tls: TlsPlan | None
    max_queue: int
    protocol: Literal["3.1.1", "5"] = "3.1.1"


@dataclass(frozen=True, slots=True)
class DestinationPlan:
    """One destination: its broker and its route (rules, batch mode, operator policy)."""

    name: str
    broker: BrokerPlan
    route: Route
    #: Whether this destination's broker is listened to for order commands.
    commands: bool = True


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


class ConfigError(Exception):
    """A config file has problems; ``errors`` lists every one with file and line."""

    def __init__(self, errors: Iterable[SourceError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


DEFAULT_POLL_INTERVAL = 1.0

_M = TypeVar("_M", bound=BaseModel)


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayPlan:
    """Read, validate and compile a config file; raise :class:`ConfigError` with all problems."""
    env = os.environ if env is None else env
    src = load(path)
    if src.errors:
        raise ConfigError(src.errors)
    if not isinstance(src.data, dict):
        raise ConfigError(
            [SourceError(src.file, 1, "", "the config must be a mapping (key: value) at the top")]
        )
    errors: list[SourceError] = []
    src.data = _substitute_env(src.data, (), env, src, errors)
    hidden = _Hidden(src.data, src, env)
    config = _validate(Config, src.data, src, (), errors)
    if config is None or errors:
        raise ConfigError(hidden.errors(errors))
    plan = _compile(config, src, Path(path), errors)
    if errors or plan is None:
        raise ConfigError(hidden.errors(errors))
    # Warnings are printed by check and logged at start: the same rule as for errors.
    return replace(plan, warnings=tuple(hidden.scrub(w) for w in plan.warnings))


def _substitute_env(
    data: Any, path: Path_, env: Mapping[str, str], src: Located, errors: list[SourceError]
) -> Any:
    if isinstance(data, dict):
        return {k: _substitute_env(v, (*path, str(k)), env, src, errors) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_env(v, (*path, i), env, src, errors) for i, v in enumerate(data)]
    if isinstance(data, str) and "$" in data:
        used = False

        def repl(m: re.Match[str]) -> str:
            nonlocal used
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in env:
                # Only values from the environment are hidden: a default is in the file.
                used = True
                return env[name]
            if default is not None:
                return default
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(path),
                    format_path(path),
                    f"environment variable {name} is not set "
                    f"(set it, or write ${{{name}:-default}})",
                )
            )
            return ""

        text = _ENV_RE.sub(repl, data)
        if used:
            # Error messages show the reference as written, never what it stood for: a
            # ${MQTT_PASSWORD} put in the wrong field must not end up on a terminal or in a log.
            src.substituted[path] = data
        return text
    return data


def _validate(
    model: type[_M], data: Any, src: Located, base: Path_, errors: list[SourceError]
) -> _M | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.extend(_errors_from(exc, data, src, base))
        return None


def _errors_from(exc: ValidationError, data: Any, src: Located, base: Path_) -> list[SourceError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _data_path(data, tuple(err["loc"]))
        full = (*base, *loc)
        msg = _message(err, _hidden_as(full, src))
        out.append(SourceError(src.file, src.line_of(full), format_path(full), msg))
    return out


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    # Pydantic adds union/tag members and validator names to ``loc`` that are not keys of
    # the data; keep only the parts that exist, so the path is what the user wrote.
    out: list[str | int] = []
    cur_ok, cur = True, data
    for part in loc:
        if not cur_ok:
            break
        ok, nxt = lookup(cur, (part,))
        if ok:
            out.append(part if isinstance(part, int) else str(part))
            cur = nxt
        elif isinstance(cur, dict) and isinstance(part, str) and part not in cur:
            # A missing or extra key: name it, then stop.
            out.append(part)
            cur_ok = False
    return tuple(out)


def _known_keys() -> list[str]:
    models: list[type[BaseModel]] = [
        Config,
        GatewayConfig,
        BrokerConfig,
        DestinationConfig,
        RoutingConfig,
        OutboxConfig,
        RedactionConfig,
        HealthConfig,
        InfluxConfig,
        TlsConfig,
        TrackerConfig,
        LoggingConfig,
        ProfileConfig,
        MachineConfig,
    ]
    for spec in installed().values():
        models += [spec.connection_model, spec.signal_model]
    return sorted({name for model in models for name in model.model_fields})


def _secret_keys() -> frozenset[str]:
    """Names of every ``SecretStr`` field in the config models, nested ones included."""
    names: set[str] = {"password", "secret", "token", "private_key_password"}
    todo: list[type[BaseModel]] = [Config, InfluxConfig]
    todo += [spec.connection_model for spec in installed().values()]
    seen: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            for arg in _type_parts(info.annotation):
                if arg is SecretStr:
                    names.add(name)
                elif isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
    return frozenset(names)


def _type_parts(annotation: Any) -> list[Any]:
    out, todo = [], [annotation]
    while todo:
        t = todo.pop()
        out.append(t)
        todo.extend(getattr(t, "__args__", ()))
    return out


_SECRET_KEYS: frozenset[str] | None = None


def _is_secret_path(path: Path_) -> bool:
    global _SECRET_KEYS
    if _SECRET_KEYS is None:
        _SECRET_KEYS = _secret_keys()
    names = [p for p in path if isinstance(p, str)]
    return bool(names) and names[-1] in _SECRET_KEYS


def _hidden_as(path: Path_, src: Located) -> str | None:
    """How to refer to the value at ``path`` when it must not be shown; ``None``: show it."""
    written = src.substituted.get(path)
    if written is not None:
        return f"{written!r}, its value not shown"
    if _is_secret_path(path):
        return "a value that is not shown: it is a secret"
    return None


class _Hidden:
    """Values no config message may contain: secrets as written and ``${VAR}`` values.

    Validators and cross-field checks quote values (``'x' is not a valid identifier``,
    ``broker HOST is on another machine``); a secret put in the wrong field, or a
    substituted value quoted by another field's check, would be printed by ``check`` and
    logged by a rejected reload. Every message passes through :meth:`scrub` first.
    """

    #: Shorter values are too likely to occur by chance ("1", "on"); the field-level rule
    #: (no "got" for a secret or substituted field) still covers them where they are wrong.
    MIN_LEN = 3

    def __init__(self, data: Any, src: Located, env: Mapping[str, str]) -> None:
        self._labels: dict[str, str] = {}
        for written in src.substituted.values():
            for m in _ENV_RE.finditer(written):
                name = m.group(1)
                value = env.get(name) if name else None
                if value:
                    self._add(value, f"${{{name}}}")
        self._walk(data, ())
        # Longest first, so a value containing another is replaced whole.
        self._order = sorted(self._labels, key=len, reverse=True)

    def _add(self, value: str, label: str) -> None:
        if len(value) >= self.MIN_LEN:
            self._labels.setdefault(value, label)

    def _walk(self, data: Any, path: Path_) -> None:
        if isinstance(data, Mapping):
            for k, v in data.items():
                self._walk(v, (*path, str(k)))
        elif isinstance(data, list):
            for i, v in enumerate(data):
                self._walk(v, (*path, i))
        elif (
            isinstance(data, str | int | float)
            and not isinstance(data, bool)
            and _is_secret_path(path)
        ):
            self._add(str(data), "***")

    def scrub(self, text: str) -> str:
        """``text`` with every hidden value replaced by its label."""
        for value in self._order:
            if value in text:
                text = text.replace(value, self._labels[value])
        return text

    def errors(self, errors: Iterable[SourceError]) -> list[SourceError]:
        """The same errors, scrubbed."""
        return [
            SourceError(e.file, e.line, e.path, self.scrub(e.message)) if self._order else e
            for e in errors
        ]


def _message(err: Mapping[str, Any], hidden: str | None = None) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "extra_forbidden":
        loc = err.get("loc", ())
        guess = difflib.get_close_matches(str(loc[-1]) if loc else "", _known_keys(), 1, 0.75)
        hint = f"did you mean {guess[0]!r}?" if guess else "check the spelling"
        return f"unknown key ({hint} config/example.yaml shows every key)"
    if kind == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    if kind not in {"missing"} and isinstance(value, str | int | float | bool) and value != "":
        if hidden is not None:
            # A validator that quoted the value is scrubbed later (see _Hidden).
            return msg if str(value) in msg else f"{msg} (got {hidden})"
        shown = repr(strip_url_credentials(value) if isinstance(value, str) else value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        if shown not in msg:
            msg = f"{msg} (got {shown})"
    return msg


# ---------------------------------------------------------------------------- profiles


@dataclass(slots=True)
class _ProfileSource:
    profile: ProfileConfig
    src: Located
    base: Path_


def _load_profiles(
    config: Config, src: Located, config_path: Path, errors: list[SourceError]
) -> dict[str, _ProfileSource]:
    profiles: dict[str, _ProfileSource] = {}
    dirs: list[Path] = [BUILTIN_PROFILE_DIR]
    for i, name in enumerate(config.profile_dirs):
        p = Path(name)
        if not p.is_absolute():
            p = config_path.parent / p
        if not p.is_dir():
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(("profile_dirs", i)),
                    f"profile_dirs[{i}]",
                    f"{p} is not a directory",
                )
            )
            continue
        dirs.append(p)
    for d in dirs:
        for f in sorted(d.glob("*.yaml")):
            psrc = load(f)
            if psrc.errors:
                errors.extend(psrc.errors)
                continue
            profile = _validate(ProfileConfig, psrc.data, psrc, (), errors)
            if profile is not None:
                # Later directories override earlier ones: a site's own profile of the same
                # name replaces the built-in one.
                profiles[f.stem] = _ProfileSource(profile, psrc, ())
    for name, profile in config.profiles.items():
        profiles[name] = _ProfileSource(profile, src, ("profiles", name))
    return profiles


# ---------------------------------------------------------------------------- compile


def _compile(
    config: Config, src: Located, config_path: Path, errors: list[SourceError]
) -> GatewayPlan | None:
    profiles = _load_profiles(config, src, config_path, errors)
    machines: list[MachinePlan] = []
    seen: dict[str, int] = {}
    # Validated profile signals, shared by every machine that takes them unchanged: the
    # models are frozen, and one copy per machine cost about 23 KiB per machine.
    shared_signals: dict[tuple[str, int], tuple[object, SignalConfig]] = {}
    for i, m in enumerate(config.machines):
        base: Path_ = ("machines", i)
        if m.id in seen:
            errors.append(
                SourceError(
                    src.file,
                    src.line_of((*base, "id")),
                    format_path((*base, "id")),
                    f"duplicate machine id {m.id!r} (also machines[{seen[m.id]}]); "
                    "machine ids must be unique",
                )
            )
            continue
        seen[m.id] = i
        plan = _compile_machine(config, m, base, src, profiles, errors, shared_signals)
        if plan is not None:
            machines.append(plan)
    if errors:
        return None
    destinations = _compile_destinations(config, src, config_path, errors)
    outbox = _compile_outbox(config, config_path)
    secret = _compile_secret(config, src, config_path, errors)
    if secret is None and any(d.route.operator == "pseudonymise" for d in destinations):
        path: Path_ = ("redaction",)
        errors.append(
            SourceError(
                src.file,
                src.line_of(path) or 1,
                format_path(path),
                "operator: pseudonymise needs a site secret (redaction.secret or secret_file)",
            )
        )
    if config.influxdb is not None and _has_userinfo(config.influxdb.url):
        path = ("influxdb", "url")
        errors.append(
            SourceError(
                src.file,
                src.line_of(path),
                format_path(path),
                "put credentials in 'token' (for InfluxDB 1.x: 'user:password'), "
                "not in the url: the url is logged",
            )
        )
    warnings: list[str] = []
    destinations = _command_owners(config, destinations, machines, src, errors, warnings)
    if errors or not destinations:
        return None
    for d in destinations:
        if d.broker.tls is None and not _is_loopback(d.broker.host):
            warnings.append(
                f"destination {d.name}: broker {d.broker.host} is not on this machine and TLS "
                "is off: events and credentials travel in plain text (add tls)"
            )
    for d in destinations:
        b = d.broker
        anonymous = b.username is None and (b.tls is None or b.tls.cert_file is None)
        if anonymous and not _is_loopback(b.host):
            warnings.append(f"destination {d.name}: anonymous MQTT to {b.host}")
    for d in destinations:
        if d.broker.tls is not None and not d.broker.tls.verify_hostname:
            warnings.append(
                f"destination {d.name}: tls.verify_hostname is false: any certificate from the "
                f"trusted CAs is accepted for {d.broker.host}, so another server holding one "
                "can pose as the broker"
            )
    health = parse_listen(config.health.listen) if config.health.listen else None
    console_token = _compile_token(config, src, config_path, errors)
    h = config.health
    if health is not None and h.console and console_token is None and not _is_loopback(health[0]):
        path = ("health", "listen")
        errors.append(
            SourceError(
                src.file,
                src.line_of(path) or 1,
                format_path(path),
                f"{h.listen} is reachable from other machines: the web console there needs a "
                "token (health.token: ${VAR} or health.token_file), or listen on 127.0.0.1, "
                "or set health.console: false to serve only /healthz and /metrics",
            )
        )
    if h.commands_as is not None and h.commands_as not in {d.name for d in destinations}:
        path = ("health", "commands_as")
        errors.append(
            SourceError(
                src.file,
                src.line_of(path) or 1,
                format_path(path),
                f"no destination named {h.commands_as!r}; known: "
                + ", ".join(d.name for d in destinations),
            )
        )
    if errors:
        return None
    if health is not None and not _is_loopback(health[0]):
        warnings.append(
            f"health.listen {config.health.listen}: /healthz and /metrics (machine and order "
            "counts, without authentication) are open to the network; use 127.0.0.1 unless a "
            "scraper on another machine needs them"
        )
    for mp in machines:
        warnings += [f"machine {mp.id}: {w}" for w in mp.protocol.warn(mp.connection)]
    badges = [mp.id for mp in machines if "operator" in mp.signals]
    warnings += idle_operator_policies((d.route for d in destinations), badges)
    configured = (
        bool(config.telemetry.model_fields_set)
        or any(p.telemetry is not None for p in config.profiles.values())
        or any(m.telemetry is not None for m in config.machines)
    )
    warnings += idle_telemetry(configured, (d.route.rules.event_types for d in destinations))
    return GatewayPlan(
        source=src.file,
        gateway_id=config.gateway.id,
        site=config.gateway.site,
        topic_prefix=config.gateway.topic_prefix,
        broker=destinations[0].broker,
        machines=tuple(machines),
        log_level=config.logging.level,
        log_format=config.logging.format,
        warnings=tuple(warnings),
        destinations=tuple(destinations),
        outbox=outbox,
        redaction_secret=secret,
        health_listen=health,
        health_max_pending_age=config.health.max_pending_age,
        console=config.health.console,
        console_token=console_token,
        console_scope=config.health.commands_as,
        log_levels=dict(config.logging.levels),
        influxdb=config.influxdb,
        telemetry=TelemetryPlan(
            config.telemetry.qos, config.telemetry.retain, config.telemetry.max_queue_mib
        ),
    )


def default_state_dir(config_path: Path, env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``), else ``var/`` beside the config.

    Never a fixed system path picked by looking around: two gateways (or a test run next to
    an installed service) must not share one outbox by accident.
    """
    env = os.environ if env is None else env
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    return config_path.resolve().parent / "var"


def _compile_outbox(config: Config, config_path: Path) -> OutboxPlan:
    base = config_path.resolve().parent
    if config.state_dir is not None:
        state_dir = Path(config.state_dir)
        state_dir = state_dir if state_dir.is_absolute() else base / state_dir
    else:
        state_dir = default_state_dir(config_path)
    o = config.outbox
    if o.path is not None:
        path = Path(o.path)
        path = path if path.is_absolute() else base / path
    else:
        path = state_dir / "shopfloor-outbox.db"
    return OutboxPlan(path=path, max_events=o.max_events, delayed_after=o.delayed_after)


def _read_secret_file(
    name: str, where: Path_, src: Located, config_path: Path, errors: list[SourceError]
) -> SecretStr | None:
    p = Path(name)
    p = p if p.is_absolute() else config_path.resolve().parent / p
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # Name the file and the reason, never its content.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        errors.append(
            SourceError(src.file, src.line_of(where), format_path(where), f"{p}: {reason}")
        )
        return None
    lines = text.splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        errors.append(
            SourceError(src.file, src.line_of(where), format_path(where), f"{p} is empty")
        )
        return None
    return SecretStr(value)


def _compile_secret(
    config: Config, src: Located, config_path: Path, errors: list[SourceError]
) -> SecretStr | None:
    r = config.redaction
    if r.secret is not None and r.secret_file is not None:
        path: Path_ = ("redaction",)
        errors.append(
            SourceError(
                src.file,
                src.line_of(path),
                format_path(path),
                "set secret or secret_file, not both",
            )
        )
        return None
    if r.secret_file is not None:
        return _read_secret_file(
            r.secret_file, ("redaction", "secret_file"), src, config_path, errors
        )
    return r.secret


def _compile_token(
    config: Config, src: Located, config_path: Path, errors: list[SourceError]
) -> SecretStr | None:
    h = config.health
    if h.token is not None and h.token_file is not None:
        path: Path_ = ("health",)
        errors.append(
            SourceError(
                src.file,
                src.line_of(path) or 1,
                format_path(path),
                "set token or token_file, not both",
            )
        )
        return None
    if h.token_file is not None:
        return _read_secret_file(h.token_file, ("health", "token_file"), src, config_path, errors)
    return h.token


def _compile_destinations(
    config: Config, src: Located, config_path: Path, errors: list[SourceError]
) -> list[DestinationPlan]:
    entries: list[tuple[DestinationConfig | BrokerConfig, str, Path_]] = []
    if config.broker is not None and config.destinations:
        errors.append(
            SourceError(
                src.file,
                src.line_of(("destinations",)),
                "destinations",
                "use either broker: (one destination) or destinations:, not both",
            )
        )
        return []
    if config.broker is not None:
        entries.append((config.broker, "default", ("broker",)))
    for i, d in enumerate(config.destinations):
        entries.append((d, d.name, ("destinations", i)))
    if not entries:
        errors.append(
            SourceError(src.file, 1, "broker", "required key is missing (broker: or destinations:)")
        )
        return []
    out: list[DestinationPlan] = []
    seen: set[str] = set()
    client_ids: set[tuple[str, int, str]] = set()
    for b, name, base in entries:
        n_errors = len(errors)
        if name in seen:
            errors.append(
                SourceError(
                    src.file,
                    src.line_of((*base, "name")),
                    format_path((*base, "name")),
                    f"duplicate destination name {name!r}",
                )
            )
            continue
        seen.add(name)
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(b.tls, key, None) if b.tls is not None else None
            if value is not None and not Path(value).is_file():
                path: Path_ = (*base, "tls", key)
                errors.append(
                    SourceError(
                        src.file, src.line_of(path), format_path(path), f"{value}: no such file"
                    )
                )
        if b.tls is not None and (b.tls.cert_file is None) != (b.tls.key_file is None):
            path = (*base, "tls")
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(path),
                    format_path(path),
                    "cert_file and key_file go together: set both for a client certificate, "
                    "or neither",
                )
            )
        password = b.password
        if b.password_file is not None:
            if b.password is not None:
                path = (*base, "password_file")
                errors.append(
                    SourceError(
                        src.file,
                        src.line_of(path),
                        format_path(path),
                        "set password or password_file, not both",
                    )
                )
            else:
                password = _read_secret_file(
                    b.password_file, (*base, "password_file"), src, config_path, errors
                )
        if password is not None and b.username is None:
            path = (*base, "username")
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(base),
                    format_path(path),
                    "a password needs a username",
                )
            )
        if not _is_loopback(b.host) and not b.allow_insecure:
            # Secure by default: events, order ids and credentials leave the factory here.
            weak = []
            if b.tls is None:
                weak.append("plain TCP (add tls:)")
            if b.username is None and (b.tls is None or b.tls.cert_file is None):
                weak.append("no credentials (add username/password or a client certificate)")
            if weak:
                errors.append(
                    SourceError(
                        src.file,
                        src.line_of(base),
                        format_path(base),
                        f"broker {b.host} is on another machine and the connection would use "
                        + " and ".join(weak)
                        + "; fix that, or set allow_insecure: true to accept the risk",
                    )
                )
        if len(errors) != n_errors:
            continue
        tls = (
            TlsPlan(b.tls.ca_file, b.tls.cert_file, b.tls.key_file, b.tls.verify_hostname)
            if b.tls is not None
            else None
        )
        default_id = f"shopfloor-{config.gateway.id}"
        if name != "default":
            default_id += f"-{name}"
        broker = BrokerPlan(
            host=b.host,
            port=b.port or (8883 if tls is not None else 1883),
            client_id=b.client_id or default_id,
            username=b.username,
            password=password,
            keepalive=b.keepalive,
            tls=tls,
            max_queue=b.max_queue,
            protocol=b.protocol,
        )
        endpoint = (broker.host, broker.port, broker.client_id)
        if endpoint in client_ids:
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(base),
                    format_path(base),
                    f"client id {broker.client_id!r} is used twice on {broker.host}:"
                    f"{broker.port}; the broker would disconnect one of them",
                )
            )
            continue
        client_ids.add(endpoint)
        if isinstance(b, DestinationConfig):
            r = b.routing
            rules = RouteRules(
                tuple(r.machines), tuple(r.event_types), tuple(r.customers), tuple(r.order_ids)
            )
            operator: OperatorPolicy = b.operator
            route = Route(name, rules, operator, b.batch)
        else:
            route = Route(name)
        out.append(DestinationPlan(name, broker, route))
    return out


def _has_userinfo(url: str) -> bool:
    return strip_url_credentials(url) != url


def _command_clash(a: DestinationPlan, b: DestinationPlan, machines: Iterable[MachinePlan]) -> str:
    """Why ``a`` and ``b`` may not both take commands for some machine ("" when they may)."""
    shared = next(
        (
            m.id
            for m in machines
            if machine_visible(a.route.rules, m.id) and machine_visible(b.route.rules, m.id)
        ),
        None,
    )
    if shared is None:
        return ""
    if (a.broker.host, a.broker.port) == (b.broker.host, b.broker.port):
        return (
            f"both take commands for machine {shared} on {a.broker.host}:{a.broker.port}, "
            "so every command would be run and answered twice"
        )
    unscoped = [d.name for d in (a, b) if not d.route.rules.order_scoped]
    if unscoped:
        return (
            f"both take commands for machine {shared}, and {unscoped[0]} sees every order of it "
            "(only destinations scoped by routing.customers or order_ids may share a machine's "
            "commands)"
        )
    return ""


def _command_owners(
    config: Config,
    destinations: list[DestinationPlan],
    machines: list[MachinePlan],
    src: Located,
    errors: list[SourceError],
    warnings: list[str],
) -> list[DestinationPlan]:
    """Decide which destinations take order commands; at most one owner per machine.

    A machine's commands are owned by one destination, or shared by order-scoped destinations
    on different brokers (each can touch only its own customers' orders). Destinations with
    ``commands: true`` come first and may not clash (a config error names both); an unset
    one takes commands unless it clashes with an owner, and then takes none, with a warning.
    """
    explicit: dict[str, tuple[bool | None, Path_]] = {
        d.name: (d.commands, ("destinations", i, "commands"))
        for i, d in enumerate(config.destinations)
    }
    owners: list[DestinationPlan] = []
    decided: dict[str, bool] = {}
    ordered = [d for d in destinations if explicit.get(d.name, (None, ()))[0] is True]
    ordered += [d for d in destinations if explicit.get(d.name, (None, ()))[0] is None]
    for d in ordered:
        wanted, where = explicit.get(d.name, (None, ()))
        clash = next(((o, why) for o in owners if (why := _command_clash(o, d, machines))), None)
        if clash is None:
            owners.append(d)
            decided[d.name] = True
            continue
        owner, why = clash
        decided[d.name] = False
        if wanted is True:
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(where),
                    format_path(where),
                    f"destinations {owner.name} and {d.name} {why}; set commands: false on one "
                    "of them",
                )
            )
        else:
            warnings.append(
                f"destination {d.name}: takes no commands: it and {owner.name} {why}; "
                f"{owner.name} owns them (set commands: true/false to choose)"
            )
    return [replace(d, commands=decided.get(d.name, False)) for d in destinations]


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost`` or a loopback address (127/8, ::1).

    A name is not resolved here: ``127.mqtt.partner.example`` is a name like any other.
    """
    name = host.strip().rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _compile_machine(
    config: Config,
    m: MachineConfig,
    base: Path_,
    src: Located,
    profiles: Mapping[str, _ProfileSource],
    errors: list[SourceError],
    shared: dict[tuple[str, int], tuple[object, SignalConfig]] | None = None,
) -> MachinePlan | None:
    n_errors = len(errors)
    profile: _ProfileSource | None = None
    if m.profile is not None:
        profile = profiles.get(m.profile)
        if profile is None:
            known = ", ".join(sorted(profiles)) or "none"
            guess = difflib.get_close_matches(m.profile, list(profiles), 1, 0.75)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            errors.append(
                SourceError(
                    src.file,
                    src.line_of((*base, "profile")),
                    format_path((*base, "profile")),
                    f"unknown profile {m.profile!r} ({hint}known: {known})",
                )
            )
            return None
    conn_raw = {**(profile.profile.connection if profile else {}), **m.connection}
    protocols = installed()
    protocol_name = conn_raw.get("protocol") or (profile.profile.protocol if profile else None)
    if protocol_name is None:
        errors.append(
            SourceError(
                src.file,
                src.line_of((*base, "connection")),
                format_path((*base, "connection")),
                f"protocol is missing: add 'protocol: {' or '.join(protocols)}' or a profile",
            )
        )
        return None
    spec = protocols.get(str(protocol_name))
    if spec is None:
        errors.append(
            SourceError(
                src.file,
                src.line_of((*base, "connection", "protocol")),
                format_path((*base, "connection", "protocol")),
                f"unknown protocol {protocol_name!r} (supported: {', '.join(protocols)})",
            )
        )
        return None
    if profile is not None and profile.profile.protocol != spec.name:
        errors.append(
            SourceError(
                src.file,
                src.line_of((*base, "connection", "protocol")),
                format_path((*base, "connection", "protocol")),
                f"profile {m.profile!r} is for {profile.profile.protocol}, "
                f"the connection is {spec.name}",
            )
        )
        return None
    conn_raw["protocol"] = spec.name
    connection = _validate(spec.connection_model, conn_raw, src, (*base, "connection"), errors)

    # Merge signals: profile first, machine entries replace whole signals, null removes.
    merged: dict[str, tuple[dict[str, Any] | None, Located, Path_, bool]] = {}
    if profile is not None:
        for name, body in profile.profile.signals.items():
            merged[name] = (body, profile.src, (*profile.base, "signals", name), True)
    for name, body in m.signals.items():
        merged[name] = (body, src, (*base, "signals", name), False)
    signals: dict[str, SignalConfig] = {}
    for name, (body, ssrc, spath, from_profile) in merged.items():
        if body is None:
            continue
        if not _SIGNAL_RE.match(name):
            errors.append(
                SourceError(
                    ssrc.file,
                    ssrc.line_of(spath),
                    format_path(spath),
                    "signal names are lower_snake_case (a-z, 0-9, _), starting with a letter",
                )
            )
            continue
        key = (spec.name, id(body))
        hit = shared.get(key) if shared is not None else None
        if hit is not None and hit[0] is body:
            sig: SignalConfig | None = hit[1]
        else:
            sig = _validate(spec.signal_model, body, ssrc, spath, errors)
            if sig is not None and shared is not None and from_profile:
                # Only a profile's bodies are shared (the entry keeps the body alive, so its
                # id is not reused); a machine's own entries are validated each time.
                shared[key] = (body, sig)
        if sig is None:
            continue
        problem = _check_canonical(name, sig)
        if problem:
            errors.append(SourceError(ssrc.file, ssrc.line_of(spath), format_path(spath), problem))
            continue
        signals[name] = sig
    if not signals and len(errors) == n_errors:
        errors.append(
            SourceError(
                src.file,
                src.line_of(base),
                format_path(base),
                "no signals mapped: name a profile or add signals",
            )
        )
    if connection is not None and signals and len(errors) == n_errors:
        for problem in spec.check(connection, signals):
            errors.append(
                SourceError(
                    src.file,
                    src.line_of((*base, "signals")) or src.line_of(base),
                    format_path((*base, "signals")),
                    problem,
                )
            )
    poll = m.poll_interval or (profile.profile.poll_interval if profile else None)
    tracker = _tracker_settings(
        poll or DEFAULT_POLL_INTERVAL,
        config.tracker,
        profile.profile.tracker if profile else None,
        m.tracker,
    )
    rules = tuple(
        (name, sig.mode, None if sig.wrap is None else 2**sig.wrap)
        for name, sig in signals.items()
        if name in COUNTER_SIGNALS and (sig.mode is not None or sig.wrap is not None)
    )
    if rules:
        tracker = replace(tracker, counter_rules=rules)
    telemetry = _telemetry_rules(config, m, profile, signals, merged, errors)
    general = resolve(config.telemetry, profile.profile.telemetry if profile else None, m.telemetry)
    if len(errors) != n_errors or connection is None:
        return None
    return MachinePlan(
        id=m.id,
        location=Location(
            site=m.site or config.gateway.site, area=m.area, line=m.line, machine=m.id
        ),
        protocol=spec,
        profile=m.profile,
        connection=connection,
        signals=signals,
        poll_interval=poll or DEFAULT_POLL_INTERVAL,
        tracker=tracker,
        telemetry=telemetry,
        telemetry_default=_RULES.setdefault(general, general),
    )


#: Resolved publish rules, shared: 500 machines x 30 signals mostly hold the same few.
_RULES: dict[PublishRule, PublishRule] = {}


def _telemetry_rules(
    config: Config,
    m: MachineConfig,
    profile: _ProfileSource | None,
    signals: Mapping[str, SignalConfig],
    merged: Mapping[str, tuple[dict[str, Any] | None, Located, Path_, bool]],
    errors: list[SourceError],
) -> dict[str, PublishRule]:
    """Each signal's telemetry rule: gateway, profile, machine, then the signal's own keys."""
    general = (config.telemetry, profile.profile.telemetry if profile else None, m.telemetry)
    rules: dict[str, PublishRule] = {}
    for name, sig in signals.items():
        rule = resolve(*general, sig.telemetry, deadband=sig.deadband)
        problem = rule.problem()
        if problem is not None:
            _, ssrc, spath, _ = merged[name]
            errors.append(
                SourceError(
                    ssrc.file, ssrc.line_of(spath), format_path((*spath, "telemetry")), problem
                )
            )
            continue
        rules[name] = _RULES.setdefault(rule, rule)
    return rules


_STATES = [s.value for s in MachineState if s is not MachineState.OFFLINE]


def _check_canonical(name: str, sig: SignalConfig) -> str | None:
    if name == "state" and sig.map is not None:
        bad = [v for v in sig.map.values() if v not in _STATES]
        if bad:
            return (
                f"map values must be machine states ({', '.join(_STATES)}); "
                f"not {', '.join(repr(b) for b in bad)}"
            )
        if sig.map_default is not None and sig.map_default not in _STATES:
            return f"map_default must be a machine state ({', '.join(_STATES)})"
    if name in CANONICAL_SIGNALS and name.endswith("_count") and sig.map is not None:
        return "a counter cannot have a map; use scale/offset"
    if (sig.mode is not None or sig.wrap is not None) and name not in COUNTER_SIGNALS:
        return (
            "mode and wrap belong to a counter signal "
            f"({', '.join(sorted(COUNTER_SIGNALS))}), not to {name!r}"
        )
    return None


def _tracker_settings(poll_interval: float, *layers: TrackerConfig | None) -> TrackerSettings:
    values: dict[str, Any] = {"poll_interval": poll_interval}
    for layer in layers:
        if layer is None:
            continue
        for key, value in layer.model_dump(exclude_none=True).items():
            values[key] = value
    if "counter_wrap" in values:
        values["counter_wrap"] = 2 ** int(values["counter_wrap"])
    if "complete_when" in values:
        values["complete_when"] = tuple(dict.fromkeys(values["complete_when"]))
    return TrackerSettings(**values)


def redacted(plan: GatewayPlan) -> dict[str, Any]:
    """A summary of the plan safe to print or log: secrets are never included."""
    b = plan.broker
    return {
        "gateway_id": plan.gateway_id,
        "site": plan.site,
        "topic_prefix": plan.topic_prefix,
        "broker": {
            "host": b.host,
            "port": b.port,
            "client_id": b.client_id,
            "username": b.username,
            "password": "***" if b.password is not None else None,
            "tls": b.tls is not None,
        },
        "destinations": [
            {
                "name": d.name,
                "host": d.broker.host,
                "port": d.broker.port,
                "username": d.broker.username,
                "password": "***" if d.broker.password is not None else None,
                "tls": d.broker.tls is not None,
                "routing": {
                    "machines": list(d.route.rules.machines),
                    "event_types": list(d.route.rules.event_types),
                    "customers": list(d.route.rules.customers),
                    "order_ids": list(d.route.rules.order_ids),
                },
                "batch": d.route.batch,
                "operator": d.route.operator,
                "commands": d.commands,
            }
            for d in plan.destinations
        ],
        "outbox": str(plan.outbox.path) if plan.outbox is not None else None,
        "machines": [
            {
                "id": m.id,
                "location": f"{m.location.site}/{m.location.area}/{m.location.line}",
                "protocol": m.protocol.name,
                "profile": m.profile,
                "signals": sorted(m.signals),
                "poll_interval": m.poll_interval,
            }
            for m in plan.machines
        ],
    }
