"""Validation of the Modbus connection and signal config models (messages users will read)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig


def _error(model: type[Any], **data: Any) -> str:
    """The single validation message for ``data``."""
    with pytest.raises(ValidationError) as info:
        model(**data)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    return str(errors[0]["msg"])


def test_connection_defaults() -> None:
    conn = ModbusConnectionConfig(host="10.0.0.7")
    assert (conn.protocol, conn.port, conn.unit_id, conn.timeout) == ("modbus", 502, 1, 1.0)
    assert (conn.max_registers_per_read, conn.max_gap, conn.request_delay) == (125, 16, 0.0)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("port", 0, "greater than or equal to 1"),
        ("port", 65536, "less than or equal to 65535"),
        ("unit_id", 248, "less than or equal to 247"),
        ("unit_id", -1, "greater than or equal to 0"),
        ("timeout", 0, "greater than 0"),
        ("timeout", float("inf"), "finite"),
        ("max_registers_per_read", 126, "less than or equal to 125"),
        ("max_registers_per_read", 0, "greater than or equal to 1"),
        ("max_gap", -1, "greater than or equal to 0"),
        ("request_delay", -0.1, "greater than or equal to 0"),
        ("protocol", "opcua", "'modbus'"),
    ],
)
def test_connection_range_errors(field: str, value: object, fragment: str) -> None:
    assert fragment in _error(ModbusConnectionConfig, host="plc", **{field: value})


@pytest.mark.parametrize("host", ["", "   "])
def test_connection_blank_host(host: str) -> None:
    assert "host must not be empty" in _error(ModbusConnectionConfig, host=host)


def test_connection_host_with_whitespace() -> None:
    assert "contains whitespace" in _error(ModbusConnectionConfig, host="plc 7")


def test_connection_unknown_key_is_refused() -> None:
    assert "Extra inputs are not permitted" in _error(ModbusConnectionConfig, host="plc", slave=1)


def test_connection_is_frozen() -> None:
    conn = ModbusConnectionConfig(host="plc")
    with pytest.raises(ValidationError):
        conn.port = 5020  # type: ignore[misc]


def test_signal_defaults_and_register_count() -> None:
    sig = ModbusSignalConfig(address=10, type="float32")
    assert (sig.area, sig.word_order, sig.length, sig.register_count) == (
        "holding",
        "ABCD",
        None,
        2,
    )
    assert ModbusSignalConfig(address=0, type="int16").register_count == 1
    assert ModbusSignalConfig(address=0, type="string", length=8).register_count == 8
    assert ModbusSignalConfig(address=0, type="uint32", length=2).register_count == 2


def test_signal_keeps_mapping_fields() -> None:
    sig = ModbusSignalConfig(
        address=3, type="uint16", area="input", map={0: "idle", 1: "running"}, scale=0.1
    )
    assert sig.map == {0: "idle", 1: "running"}
    assert sig.scale == 0.1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "uint32", "length": 1}, "uint32 needs 2 registers, got length 1"),
        ({"type": "float32", "length": 4}, "float32 needs 2 registers, got length 4"),
        ({"type": "uint16", "length": 2}, "uint16 needs 1 register, got length 2"),
        ({"type": "string"}, "string needs length"),
    ],
)
def test_signal_length_errors(data: dict[str, Any], message: str) -> None:
    assert message in _error(ModbusSignalConfig, address=0, **data)


def test_signal_must_fit_the_address_space() -> None:
    assert ModbusSignalConfig(address=65535, type="uint16").register_count == 1
    assert ModbusSignalConfig(address=65534, type="int32").register_count == 2
    msg = _error(ModbusSignalConfig, address=65535, type="uint32")
    assert "address 65535 + 2 registers runs past the last register 65535" in msg
    msg = _error(ModbusSignalConfig, address=65530, type="string", length=10)
    assert "runs past the last register" in msg


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"address": -1, "type": "uint16"}, "greater than or equal to 0"),
        ({"address": 65536, "type": "uint16"}, "less than or equal to 65535"),
        ({"address": True, "type": "uint16"}, "not true/false"),
        ({"address": 0, "type": "string", "length": 0}, "greater than or equal to 1"),
        ({"address": 0, "type": "string", "length": 126}, "less than or equal to 125"),
        ({"address": 0, "type": "uint128"}, "'uint16'"),
        ({"address": 0, "type": "uint16", "word_order": "BACD"}, "'ABCD'"),
        ({"address": 0, "type": "uint16", "area": "coils"}, "'holding'"),
        ({"address": 0, "type": "uint16", "area": "coil"}, "type must be bool"),
        ({"address": 0, "type": "uint16", "register": 4}, "Extra inputs"),
    ],
)
def test_signal_field_errors(data: dict[str, Any], fragment: str) -> None:
    assert fragment in _error(ModbusSignalConfig, **data)


def test_signal_error_location_points_at_the_model() -> None:
    with pytest.raises(ValidationError) as info:
        ModbusSignalConfig.model_validate({"address": 0, "type": "uint32", "length": 1})
    # A model-level check has an empty loc; the config loader prefixes the signal's path.
    assert info.value.errors()[0]["loc"] == ()
