"""Modbus read frames on the wire (pure): build requests, split and check responses.

Two framings over a byte stream, for the four read functions (MODBUS Application Protocol
v1.1b3, 6.1 to 6.4):

- **MBAP** (Modbus TCP, Messaging Implementation Guide v1.0b, 3.1.3): a 7-byte header
  (transaction id, protocol id 0, length, unit id) before the PDU. The length field delimits
  every frame, so :class:`MbapReader` splits a stream without knowing the requests.
- **RTU** (Modbus over Serial Line v1.02, 2.5.1), here carried over TCP by serial-to-Ethernet
  converters: unit id, PDU, CRC-16 (low byte first). There is no length field: a response's
  size follows from its function code (exception: 5 bytes; read: its byte count + 5), so
  :class:`RtuReader` frames only responses to the read functions and their exceptions.

Nothing here does I/O or keeps time. Two error kinds, both ``ValueError``:

- :class:`FrameError`: the stream is not valid framing (bad protocol id or length field, CRC
  mismatch, a byte count that disagrees with the frame): the connection cannot be trusted.
- :class:`MismatchError`: a well-formed frame that does not answer the request (another unit,
  function or item count): for RTU, a late answer to an earlier request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from shopfloor_gateway.adapters.modbus.config import RegisterArea

#: Function codes of the four reads (MODBUS Application Protocol v1.1b3, 6.1 to 6.4).
FUNCTION_CODES: dict[RegisterArea, int] = {
    "coil": 1,
    "discrete_input": 2,
    "holding": 3,
    "input": 4,
}
#: Items one read may ask for: 2000 bits (6.1, 6.2) or 125 registers (6.3, 6.4).
MAX_COUNT = {1: 2000, 2: 2000, 3: 125, 4: 125}

#: The biggest MBAP length field a valid frame can carry (unit id + a 253-byte PDU).
MAX_MBAP_LENGTH = 254
#: The biggest RTU frame (unit id + 253-byte PDU + CRC).
MAX_RTU_FRAME = 256
#: The byte count of a read response is at most 250 (125 registers) (6.3).
_MAX_BYTE_COUNT = 250

_MBAP = struct.Struct(">HHHB")
#: A whole Modbus TCP read request: MBAP header (transaction, protocol 0, length 6, unit)
#: and the PDU (function, start, count).
MBAP_READ = struct.Struct(">HHHBBHH")
_RTU_READ = struct.Struct(">BBHH")


class FrameError(ValueError):
    """The byte stream is not valid Modbus framing (the connection must be dropped)."""


class MismatchError(ValueError):
    """A well-formed response that does not answer the request it was matched with."""


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """The device answered a Modbus exception (its code, 1..255)."""

    code: int


#: A read's outcome: registers, bits, or the device's exception.
ReadResult = list[int] | list[bool] | ExceptionResponse


class Response(NamedTuple):
    """One response frame off the wire, framing checked, contents not yet matched."""

    #: MBAP transaction id; -1 for RTU, which has none.
    transaction: int
    unit_id: int
    #: The function code as sent, exception bit (0x80) included.
    function: int
    #: The PDU after the function code: byte count and values, or the exception code.
    data: bytes


def _crc_table() -> tuple[int, ...]:
    """CRC-16/MODBUS (reflected polynomial 0xA001) for every byte value."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """The Modbus RTU CRC-16 of ``data`` (initial 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def _check_read(unit_id: int, function: int, start: int, count: int) -> None:
    """Refuse a read the protocol cannot express."""
    if not 0 <= unit_id <= 255:
        raise ValueError(f"unit id must be 0..255, got {unit_id}")
    limit = MAX_COUNT.get(function)
    if limit is None:
        raise ValueError(f"function {function} is not a read (1..4)")
    if not 1 <= count <= limit:
        raise ValueError(f"function {function} reads 1..{limit} items, asked {count}")
    if not 0 <= start <= 0x10000 - count:
        raise ValueError(f"items {start}..{start + count - 1} lie outside 0..65535")


def mbap_request(transaction: int, unit_id: int, function: int, start: int, count: int) -> bytes:
    """The Modbus TCP frame of a read request; ``ValueError`` for an impossible one."""
    _check_read(unit_id, function, start, count)
    if not 0 <= transaction <= 0xFFFF:
        raise ValueError(f"transaction id must be 0..65535, got {transaction}")
    return MBAP_READ.pack(transaction, 0, 6, unit_id, function, start, count)


def rtu_request(unit_id: int, function: int, start: int, count: int) -> bytes:
    """The RTU frame (CRC appended) of a read request; ``ValueError`` for an impossible one."""
    _check_read(unit_id, function, start, count)
    body = _RTU_READ.pack(unit_id, function, start, count)
    crc = crc16(body)
    return body + bytes((crc & 0xFF, crc >> 8))


class _StreamReader:
    """A byte stream split into frames: what is left of an incomplete frame waits here."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        """Start with an empty buffer."""
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes held back as the start of an incomplete frame."""
        return len(self._buffer)


class MbapReader(_StreamReader):
    """Splits a Modbus TCP byte stream into response frames, however TCP segments it."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[Response]:
        """The frames completed by ``data``; raise :class:`FrameError` on invalid framing."""
        size = len(data)
        if not self._buffer and size >= 8:
            # The usual case, one whole frame per segment: no buffering, no loop.
            transaction, protocol, length, unit = _MBAP.unpack_from(data)
            if size == 6 + length and protocol == 0 and length <= MAX_MBAP_LENGTH:
                return [Response(transaction, unit, data[7], data[8:])]
        buffer = self._buffer + data if self._buffer else data
        out: list[Response] = []
        pos = 0
        size = len(buffer)
        while size - pos >= 7:
            transaction, protocol, length, unit = _MBAP.unpack_from(buffer, pos)
            if protocol != 0:
                raise FrameError(f"not Modbus TCP: protocol id {protocol} (expected 0)")
            if not 2 <= length <= MAX_MBAP_LENGTH:
                raise FrameError(f"not Modbus TCP: length field {length} (valid: 2..254)")
            end = pos + 6 + length
            if end > size:
                break
            out.append(Response(transaction, unit, buffer[pos + 7], buffer[pos + 8 : end]))
            pos = end
        self._buffer = buffer[pos:] if pos < size else b""
        return out


class RtuReader(_StreamReader):
    """Splits an RTU byte stream into responses to reads (function codes 1..4)."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[Response]:
        """The frames completed by ``data``; raise :class:`FrameError` on invalid framing."""
        buffer = self._buffer + data if self._buffer else data
        out: list[Response] = []
        pos = 0
        size = len(buffer)
        while size - pos >= 3:
            function = buffer[pos + 1]
            if function & 0x80:
                end = pos + 5
            elif function in MAX_COUNT:
                count = buffer[pos + 2]
                if count > _MAX_BYTE_COUNT:
                    raise FrameError(f"RTU response announces {count} bytes (at most 250)")
                end = pos + 5 + count
            else:
                raise FrameError(f"RTU response with function code {function} (not a read)")
            if end > size:
                break
            frame = buffer[pos:end]
            crc = crc16(frame[:-2])
            if frame[-2] != crc & 0xFF or frame[-1] != crc >> 8:
                got = frame[-2] | frame[-1] << 8
                raise FrameError(f"RTU CRC mismatch: frame says {got:#06x}, data gives {crc:#06x}")
            out.append(Response(-1, frame[0], function, frame[2:-2]))
            pos = end
        self._buffer = buffer[pos:] if pos < size else b""
        return out


# Bits of every byte value, least significant first (6.1: the LSB of the first byte is the
# first coil asked for).
_BITS: tuple[tuple[bool, ...], ...] = tuple(
    tuple(bool(byte >> i & 1) for i in range(8)) for byte in range(256)
)
_WORDS: dict[int, struct.Struct] = {n: struct.Struct(f">{n}H") for n in range(1, 126)}


def decode_response(response: Response, unit_id: int, function: int, count: int) -> ReadResult:
    """The values (or exception) of ``response`` to a read of ``count`` items.

    Raises :class:`MismatchError` when it answers another unit, function or count, and
    :class:`FrameError` when its byte count disagrees with its own length.
    """
    # Unit 0 is the broadcast address; some TCP devices answer it with their own id.
    if unit_id and response.unit_id != unit_id:
        raise MismatchError(f"response from unit {response.unit_id}, asked unit {unit_id}")
    got = response.function
    data = response.data
    if got & 0x7F != function:
        raise MismatchError(f"response to function {got & 0x7F}, sent {function}")
    if got & 0x80:
        if len(data) != 1:
            raise FrameError(f"exception response of {len(data) + 1} bytes (expected 2)")
        return ExceptionResponse(data[0])
    size = len(data) - 1
    if size < 0 or data[0] != size:
        announced = data[0] if data else "no"
        raise FrameError(f"response announces {announced} bytes of values, carries {size}")
    if function >= 3:
        if size != 2 * count:
            raise MismatchError(f"response has {size // 2} registers, asked {count}")
        words = _WORDS.get(count) or struct.Struct(f">{count}H")
        return list(words.unpack_from(data, 1))
    # Bits come in whole bytes, padded with zeros (6.1): another byte count is another answer.
    if size != (count + 7) // 8:
        raise MismatchError(f"response has {8 * size} bits, asked {count}")
    bits = _BITS
    out = [bit for byte in data[1:] for bit in bits[byte]]
    del out[count:]
    return out
