"""Config models of the Modbus adapter: one connection (TCP, RTU, RTU over TCP), many signals.

Validation errors are short ``ValueError`` texts that say what to fix; the config loader
adds the file, line and path (``machines[3].signals.good_count``) in front of them.

Addresses, without ambiguity:

- ``address:`` is always the **zero-based protocol address** sent on the wire, an integer
  (``address: 0`` with ``area: holding`` is the first holding register).
- ``ref:`` is the one-based **Modicon reference** device manuals print, a string whose first
  digit names the area: ``"40001"`` (holding 0), ``"30010"`` (input 9), ``"00017"`` (coil 16),
  ``"10001"`` (discrete input 0); six digits (``"400001"``) reach the full range. A suffix
  ``.N`` names bit N (0 = least significant) of a register: ``"40010.3"``.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.core.signals import SignalConfig

#: Data areas of a Modbus device: two register areas (16-bit words) and two bit areas.
RegisterArea = Literal["holding", "input", "coil", "discrete_input"]

#: Areas whose items are single bits (read with functions 1 and 2).
BIT_AREAS: frozenset[str] = frozenset({"coil", "discrete_input"})

#: Value types a signal's registers (or bit) can hold.
RegisterType = Literal[
    "bool",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float32",
    "float64",
    "bcd16",
    "bcd32",
    "string",
]

#: Order of the bytes of a multi-register value, as the bytes A B C D ... of the big-endian
#: value appear on the wire. ``ABCD`` is the Modbus default (high word first, high byte first).
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

#: Registers per fixed-width type; ``string`` takes its width from ``length``.
TYPE_WIDTH: dict[str, int] = {
    "bool": 1,
    "uint16": 1,
    "int16": 1,
    "bcd16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
    "bcd32": 2,
    "uint64": 4,
    "int64": 4,
    "float64": 4,
}

#: The Modbus spec caps one read of holding or input registers at 125 registers
#: (MODBUS Application Protocol v1.1b3, 6.3 and 6.4), so a string can be no wider.
MAX_REGISTERS_PER_READ = 125

#: ... and one read of coils or discrete inputs at 2000 bits (same spec, 6.1 and 6.2).
MAX_BITS_PER_READ = 2000

#: Registers and bits are addressed 0..65535 (16-bit address field).
ADDRESS_SPACE = 65536

Transport = Literal["tcp", "rtu", "rtu_over_tcp"]

_MODICON_AREAS: dict[str, RegisterArea] = {
    "0": "coil",
    "1": "discrete_input",
    "3": "input",
    "4": "holding",
}
_REF_RE = re.compile(r"^([0134])(\d{4,5})(?:\.(\d{1,2}))?$")


def parse_ref(ref: str) -> tuple[RegisterArea, int, int | None]:
    """``"40010.3"`` -> ``("holding", 9, 3)``: a Modicon reference as area, address, bit.

    Raises ``ValueError`` with the accepted forms when ``ref`` is not one of them.
    """
    match = _REF_RE.match(ref.strip())
    if match is None:
        raise ValueError(
            f"ref {ref!r} is not a Modicon reference: use 5 or 6 digits starting with "
            "0 (coil), 1 (discrete input), 3 (input) or 4 (holding), e.g. '40001', '300017', "
            "and optionally '.N' for bit N of a register ('40010.3')"
        )
    digit, number, bit_text = match.groups()
    area = _MODICON_AREAS[digit]
    one_based = int(number)
    top = 9999 if len(number) == 4 else ADDRESS_SPACE
    if not 1 <= one_based <= top:
        raise ValueError(f"ref {ref!r}: the register number must be 1..{top}, got {one_based}")
    bit: int | None = None
    if bit_text is not None:
        if area in BIT_AREAS:
            raise ValueError(f"ref {ref!r}: a bit number only applies to a register (3xxxx/4xxxx)")
        bit = int(bit_text)
        if bit > 15:
            raise ValueError(f"ref {ref!r}: a register has bits 0..15, got {bit}")
    return area, one_based - 1, bit


def format_ref(area: str, address: int, bit: int | None = None) -> str:
    """``("holding", 9, 3)`` -> ``"40010.3"``: the inverse of :func:`parse_ref`."""
    digit = {v: k for k, v in _MODICON_AREAS.items()}[area]  # type: ignore[index]
    number = address + 1
    text = f"{digit}{number:04d}" if number <= 9999 else f"{digit}{number:05d}"
    return text if bit is None else f"{text}.{bit}"


class SerialConfig(BaseModel):
    """A serial line for Modbus RTU (RS-485 or RS-232)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Device path: ``/dev/ttyUSB0``, ``/dev/ttyS1``, ``/dev/serial/by-id/...``.
    port: str = Field(min_length=1)
    baudrate: int = Field(default=19200, ge=300, le=4_000_000)
    #: MODBUS over Serial Line v1.02, 2.5.1: even parity is the required default.
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    #: Silence before each request in seconds; unset = 3.5 character times, at least
    #: 1.75 ms (the spec's fixed value above 19200 baud).
    inter_frame_delay: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    def frame_gap(self) -> float:
        """Seconds of silence the line needs between two frames."""
        if self.inter_frame_delay is not None:
            return self.inter_frame_delay
        bits_per_char = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return max(3.5 * bits_per_char / self.baudrate, 0.00175)


class ModbusConnectionConfig(BaseModel):
    """How to reach one Modbus device (a unit id on a TCP endpoint or on a serial line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["modbus"] = "modbus"
    #: ``tcp`` (Modbus TCP, MBAP header), ``rtu`` (serial line), ``rtu_over_tcp`` (RTU frames
    #: through a serial-to-Ethernet converter in transparent mode).
    transport: Transport = "tcp"
    host: str | None = None
    port: int = Field(default=502, ge=1, le=65535)
    serial: SerialConfig | None = None
    #: Unit identifier (``device_id`` in pymodbus); 0..247, 1 for most TCP devices.
    unit_id: int = Field(default=1, ge=0, le=247)
    #: Seconds to wait for the connection and for each response.
    timeout: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    #: Extra attempts of a request that got no response, before the device counts as lost.
    retries: int = Field(default=0, ge=0, le=10)
    max_registers_per_read: int = Field(default=MAX_REGISTERS_PER_READ, ge=1, le=125)
    max_bits_per_read: int = Field(default=MAX_BITS_PER_READ, ge=1, le=2000)
    #: Unmapped registers a single read may bridge between two mapped ranges.
    max_gap: int = Field(default=16, ge=0)
    #: Unmapped coils / discrete inputs a single read may bridge.
    max_bit_gap: int = Field(default=128, ge=0)
    #: Seconds to pause between the requests of one poll cycle (for slow, cheap devices).
    request_delay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    #: Requests of one cycle in flight at once (``tcp`` only: one TCP connection each).
    max_concurrent_requests: int = Field(default=1, ge=1, le=16)
    #: Word order of signals that do not set their own.
    word_order: WordOrder = "ABCD"

    @field_validator("host")
    @classmethod
    def _host_not_blank(cls, value: str | None) -> str | None:
        """Reject empty hosts and hosts with whitespace (a typo, never a real name)."""
        if value is None:
            return value
        if not value.strip():
            raise ValueError("host must not be empty: give an IP address or host name")
        if value != value.strip() or any(ch.isspace() for ch in value):
            raise ValueError(f"host {value!r} contains whitespace")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> Self:
        """Each transport needs its own addressing and nothing of the others."""
        if self.transport == "rtu":
            if self.serial is None:
                raise ValueError(
                    "transport rtu needs serial: {port: /dev/ttyUSB0, baudrate: 19200, ...}"
                )
            if self.host is not None:
                raise ValueError("transport rtu reads a serial line: remove host (or use tcp)")
        else:
            if self.host is None:
                raise ValueError(f"transport {self.transport} needs host: an IP address or name")
            if self.serial is not None:
                raise ValueError(
                    f"serial only applies to transport rtu, not {self.transport}: remove it"
                )
        if self.max_concurrent_requests > 1 and self.transport != "tcp":
            raise ValueError(
                "max_concurrent_requests > 1 needs transport tcp: a serial line carries "
                "one request at a time"
            )
        return self

    @property
    def endpoint(self) -> str:
        """``tcp://10.0.0.5:502``, ``rtu:///dev/ttyUSB0``: the line this device sits on."""
        if self.transport == "rtu":
            assert self.serial is not None  # checked by the model validator
            return f"rtu://{self.serial.port}"
        scheme = "tcp" if self.transport == "tcp" else "rtu+tcp"
        return f"{scheme}://{self.host}:{self.port}"


class ModbusSignalConfig(SignalConfig):
    """Where one signal lives on the device (area, address, type) plus its value mapping."""

    area: RegisterArea = "holding"
    #: Zero-based protocol address as sent on the wire (``40001`` in Modicon notation is 0).
    address: int | None = Field(default=None, ge=0, le=ADDRESS_SPACE - 1)
    #: One-based Modicon reference instead of ``area`` + ``address`` (+ ``bit``): ``"40010.3"``.
    ref: str | None = None
    #: Bit of a register (0 = least significant) for a ``bool`` on a register area.
    bit: int | None = Field(default=None, ge=0, le=15)
    #: Value type; defaults to ``bool`` for coils, discrete inputs and bits of a register.
    type: RegisterType | None = None
    word_order: WordOrder = "ABCD"
    #: Registers of a ``string`` (two ASCII characters each); for numeric types optional,
    #: and when given it must equal the type's width.
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS_PER_READ)

    @field_validator("address", "length", "bit", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        """Refuse YAML booleans where a number is meant (pydantic would read ``true`` as 1)."""
        if isinstance(value, bool):
            raise ValueError("must be a whole number, not true/false")
        return value

    @field_validator("ref", mode="before")
    @classmethod
    def _ref_is_text(cls, value: object) -> object:
        """Accept ``ref: 40001`` (a YAML int) but refuse floats, which lose bit numbers."""
        if isinstance(value, bool | float):
            raise ValueError(
                "quote a Modicon reference: ref: \"40010.3\" (a YAML number drops '.10' to '.1')"
            )
        if isinstance(value, int):
            return str(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _resolve_ref(cls, data: object) -> object:
        """Turn ``ref`` into ``area``, ``address`` and ``bit`` (refusing contradictions)."""
        if not isinstance(data, dict) or data.get("ref") is None:
            return data
        ref = data["ref"]
        if isinstance(ref, bool | float):
            return data  # the field validator explains
        area, address, bit = parse_ref(str(ref))
        if data.get("address") is not None:
            raise ValueError("give either ref (one-based, '40001') or address (zero-based)")
        if data.get("area") is not None and data["area"] != area:
            raise ValueError(f"ref {ref!r} is in area {area}, but area says {data['area']}")
        if bit is not None and data.get("bit") is not None and data["bit"] != bit:
            raise ValueError(f"ref {ref!r} names bit {bit}, but bit says {data['bit']}")
        out = dict(data)
        out.update(area=area, address=address)
        if bit is not None:
            out["bit"] = bit
        return out

    @model_validator(mode="after")
    def _check_width(self) -> Self:
        """Check type, ``bit`` and ``length`` together, and that the value fits the space."""
        if self.address is None:
            raise ValueError("address is missing: give address (zero-based) or ref ('40001')")
        if self.type is None:
            if self.area in BIT_AREAS or self.bit is not None:
                object.__setattr__(self, "type", "bool")
            else:
                raise ValueError(
                    "type is missing: one of uint16, int16, uint32, int32, uint64, int64, "
                    "float32, float64, bcd16, bcd32, string, bool"
                )
        if self.area in BIT_AREAS and self.type != "bool":
            raise ValueError(f"{self.area} holds single bits: type must be bool, not {self.type}")
        if self.bit is not None:
            if self.area in BIT_AREAS:
                raise ValueError(f"bit only applies to a register area, not {self.area}")
            if self.type != "bool":
                raise ValueError(f"bit {self.bit} of a register is a bool, not {self.type}")
        if self.type == "string":
            if self.length is None:
                raise ValueError("string needs length: the number of registers (2 characters each)")
        else:
            width = TYPE_WIDTH[str(self.type)]
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
    def start(self) -> int:
        """The zero-based address (always set once the model validated)."""
        return self.address or 0

    @property
    def value_type(self) -> str:
        """The value type (always set once the model validated)."""
        return self.type or "bool"

    @property
    def is_bit_area(self) -> bool:
        """True for coils and discrete inputs, whose items are single bits."""
        return self.area in BIT_AREAS

    @property
    def register_count(self) -> int:
        """Items the value occupies: registers, or 1 for a coil or discrete input."""
        if self.type == "string":
            # The model validator guarantees a length for strings.
            return self.length or 0
        return TYPE_WIDTH[self.value_type]
