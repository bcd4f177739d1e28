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
from adapters.modbus.plan import plan_reads
from gateway.signals import SignalConfig

#: ``create(machine_id, connection, signals, poll_interval, start_offset) -> Adapter``
AdapterFactory = Callable[[str, Any, Mapping[str, Any], float, float], Adapter]
#: ``check(connection, signals) -> problems``: cross-signal checks run when the config loads.
ConfigCheck = Callable[[Any, Mapping[str, Any]], list[str]]


def _check_modbus(connection: Any, signals: Mapping[str, Any]) -> list[str]:
    """Signals must fit into read requests within the device's limits."""
    try:
        plan_reads(
            signals,
            max_registers=connection.max_registers_per_read,
            max_gap=connection.max_gap,
        )
    except ValueError as exc:
        return [str(exc)]
    return []


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """What the config loader and the runtime need to know about one protocol."""

    name: str
    connection_model: type[BaseModel]
    signal_model: type[SignalConfig]
    create: AdapterFactory
    check: ConfigCheck


PROTOCOLS: Mapping[str, ProtocolSpec] = {
    "modbus": ProtocolSpec(
        name="modbus",
        connection_model=ModbusConnectionConfig,
        signal_model=ModbusSignalConfig,
        create=create_modbus,
        check=_check_modbus,
    ),
}
