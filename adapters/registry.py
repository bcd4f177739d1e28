"""The explicit table of device protocols: no import side effects, no plugin magic.

A new protocol is a new folder under ``adapters/`` plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from adapters.base import Adapter
from adapters.modbus.adapter import create as create_modbus
from adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from adapters.modbus.plan import plan_for
from adapters.opcua.config import OpcUaConnectionConfig, OpcUaSignalConfig
from adapters.opcua.config import check as check_opcua_config
from adapters.opcua.config import insecure_reasons as opcua_insecure_reasons
from gateway.signals import SignalConfig

#: ``create(machine_id, connection, signals, poll_interval, start_offset) -> Adapter``
AdapterFactory = Callable[[str, Any, Mapping[str, Any], float, float], Adapter]
#: ``check(connection, signals) -> problems``: cross-signal checks run when the config loads.
ConfigCheck = Callable[[Any, Mapping[str, Any]], list[str]]
#: ``warn(connection) -> warnings``: insecure but allowed choices, logged at start.
ConfigWarn = Callable[[Any], list[str]]


def _no_warnings(connection: Any) -> list[str]:
    """Modbus has no security of its own; nothing to warn about per connection."""
    return []


def _check_modbus(connection: Any, signals: Mapping[str, Any]) -> list[str]:
    """Signals must fit into read requests within the device's limits."""
    try:
        plan_for(connection, signals)
    except ValueError as exc:
        return [str(exc)]
    return []


def _check_opcua(connection: Any, signals: Mapping[str, Any]) -> list[str]:
    """Namespace aliases used by signals exist; certificate and trust files exist."""
    return check_opcua_config(connection, dict(signals))


def _create_opcua(
    machine: str, connection: Any, signals: Mapping[str, Any], poll: float, offset: float
) -> Adapter:
    """Build an OPC UA adapter; asyncua is imported only when a machine uses OPC UA."""
    from adapters.opcua.adapter import create

    return create(machine, connection, signals, poll, offset)


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """What the config loader and the runtime need to know about one protocol."""

    name: str
    connection_model: type[BaseModel]
    signal_model: type[SignalConfig]
    create: AdapterFactory
    check: ConfigCheck
    warn: ConfigWarn = _no_warnings


PROTOCOLS: Mapping[str, ProtocolSpec] = {
    "modbus": ProtocolSpec(
        name="modbus",
        connection_model=ModbusConnectionConfig,
        signal_model=ModbusSignalConfig,
        create=create_modbus,
        check=_check_modbus,
    ),
    "opcua": ProtocolSpec(
        name="opcua",
        connection_model=OpcUaConnectionConfig,
        signal_model=OpcUaSignalConfig,
        create=_create_opcua,
        check=_check_opcua,
        warn=opcua_insecure_reasons,
    ),
}
