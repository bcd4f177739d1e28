"""What the config loader needs to know about a device protocol, and where to find them.

Each protocol lives in its own package under ``adapters/`` and announces itself with one
entry in the ``shopfloor_gateway.protocols`` entry-point group of ``pyproject.toml``
(``modbus = "adapters.registry:MODBUS"``). The loader finds them through that table, so
the config layer never imports an adapter: adapters sit above it and import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel

from gateway.core.signals import SignalConfig

#: The entry-point group every protocol registers in.
ENTRY_POINT_GROUP = "shopfloor_gateway.protocols"

#: ``check(connection, signals) -> problems``: cross-signal checks run when the config loads.
ConfigCheck = Callable[[Any, Mapping[str, Any]], list[str]]
#: ``warn(connection) -> warnings``: insecure but allowed choices, logged at start.
ConfigWarn = Callable[[Any], list[str]]


def _no_warnings(connection: Any) -> list[str]:
    return []


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """One protocol as the loader sees it: its config models and its load-time checks."""

    name: str
    connection_model: type[BaseModel]
    signal_model: type[SignalConfig]
    check: ConfigCheck
    warn: ConfigWarn = _no_warnings


@functools.cache
def installed() -> Mapping[str, ProtocolSpec]:
    """Every protocol registered in the entry-point table, by name."""
    found: dict[str, ProtocolSpec] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        spec = ep.load()
        if not isinstance(spec, ProtocolSpec) or spec.name != ep.name:
            raise TypeError(
                f"entry point {ep.name} = {ep.value} is not the ProtocolSpec {ep.name!r}"
            )
        found[ep.name] = spec
    if not found:
        raise RuntimeError(
            f"no device protocol is registered under {ENTRY_POINT_GROUP!r}: "
            "reinstall the package (pip install -e .)"
        )
    return found
