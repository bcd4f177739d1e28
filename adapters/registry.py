"""The table of device protocols: their config models and checks, and their adapters.

A new protocol is a new folder under ``adapters/``, one :class:`ProtocolSpec` and one
factory here, and one line in the ``shopfloor_gateway.protocols`` entry-point table of
``pyproject.toml`` (that is how the config loader, a layer below, finds it).

The runtime builds its adapters through one :class:`Adapters`, which owns what the
machines of a protocol share (the Modbus lines) and closes it at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.config.protocols import ProtocolSpec
from shopfloor_gateway.adapters.base import Adapter
from shopfloor_gateway.adapters.modbus.adapter import create as create_modbus
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.line import LinePool
from shopfloor_gateway.adapters.modbus.plan import plan_for
from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig, OpcUaSignalConfig
from shopfloor_gateway.adapters.opcua.config import check as check_opcua_config
from shopfloor_gateway.adapters.opcua.config import insecure_reasons as opcua_insecure_reasons

#: ``create(adapters, machine_id, connection, signals, poll_interval, start_offset)``; the
#: first argument is the owning :class:`Adapters`, for what the machines share.
AdapterFactory = Callable[["Adapters", str, Any, Mapping[str, Any], float, float], Adapter]


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


def _create_modbus(
    owner: Adapters,
    machine: str,
    connection: Any,
    signals: Mapping[str, Any],
    poll: float,
    offset: float,
) -> Adapter:
    """Build a Modbus adapter on the owner's shared lines."""
    return create_modbus(machine, connection, signals, poll, offset, lines=owner.modbus_lines)


def _create_opcua(
    owner: Adapters,
    machine: str,
    connection: Any,
    signals: Mapping[str, Any],
    poll: float,
    offset: float,
) -> Adapter:
    """Build an OPC UA adapter; asyncua is imported only when a machine uses OPC UA."""
    from shopfloor_gateway.adapters.opcua.adapter import create

    return create(machine, connection, signals, poll, offset)


MODBUS = ProtocolSpec(
    name="modbus",
    connection_model=ModbusConnectionConfig,
    signal_model=ModbusSignalConfig,
    check=_check_modbus,
)
OPCUA = ProtocolSpec(
    name="opcua",
    connection_model=OpcUaConnectionConfig,
    signal_model=OpcUaSignalConfig,
    check=_check_opcua,
    warn=opcua_insecure_reasons,
)

#: Every protocol's loader view, by name (the same specs the entry points name).
PROTOCOLS: Mapping[str, ProtocolSpec] = {"modbus": MODBUS, "opcua": OPCUA}

#: How the runtime builds each protocol's adapter.
FACTORIES: Mapping[str, AdapterFactory] = {"modbus": _create_modbus, "opcua": _create_opcua}


class Adapters:
    """Builds the adapters of one owner (a gateway run) and owns what they share.

    Machines on one Modbus endpoint share its line through :attr:`modbus_lines`; the owner
    calls :meth:`close` once its devices have stopped.
    """

    def __init__(self) -> None:
        """Nothing shared is open yet."""
        #: The Modbus lines of this owner's machines, one per endpoint.
        self.modbus_lines = LinePool()

    def create(
        self,
        protocol: str,
        machine: str,
        connection: Any,
        signals: Mapping[str, Any],
        poll: float,
        offset: float,
    ) -> Adapter:
        """The adapter of one machine of ``protocol``."""
        return FACTORIES[protocol](self, machine, connection, signals, poll, offset)

    def close(self) -> None:
        """Close what the adapters shared (lines a stopped adapter did not give back)."""
        self.modbus_lines.close()
