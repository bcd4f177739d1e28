"""Config models of the Modbus TCP adapter: one connection, many register-mapped signals.

Validation errors are short ``ValueError`` texts that say what to fix; the config loader
adds the file, line and path (``machines[3].signals.good_count``) in front of them.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.signals import SignalConfig

#: Register areas a signal can be read from. Coils and discrete inputs (bit areas) are a
#: later addition: they get their own literal here, a read function in the adapter's
#: ``_READERS`` table and a ``bool`` type in ``decode``; the planner already keys by area.
RegisterArea = Literal["holding", "input"]

#: Value types a signal's registers can hold.
RegisterType = Literal["uint16", "int16", "uint32", "int32", "float32", "string"]

#: Order of the bytes of a multi-register value, as the four bytes A B C D of a 32-bit
#: big-endian value appear on the wire. ``ABCD`` is the Modbus default (high word first).
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

#: Registers per numeric type; ``string`` takes its width from ``length``.
TYPE_WIDTH: dict[str, int] = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}

#: The Modbus spec caps one read of holding or input registers at 125 registers
#: (MODBUS Application Protocol v1.1b3, 6.3 and 6.4), so a string can be no wider.
MAX_REGISTERS_PER_READ = 125

#: Registers are addressed 0..65535 (16-bit address field).
ADDRESS_SPACE = 65536


class ModbusConnectionConfig(BaseModel):
    """How to reach one Modbus TCP device (or one unit behind a TCP gateway)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["modbus"] = "modbus"
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    #: Unit identifier (``device_id`` in pymodbus); 0..247, 1 for most TCP devices.
    unit_id: int = Field(default=1, ge=0, le=247)
    #: Seconds to wait for the connection and for each response.
    timeout: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    max_registers_per_read: int = Field(default=MAX_REGISTERS_PER_READ, ge=1, le=125)
    #: Unmapped registers a single read may bridge between two mapped ranges.
    max_gap: int = Field(default=16, ge=0)
    #: Seconds to pause between the requests of one poll cycle (for slow, cheap devices).
    request_delay: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @field_validator("host")
    @classmethod
    def _host_not_blank(cls, value: str) -> str:
        """Reject empty hosts and hosts with whitespace (a typo, never a real name)."""
        if not value.strip():
            raise ValueError("host must not be empty: give an IP address or host name")
        if value != value.strip() or any(ch.isspace() for ch in value):
            raise ValueError(f"host {value!r} contains whitespace")
        return value


class ModbusSignalConfig(SignalConfig):
    """Where one signal lives on the device (area, address, type) plus its value mapping."""

    area: RegisterArea = "holding"
    #: Zero-based register address as sent on the wire (``40001`` in 1-based notation is 0).
    address: int = Field(ge=0, le=ADDRESS_SPACE - 1)
    type: RegisterType
    word_order: WordOrder = "ABCD"
    #: Registers of a ``string`` (two ASCII characters each); for numeric types optional,
    #: and when given it must equal the type's width.
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS_PER_READ)

    @field_validator("address", "length", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        """Refuse YAML booleans where a number is meant (pydantic would read ``true`` as 1)."""
        if isinstance(value, bool):
            raise ValueError("must be a whole number, not true/false")
        return value

    @model_validator(mode="after")
    def _check_width(self) -> Self:
        """Check ``length`` against the type and that the value fits the address space."""
        if self.type == "string":
            if self.length is None:
                raise ValueError("string needs length: the number of registers (2 characters each)")
        else:
            width = TYPE_WIDTH[self.type]
            if self.length is not None and self.length != width:
                unit = "register" if width == 1 else "registers"
                raise ValueError(f"{self.type} needs {width} {unit}, got length {self.length}")
        end = self.address + self.register_count
        if end > ADDRESS_SPACE:
            raise ValueError(
                f"address {self.address} + {self.register_count} registers runs past the "
                f"last register {ADDRESS_SPACE - 1}"
            )
        return self

    @property
    def register_count(self) -> int:
        """Number of registers the value occupies."""
        if self.type == "string":
            # The model validator guarantees a length for strings.
            return self.length or 0
        return TYPE_WIDTH[self.type]
