"""``config/example.yaml`` shows every config key, and only keys that exist.

The walk follows the config models (:class:`gateway.config.loader.Config` and everything nested in
it), so a key added to a model fails here until the example shows it, and a key removed or
renamed fails here until the example drops it.

A key counts as shown when it is in the example, active or commented out: keys that cannot
be active together (``broker:`` and ``destinations:``, ``password`` and ``password_file``) or
that need files and services (``tls:``, ``influxdb:``) are shown as comments written
``# key: value`` at the indentation the key would have. The test uncomments such lines and
reads the result as YAML. A model used in several places (the tracker settings at the top,
in a profile and in a machine; the broker settings under ``broker`` and ``destinations``)
needs each key shown in one of them.

Connections and signals take keys of their protocol's models (``adapters/*/config.py``, each
documented in its adapter's README): the keys the example shows there must exist.
"""

from __future__ import annotations

import re
import types
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from gateway.config.loader import Config, load_config
from shopfloor_gateway.adapters.registry import PROTOCOLS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.yaml"

#: ``  # key: value`` or ``  #   - {list: item}``: a commented-out line of config.
_COMMENTED = re.compile(r"^(\s*)# ?(\s*)((?:- )?[a-z_][a-z0-9_]*:(?:\s.*)?|- \{.*)$")
#: Fields whose value is free-form for the gateway's models (their keys are checked apart).
_OPAQUE = {"connection", "signals", "levels"}


def uncommented(text: str) -> str:
    """The example with every commented-out config line made active."""
    out = []
    for line in text.splitlines():
        m = _COMMENTED.match(line)
        out.append(m.group(1) + m.group(2) + m.group(3) if m else line)
    return "\n".join(out) + "\n"


def _members(annotation: Any) -> list[Any]:
    """The types a field may hold (unions and ``Annotated`` unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _members(a)]
    return [annotation]


def _nested(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """Models nested in a field: ``("", M)`` direct, ``("[]", M)`` list, ``(".<name>", M)``."""
    found: list[tuple[str, type[BaseModel]]] = []
    for t in _members(annotation):
        origin = typing.get_origin(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append(("", t))
        elif origin is list:
            found += [("[]", m) for _, m in _nested(typing.get_args(t)[0])]
        elif origin is dict:
            found += [(".<name>", m) for _, m in _nested(typing.get_args(t)[1])]
    return found


def _owner(model: type[BaseModel], name: str) -> str:
    """The class that declares a field (``DestinationConfig.host`` is ``BrokerConfig.host``)."""
    for cls in model.__mro__:
        if name in getattr(cls, "__annotations__", {}):
            return f"{cls.__name__}.{name}"
    return f"{model.__name__}.{name}"


def expected(model: type[BaseModel] = Config, path: str = "") -> dict[str, list[str]]:
    """Every key of the config models: ``Model.field`` → the paths where it may be shown."""
    out: dict[str, list[str]] = defaultdict(list)
    for name, field in model.model_fields.items():
        here = f"{path}.{name}" if path else name
        out[_owner(model, name)].append(here)
        for suffix, sub in _nested(field.annotation):
            for key, paths in expected(sub, here + suffix).items():
                out[key] += paths
    return out


def _walk(
    data: dict[str, Any],
    model: type[BaseModel],
    path: str,
    shown: set[str],
    unknown: list[str],
) -> None:
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        field = model.model_fields.get(str(key))
        if field is None:
            unknown.append(f"{here} (no field {key!r} in {model.__name__})")
            continue
        shown.add(_owner(model, str(key)))
        if key in _OPAQUE:
            _check_protocol_keys(str(key), value, here, unknown)
            continue
        for suffix, sub in _nested(field.annotation):
            if suffix == "" and isinstance(value, dict):
                _walk(value, sub, here, shown, unknown)
            elif suffix == "[]" and isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        _walk(item, sub, f"{here}[]", shown, unknown)
            elif suffix == ".<name>" and isinstance(value, dict):
                for name, item in value.items():
                    if isinstance(item, dict):
                        _walk(item, sub, f"{here}.{name}", shown, unknown)


def _check_protocol_keys(kind: str, value: Any, path: str, unknown: list[str]) -> None:
    if not isinstance(value, dict):
        return
    if kind == "connection":
        known = {n for s in PROTOCOLS.values() for n in s.connection_model.model_fields}
        bodies = [(path, value)]
    elif kind == "signals":
        known = {n for s in PROTOCOLS.values() for n in s.signal_model.model_fields}
        bodies = [(f"{path}.{n}", b) for n, b in value.items() if isinstance(b, dict)]
    else:  # logging.levels: logger names, any
        return
    for where, body in bodies:
        unknown += [f"{where}.{k} (no protocol has it)" for k in body if k not in known]


def test_example_shows_every_config_key_and_no_other() -> None:
    data = yaml.safe_load(uncommented(EXAMPLE.read_text()))
    shown: set[str] = set()
    unknown: list[str] = []
    _walk(data, Config, "", shown, unknown)
    missing = [
        f"{key}: show it at {' or '.join(paths)}"
        for key, paths in sorted(expected().items())
        if key not in shown
    ]
    assert not missing, (
        f"{EXAMPLE.relative_to(ROOT)} does not show these keys (add each, commented out as "
        "'# key: value' if it cannot be active there):\n  " + "\n  ".join(missing)
    )
    assert not unknown, (
        f"{EXAMPLE.relative_to(ROOT)} shows keys that do not exist:\n  " + "\n  ".join(unknown)
    )


def test_the_walk_sees_nested_and_commented_keys() -> None:
    keys = expected()
    assert keys["TrackerConfig.order_source"] == [
        "tracker.order_source",
        "profiles.<name>.tracker.order_source",
        "machines[].tracker.order_source",
    ]
    assert "destinations[].password_file" in keys["BrokerConfig.password_file"]
    assert "destinations[].routing.machines" in keys["RoutingConfig.machines"]
    text = "broker:\n  host: h\n  # tls:\n  #   ca_file: x.pem\n# Prose: not a key\n"
    assert yaml.safe_load(uncommented(text)) == {
        "broker": {"host": "h", "tls": {"ca_file": "x.pem"}}
    }


def test_example_is_a_valid_config() -> None:
    plan = load_config(EXAMPLE, env={})
    assert plan.machines


def test_the_walk_names_keys_that_do_not_exist() -> None:
    text = (
        "broker:\n  host: h\n  # keep_alive: 3\n"
        "machines:\n  - {id: m, connection: {protocol: modbus, colour: red}}\n"
    )
    shown: set[str] = set()
    unknown: list[str] = []
    _walk(yaml.safe_load(uncommented(text)), Config, "", shown, unknown)
    assert unknown == [
        "broker.keep_alive (no field 'keep_alive' in BrokerConfig)",
        "machines[].connection.colour (no protocol has it)",
    ]
    assert {"BrokerConfig.host", "MachineConfig.id", "MachineConfig.connection"} <= shown
