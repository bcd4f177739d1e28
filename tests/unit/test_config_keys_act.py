"""Every documented config key has an effect: no key is accepted and then ignored.

Each leaf field of the config models (``Config`` and the models nested in it) gets a valid
value other than its default; the config is compiled and the compiled plan (everything
in it, secrets revealed) must differ from the plan of the unchanged config. A config
error counts as an effect too: it shows the key is read (``allow_insecure`` only matters
where the config would otherwise be refused).

Some sections go into the plan whole (``influxdb:``, a machine's ``connection`` and its
signals: the protocol's own models): there the plan differs trivially, so for those models
the test checks what the runtime builds from them where it can (the history sink's runner
settings) and otherwise that the code outside the model reads the field.

Keys that act only outside the plan are in :data:`ACTS_ELSEWHERE`, each with where it acts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from gateway.config.influx import InfluxConfig
from gateway.config.loader import Config, ConfigError, load_config
from gateway.config.protocols import ProtocolSpec
from gateway.delivery.influx.sink import settings_for
from shopfloor_gateway.adapters.modbus.config import (
    ModbusConnectionConfig,
    ModbusSignalConfig,
    SerialConfig,
)
from shopfloor_gateway.adapters.opcua.config import (
    OpcUaConnectionConfig,
    OpcUaSecurityConfig,
    OpcUaSignalConfig,
)

ROOT = Path(__file__).resolve().parents[2]

#: Keys whose effect lies outside the compiled plan, and where they act instead.
ACTS_ELSEWHERE: dict[str, str] = {
    # The bound of each destination's memory queue: it reaches the plan, but the broker
    # plan compares equal either way in this walk's base config (no destination queue).
    "broker.max_queue": "the bound of each destination's memory queue (telemetry, state, status)",
    "destinations.max_queue": "as broker.max_queue",
    # A comment with a place in the schema: it documents the profile for people reading
    # the config file (and for editors validating it) and changes no behaviour.
    "profiles.description": "the config file itself, for people reading it",
}

#: Values for fields the generic rule cannot pick (the key, as a dotted path, -> value).
#: ``{tmp}`` is replaced by the test's temporary directory.
VALUES: dict[str, Any] = {
    "gateway.id": "gw-other",
    "gateway.site": "site-other",
    "gateway.topic_prefix": "plant",
    "broker.host": "localhost",
    "broker.port": 1884,
    "broker.client_id": "other-client",
    "broker.username": "gw",
    "broker.password": "pw",
    "broker.password_file": "{tmp}/password",
    "destinations.name": "other",
    "destinations.host": "localhost",
    "destinations.port": 1884,
    "destinations.client_id": "other-client",
    "destinations.username": "gw",
    "destinations.password": "pw",
    "destinations.password_file": "{tmp}/password",
    "destinations.routing.machines": ["m*"],
    "destinations.routing.event_types": ["order.*"],
    "destinations.routing.customers": ["acme"],
    "destinations.routing.order_ids": ["A-*"],
    "tls.ca_file": "{tmp}/ca.pem",
    "tls.cert_file": "{tmp}/cert2.pem",
    "tls.key_file": "{tmp}/key2.pem",
    "state_dir": "{tmp}/elsewhere",
    "outbox.path": "{tmp}/other.db",
    "redaction.secret": "a-site-secret-of-some-length",
    "redaction.secret_file": "{tmp}/secret",
    # Values other than the effective defaults (these fields default to "unset").
    "tracker.complete_when": ["total_reached", "order_changed"],
    "tracker.counter_mode": "lifetime",
    "tracker.scrap_source": "none",
    "tracker.complete_on_target": False,
    "tracker.order_source": "platform",
    "tracker.counter_confirm": 5,
    "destinations.commands": False,
    "destinations.group_id": "group-other",
    "destinations.edge_node_id": "edge-other",
    "destinations.primary_host_id": "scada-host",
    "health.listen": "127.0.0.1:9200",
    "health.token": "a-console-token-of-some-length",
    "health.token_file": "{tmp}/token",
    "health.commands_as": "default",
    "logging.levels": {"shopfloor_gateway.adapters.modbus": "debug"},
    "influxdb.url": "http://127.0.0.1:9999",
    "influxdb.org": "other",
    "influxdb.bucket": "other",
    "influxdb.token": "t",
    "influxdb.ca_file": "{tmp}/ca.pem",
    "profile_dirs": ["{tmp}/profiles"],
    "machines.id": "m-other",
    "machines.area": "area-other",
    "machines.line": "line-other",
    "machines.site": "site-other",
    "machines.profile": "box",
    "machines.poll_interval": 2.0,
    "machines.signals": {"state": {"address": 1, "type": "uint16"}},
    "machines.connection": {"protocol": "modbus", "host": "127.0.0.1", "port": 5021},
    "profiles.protocol": "opcua",
    "profiles.poll_interval": 3.0,
    "profiles.connection": {"word_order": "CDAB"},
    "profiles.signals": {"state": {"address": 2, "type": "uint16"}},
}

#: What else a key needs next to it to be read at all (the key -> changes to the config).
CONTEXT: dict[str, dict[str, Any]] = {
    "broker.password": {"broker.username": "gw"},
    "broker.password_file": {"broker.username": "gw"},
    "broker.allow_insecure": {"broker.host": "10.0.0.5"},
    "destinations.password": {"destinations.username": "gw"},
    "destinations.password_file": {"destinations.username": "gw"},
    "destinations.allow_insecure": {"destinations.host": "10.0.0.5"},
    "destinations.operator": {"redaction.secret": "a-site-secret-of-some-length"},
    # The Sparkplug ids are read only on a format: sparkplug destination.
    "destinations.group_id": {"destinations.format": "sparkplug"},
    "destinations.edge_node_id": {"destinations.format": "sparkplug"},
    "destinations.primary_host_id": {"destinations.format": "sparkplug"},
    # A client certificate is a pair: both set, and one of them changed.
    "tls.cert_file": {"tls.cert_file": "{tmp}/cert.pem", "tls.key_file": "{tmp}/key.pem"},
    "tls.key_file": {"tls.cert_file": "{tmp}/cert.pem", "tls.key_file": "{tmp}/key.pem"},
    "health.console": {"health.listen": "0.0.0.0:9108"},
    "profile_dirs": {"machines.profile": "boxed"},
    "profiles.protocol": {"machines.profile": "box"},
    "profiles.description": {"machines.profile": "box"},
    "profiles.poll_interval": {"machines.profile": "box", "machines.poll_interval": None},
    "profiles.tracker": {"machines.profile": "box"},
    "profiles.connection": {"machines.profile": "box"},
    "profiles.signals": {"machines.profile": "box"},
}


def base_config(destinations: bool) -> dict[str, Any]:
    """A small valid config: one broker (or one destination) and one Modbus machine."""
    data: dict[str, Any] = {
        "gateway": {"id": "gw1", "site": "s1"},
        "machines": [
            {
                "id": "m1",
                "area": "a",
                "line": "l",
                "connection": {"protocol": "modbus", "host": "127.0.0.1", "port": 5020},
                "signals": {"state": {"address": 0, "type": "uint16"}},
            }
        ],
        "profiles": {
            "box": {
                "protocol": "modbus",
                "signals": {"good_count": {"address": 10, "type": "uint32"}},
            }
        },
        "health": {"listen": "127.0.0.1:9108"},
        "influxdb": {"url": "http://127.0.0.1:8086", "org": "o", "bucket": "b"},
    }
    if destinations:
        data["destinations"] = [{"name": "default", "host": "127.0.0.1"}]
    else:
        data["broker"] = {"host": "127.0.0.1"}
    return data


# --- walking the models -------------------------------------------------------------------


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


#: Sections of ``Config`` that go into the plan whole, checked below by what reads them.
_CARRIED_WHOLE: tuple[type[BaseModel], ...] = (InfluxConfig,)


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """``(dotted key, field)`` of every leaf of ``model`` (sections recursed into)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = [m for m in _models(info.annotation) if m not in _CARRIED_WHOLE]
        if inner and name not in ("connection", "signals"):
            # tls: and routing: are sections too; machines and destinations are lists of them.
            seen: set[str] = set()
            for sub in inner:
                for k, f in leaves(sub, f"{key}."):
                    if k not in seen:
                        seen.add(k)
                        yield k, f
        elif not any(issubclass(m, _CARRIED_WHOLE) for m in _models(info.annotation)):
            yield key, info


def _bounds(info: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge | annotated_types.Gt):
            low = meta.ge if isinstance(meta, annotated_types.Ge) else meta.gt
        if isinstance(meta, annotated_types.Le | annotated_types.Lt):
            high = meta.le if isinstance(meta, annotated_types.Le) else meta.lt
    return low, high  # type: ignore[return-value]


def _plain_types(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _plain_types(arg)]
    if origin is typing.Annotated:
        return _plain_types(typing.get_args(annotation)[0])
    return [annotation]


def _generic(key: str) -> str:
    """``broker.tls.ca_file`` -> ``tls.ca_file``, ``machines.tracker.x`` -> ``tracker.x``."""
    for section in ("tls.", "tracker."):
        at = key.find(section)
        if at > 0:
            return key[at:]
    return key


def _context(key: str) -> dict[str, Any]:
    """What ``key`` needs next to it: from CONTEXT, for the key or a section above it."""
    found: dict[str, Any] = {}
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        for candidate in {".".join(parts[:n]), _generic(".".join(parts[:n]))}:
            found.update(CONTEXT.get(candidate, {}))
    return found


def other_value(key: str, info: FieldInfo) -> Any:
    """A valid value for ``key`` other than its default."""
    for candidate in (key, _generic(key)):
        if candidate in VALUES:
            return VALUES[candidate]
    default = info.get_default(call_default_factory=True)
    kinds = [t for t in _plain_types(info.annotation) if t is not type(None)]
    kind = kinds[0] if kinds else None
    if typing.get_origin(kind) is Literal:
        return next(v for v in typing.get_args(kind) if v != default)
    if kind is bool:
        return not default if default is not None else True
    if kind in (int, float):
        low, high = _bounds(info)
        # Unset: just above the lower bound; set: twice the default (or 1 for a zero).
        value = (low or 0) + 1 if default is None else (default * 2 if default else 1)
        if high is not None and value > high:
            value = (default + high) / 2 if kind is float else (default + int(high)) // 2
        return kind(value)
    raise AssertionError(f"no value rule for {key} ({info.annotation}): add it to VALUES")


# --- compiling and comparing --------------------------------------------------------------


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for part in parts[:-1]:
        if part in ("machines", "destinations"):
            node = node[part][0]
        elif part == "profiles":
            node = node[part]["box"]
        else:
            node = node.setdefault(part, {})
    if parts[0] in ("machines", "destinations") and len(parts) == 1:
        raise AssertionError(key)
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def plain(value: Any) -> Any:
    """Everything in a plan as plain data, secrets revealed (a changed password shows)."""
    if isinstance(value, SecretStr):
        return ("secret", value.get_secret_value())
    if isinstance(value, ProtocolSpec):
        return ("protocol", value.name)
    if isinstance(value, BaseModel):
        return {k: plain(getattr(value, k)) for k in type(value).model_fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(repr(plain(v)) for v in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if isinstance(value, re.Pattern):
        return value.pattern
    return repr(value)


#: Outcomes by config text: most cases share their unchanged config.
_OUTCOMES: dict[str, Any] = {}


def outcome(data: dict[str, Any], tmp: Path, name: str) -> Any:
    """The compiled plan as plain data, or the config errors."""
    text = yaml.safe_dump(data)
    if name == "base" and text in _OUTCOMES:
        return _OUTCOMES[text]
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    try:
        plan = load_config(path, env={})
    except ConfigError as exc:
        return ("errors", [str(e).split(": ", 1)[-1] for e in exc.errors])
    result = plain(plan)
    result.pop("source", None)
    if name == "base":
        _OUTCOMES[text] = result
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the varied keys point to; one directory, so outcomes compare across cases."""
    tmp_path = tmp_path_factory.mktemp("keys")
    (tmp_path / "password").write_text("pw\n")
    (tmp_path / "secret").write_text("a-site-secret-of-some-length\n")
    (tmp_path / "token").write_text("a-console-token-of-some-length\n")
    for name in ("ca.pem", "cert.pem", "key.pem", "cert2.pem", "key2.pem"):
        (tmp_path / name).write_text("not checked at compile time\n")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "boxed.yaml").write_text(
        yaml.safe_dump(
            {"protocol": "modbus", "signals": {"state": {"address": 5, "type": "uint16"}}}
        )
    )
    return tmp_path


def _cases() -> list[tuple[str, FieldInfo]]:
    return [(k, f) for k, f in leaves(Config) if k not in ACTS_ELSEWHERE]


@pytest.mark.parametrize(("key", "info"), _cases(), ids=[k for k, _ in _cases()])
def test_each_config_key_changes_the_plan(key: str, info: FieldInfo, files: Path) -> None:
    destinations = key.startswith("destinations.")
    base = base_config(destinations)
    for k, v in _context(key).items():
        _set(base, _where(k, key), _fill(v, files))
    if base.get("destinations", [{}])[0].get("format") == "sparkplug":
        # A Sparkplug edge node needs a CloudEvents destination beside it.
        base["destinations"].append({"name": "events", "host": "127.0.0.1", "port": 1884})
    changed = yaml.safe_load(yaml.safe_dump(base))
    _set(changed, key, _fill(other_value(key, info), files))
    before = outcome(base, files, "base")
    after = outcome(changed, files, "changed")
    assert after != before, f"{key}: a different value changed nothing in the compiled plan"


def _where(context_key: str, key: str) -> str:
    """A CONTEXT key in the section of ``key`` (``tls.`` under the broker or destination)."""
    if context_key.startswith("tls."):
        return f"{key.split('.', 1)[0]}.{context_key}"
    return context_key


# --- models that go into the plan whole ---------------------------------------------------

#: The protocol models and the ``influxdb:`` section: the plan carries them as they are.
CARRIED_WHOLE: tuple[type[BaseModel], ...] = (
    InfluxConfig,
    ModbusConnectionConfig,
    SerialConfig,
    ModbusSignalConfig,
    OpcUaConnectionConfig,
    OpcUaSecurityConfig,
    OpcUaSignalConfig,
)

#: Fields of those models that are read nowhere outside their own class, and why that is
#: right (``Model.field`` -> where it acts).
READ_BY_THEIR_MODEL: dict[str, str] = {
    # The discriminator: which protocol's models the loader validates the section with.
    "ModbusConnectionConfig.protocol": "gateway.config.protocols: picks the models",
    "OpcUaConnectionConfig.protocol": "gateway.config.protocols: picks the models",
    # Read through the model's own helpers, which the adapter calls.
    "SerialConfig.inter_frame_delay": "SerialConfig.frame_gap(): the RTU silence of the Line",
    "ModbusSignalConfig.ref": "turned into area, address and bit by the model's validator",
    "ModbusSignalConfig.length": "ModbusSignalConfig.register_count: a string's registers",
}


@functools.cache
def _source_without(cls: type) -> str:
    """The project's code (gateway, adapters) without the body of ``cls`` itself."""
    own = inspect.getsource(cls)
    texts = []
    for folder in ("gateway", "adapters"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            texts.append(text.replace(own, "") if path == Path(inspect.getfile(cls)) else text)
    return "\n".join(texts)


def _carried_cases() -> list[tuple[type[BaseModel], str]]:
    return [
        (model, name)
        for model in CARRIED_WHOLE
        for name in model.model_fields
        if f"{model.__name__}.{name}" not in READ_BY_THEIR_MODEL
    ]


@pytest.mark.parametrize(
    ("model", "name"), _carried_cases(), ids=[f"{m.__name__}.{n}" for m, n in _carried_cases()]
)
def test_each_field_of_a_carried_model_is_read(model: type[BaseModel], name: str) -> None:
    # Not as strong as the plan comparison above: a read somewhere outside the model's own
    # class (its validators only check the value) is taken as its effect.
    assert re.search(rf"\.{name}\b", _source_without(model)), (
        f"{model.__name__}.{name} is read nowhere outside its model: the key has no effect"
    )


def test_the_history_sink_settings_follow_their_keys() -> None:
    base = InfluxConfig(url="http://127.0.0.1:8086", org="o", bucket="b")
    for name in ("batch_size", "flush_interval", "max_queue", "max_queue_mib", "timeout"):
        info = InfluxConfig.model_fields[name]
        changed = base.model_copy(update={name: other_value(f"influxdb.{name}", info)})
        assert settings_for(changed) != settings_for(base), name


def test_the_allow_list_names_real_keys() -> None:
    keys = {k for k, _ in leaves(Config)}
    assert set(ACTS_ELSEWHERE) <= keys, set(ACTS_ELSEWHERE) - keys
    fields = {f"{m.__name__}.{n}" for m in CARRIED_WHOLE for n in m.model_fields}
    assert set(READ_BY_THEIR_MODEL) <= fields, set(READ_BY_THEIR_MODEL) - fields
