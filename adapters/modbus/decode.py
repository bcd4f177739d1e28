"""Turn raw 16-bit registers (or bits) into typed values and back (pure, ``struct`` on raw words).

Registers are packed big-endian into bytes ``A B C D ...`` (A = high byte of the first
register), reordered for the word order, then unpacked with :mod:`struct`; this is about
40x cheaper than pymodbus' converters.

Word orders (``ABCD`` is the value's big-endian byte order)::

    ABCD  registers [AB, CD]  high word first, high byte first (Modbus default)
    CDAB  registers [CD, AB]  word-swapped: low word first
    BADC  registers [BA, DC]  byte-swapped within each word
    DCBA  registers [DC, BA]  both swapped (little-endian)

For 64-bit types the same names mean the same two switches over four words: ``CDAB``
reverses the order of all four words (``[GH, EF, CD, AB]``), ``BADC`` swaps the bytes inside
each word, ``DCBA`` does both (fully little-endian). For one-register types only the byte
swap matters (``CDAB`` equals ``ABCD``, ``DCBA`` equals ``BADC``).

Strings hold two ASCII characters per register, high byte first; ``BADC`` and ``DCBA``
swap the bytes within each register, the order of the registers never changes. Trailing
NULs and spaces are stripped.

BCD (``bcd16``: 4 digits in one register, ``bcd32``: 8 digits in two) packs one decimal
digit per nibble, most significant first after the word order is applied: ``0x1234`` is
1234. A nibble above 9 is a :class:`DecodeError`.

``bool`` is one coil or discrete input, one bit of a register (``bit``), or a whole
register that is non-zero.

``float32``/``float64`` NaN and infinities are returned as they are (no error): the signal
mapping decides what they mean.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from gateway.core.model import Value
from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.modbus.config import TYPE_WIDTH, ModbusSignalConfig

#: What :func:`decode` returns for a good value.
DecodedValue = bool | int | float | str

_STRUCT_FORMAT = {
    "uint16": ">H",
    "int16": ">h",
    "uint32": ">I",
    "int32": ">i",
    "float32": ">f",
    "uint64": ">Q",
    "int64": ">q",
    "float64": ">d",
    "bcd16": ">H",
    "bcd32": ">I",
}


def _swap_words(raw: bytes) -> bytes:
    """Reverse the order of the 16-bit words of ``raw``."""
    return b"".join(raw[i : i + 2] for i in range(len(raw) - 2, -1, -2))


def _swap_bytes(raw: bytes) -> bytes:
    """Swap the two bytes inside every 16-bit word of ``raw``."""
    out = bytearray(raw)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


def _identity(raw: bytes) -> bytes:
    """Leave the bytes as they are."""
    return raw


def _reverse(raw: bytes) -> bytes:
    """Reverse every byte (both swaps at once)."""
    return raw[::-1]


@lru_cache(maxsize=64)
def _reorder(signal_type: str, word_order: str, words: int) -> Callable[[bytes], bytes]:
    """The byte permutation for this type and word order; it is its own inverse."""
    if signal_type == "string":
        # Characters run register by register; only the bytes inside a register may swap.
        return _swap_bytes if word_order in ("BADC", "DCBA") else _identity
    if word_order == "ABCD" or (word_order == "CDAB" and words == 1):
        return _identity
    if word_order == "CDAB":
        return _swap_words
    if word_order == "BADC" or (word_order == "DCBA" and words == 1):
        return _swap_bytes
    # DCBA on two or more words is a full byte reversal.
    return _reverse


@lru_cache(maxsize=128)
def _registers_struct(count: int) -> struct.Struct:
    """A struct for ``count`` big-endian unsigned 16-bit registers."""
    return struct.Struct(f">{count}H")


def reorder(raw: bytes, signal_type: str, word_order: str) -> bytes:
    """Apply (or undo: it is its own inverse) a word order to the wire bytes of a value."""
    return _reorder(signal_type, word_order, len(raw) // 2)(raw)


def _to_bytes(registers: Sequence[int], signal: ModbusSignalConfig) -> bytes:
    """Pack the registers into wire bytes, checking count and range."""
    expected = signal.register_count
    if len(registers) != expected:
        raise DecodeError(
            f"{signal.value_type} at address {signal.start} needs {expected} registers, "
            f"got {len(registers)}"
        )
    try:
        return _registers_struct(expected).pack(*registers)
    except struct.error as exc:
        raise DecodeError(
            f"register values must be integers 0..65535, got {list(registers)}"
        ) from exc


def decode(registers: Sequence[int] | Sequence[bool], signal: ModbusSignalConfig) -> DecodedValue:
    """Decode the registers (or the bit) of one signal; raise :class:`DecodeError` on bad input."""
    kind = signal.value_type
    if signal.is_bit_area:
        if len(registers) != 1:
            raise DecodeError(f"{signal.area} {signal.start} needs 1 bit, got {len(registers)}")
        return bool(registers[0])
    words = [int(r) for r in registers]
    if kind == "bool":
        raw = _to_bytes(words, signal)
        value = _reorder("uint16", signal.word_order, 1)(raw)
        number = int.from_bytes(value, "big")
        if signal.bit is None:
            return number != 0
        return bool((number >> signal.bit) & 1)
    raw = _reorder(kind, signal.word_order, signal.register_count)(_to_bytes(words, signal))
    if kind == "string":
        return _decode_string(raw, signal)
    number_or_float: int | float = struct.unpack(_STRUCT_FORMAT[kind], raw)[0]
    if kind in ("bcd16", "bcd32"):
        return _decode_bcd(int(number_or_float), signal)
    return number_or_float


def _decode_bcd(packed: int, signal: ModbusSignalConfig) -> int:
    """Read one decimal digit per nibble, most significant nibble first."""
    digits = f"{packed:0{signal.register_count * 4}X}"
    if not digits.isdigit():
        raise DecodeError(
            f"{signal.value_type} at address {signal.start} is not BCD: 0x{digits} "
            "has a nibble above 9"
        )
    return int(digits)


def _decode_string(raw: bytes, signal: ModbusSignalConfig) -> str:
    """Decode ASCII, dropping trailing padding (NUL or space, both are common)."""
    text = raw.rstrip(b"\x00 ")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(
            f"string at address {signal.start} holds a non-ASCII byte "
            f"0x{text[exc.start]:02X} at position {exc.start}"
        ) from exc


def encode(value: DecodedValue, signal: ModbusSignalConfig) -> list[int]:
    """Encode a value into the signal's registers: the exact inverse of :func:`decode`.

    Raises ``ValueError`` for a value the type cannot hold (out of range, too long, not
    ASCII, not BCD). A string round-trips unless it ends in NUL or space, which decoding
    strips; a float round-trips when it is representable in the type. A ``bool`` of a
    register sets only its own bit (the other bits are 0); a bit-area ``bool`` is ``[0|1]``.
    """
    kind = signal.value_type
    count = signal.register_count
    if kind == "bool":
        if not isinstance(value, bool | int) or isinstance(value, float):
            raise ValueError(f"bool signal needs a bool, got {type(value).__name__}")
        if signal.is_bit_area:
            return [int(bool(value))]
        word = (1 << signal.bit if signal.bit is not None else 1) if value else 0
        return list(
            _registers_struct(1).unpack(
                _reorder("uint16", signal.word_order, 1)(word.to_bytes(2, "big"))
            )
        )
    if kind == "string":
        raw = _encode_string(value, signal)
    elif kind in ("bcd16", "bcd32"):
        raw = _encode_bcd(value, signal)
    else:
        raw = _encode_number(value, signal)
    words = _registers_struct(count).unpack(_reorder(kind, signal.word_order, count)(raw))
    return list(words)


def _encode_bcd(value: DecodedValue, signal: ModbusSignalConfig) -> bytes:
    """Pack a non-negative integer as one decimal digit per nibble."""
    digits = signal.register_count * 4
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**digits:
        raise ValueError(f"{signal.value_type} holds 0..{10**digits - 1}, got {value!r}")
    return int(f"{value:0{digits}d}", 16).to_bytes(digits // 2, "big")


def _encode_string(value: DecodedValue, signal: ModbusSignalConfig) -> bytes:
    """ASCII bytes padded with NULs to the signal's width."""
    if not isinstance(value, str):
        raise ValueError(f"string signal needs a str, got {type(value).__name__}")
    try:
        data = value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string {value!r} is not ASCII") from exc
    size = signal.register_count * 2
    if len(data) > size:
        raise ValueError(f"string {value!r} has {len(data)} characters, room for {size}")
    return data.ljust(size, b"\x00")


def _encode_number(value: DecodedValue, signal: ModbusSignalConfig) -> bytes:
    """Pack a number with the type's struct format, refusing values that do not fit."""
    kind = signal.value_type
    if isinstance(value, str | bool):
        raise ValueError(f"{kind} signal needs a number, got {type(value).__name__}")
    if kind in ("float32", "float64"):
        try:
            return struct.pack(_STRUCT_FORMAT[kind], float(value))
        except OverflowError as exc:
            raise ValueError(f"{value!r} does not fit in {kind}") from exc
    if not isinstance(value, int):
        raise ValueError(f"{kind} signal needs an int, got {value!r}")
    try:
        return struct.pack(_STRUCT_FORMAT[kind], value)
    except struct.error as exc:
        bits = 16 * TYPE_WIDTH[kind]
        raise ValueError(f"{value} does not fit in {kind} ({bits} bits)") from exc


# ---------------------------------------------------------------------------- block decoder

#: ``struct`` codes of the numeric types (big-endian in a ``>`` format).
_CODES = {kind: fmt[1] for kind, fmt in _STRUCT_FORMAT.items()}

#: How one point of a block is turned into a value (see :class:`BlockDecoder`).
_FAST, _NUMBER, _BCD, _STRING, _BOOL_WORD, _BIT = range(6)


class BlockDecoder:
    """A decoder compiled for one read request: one ``struct`` unpack per block, not per value.

    It gives exactly what :func:`decode` gives for each signal (the unit tests check this for
    every type and word order). Signals in ``ABCD`` byte order that do not overlap another
    signal are read by one precompiled ``struct.Struct`` over the whole block; the others
    (swapped word orders, BCD, strings, bits of a register) take a precompiled per-signal
    step on the same bytes. No pydantic property is read per value.
    """

    __slots__ = (
        "_bits",
        "_count",
        "_fast",
        "_fast_names",
        "_offsets",
        "_signals",
        "_slow",
        "_words",
    )

    def __init__(
        self,
        points: Sequence[tuple[str, int, ModbusSignalConfig]],
        count: int,
        *,
        bit_area: bool = False,
    ) -> None:
        """Compile ``points`` (name, offset in the block, signal) for a block of ``count`` items.

        Raises ``ValueError`` when a point does not fit inside the block.
        """
        self._bits = bit_area
        self._count = count
        self._words = _registers_struct(count) if count and not bit_area else None
        self._signals = {name: signal for name, _, signal in points}
        self._offsets = {name: offset for name, offset, _ in points}
        fast_fmt = ">"
        fast_names: list[str] = []
        slow: list[tuple[str, int, int, int, object]] = []
        covered = 0  # first byte not yet taken by the fast struct
        for name, offset, signal in sorted(points, key=lambda p: (p[1], p[0])):
            width = signal.register_count
            if offset < 0 or offset + width > count:
                raise ValueError(
                    f"signal {name!r} at offset {offset} (+{width}) is outside a block of {count}"
                )
            if bit_area:
                slow.append((name, _BIT, offset, 1, None))
                continue
            kind = signal.value_type
            order = signal.word_order
            start, size = 2 * offset, 2 * width
            swap = _reorder(kind, order, width)
            if kind == "bool":
                byte_swap = _reorder("uint16", order, 1) is not _identity
                mask = None if signal.bit is None else 1 << signal.bit
                conv = (struct.Struct("<H" if byte_swap else ">H"), mask)
                slow.append((name, _BOOL_WORD, start, size, conv))
            elif kind == "string":
                slow.append((name, _STRING, start, size, swap))
            elif kind in ("bcd16", "bcd32"):
                fmt = struct.Struct(_STRUCT_FORMAT[kind])
                slow.append((name, _BCD, start, size, (swap, fmt, 4 * width)))
            elif swap is _identity and start >= covered:
                if start > covered:
                    fast_fmt += f"{start - covered}x"
                fast_fmt += _CODES[kind]
                fast_names.append(name)
                covered = start + size
            elif swap is _reverse:
                # Fully reversed bytes are the little-endian value: no copy needed.
                slow.append((name, _NUMBER, start, size, (None, struct.Struct("<" + _CODES[kind]))))
            else:
                fmt = struct.Struct(_STRUCT_FORMAT[kind])
                slow.append((name, _NUMBER, start, size, (swap, fmt)))
        self._fast = struct.Struct(fast_fmt) if fast_names else None
        self._fast_names = tuple(fast_names)
        self._slow = tuple(slow)

    def decode_into(
        self,
        items: Sequence[int] | Sequence[bool],
        values: dict[str, Value],
        problems: dict[str, str],
    ) -> None:
        """Decode a response's items into ``values``; a bad value's reason goes to ``problems``."""
        if len(items) != self._count:
            reason = f"response has {len(items)} items, the block needs {self._count}"
            for name in self._signals:
                problems[name] = reason
            return
        if self._bits:
            for name, _, offset, _, _ in self._slow:
                values[name] = bool(items[offset])
            return
        assert self._words is not None
        try:
            buf = self._words.pack(*items)
        except struct.error:
            # Not 16-bit integers: let decode() say which signal is bad, and why.
            self._decode_each(items, values, problems)
            return
        if self._fast is not None:
            values.update(zip(self._fast_names, self._fast.unpack_from(buf), strict=True))
        for name, how, start, size, conv in self._slow:
            try:
                values[name] = self._convert(name, how, buf, start, size, conv)
            except DecodeError as exc:
                problems[name] = str(exc)

    def _convert(
        self, name: str, how: int, buf: bytes, start: int, size: int, conv: Any
    ) -> DecodedValue:
        """One value that the block's struct does not cover."""
        if how == _NUMBER:
            swap, fmt = conv
            if swap is None:
                return fmt.unpack_from(buf, start)[0]  # type: ignore[no-any-return]
            return fmt.unpack(swap(buf[start : start + size]))[0]  # type: ignore[no-any-return]
        if how == _BOOL_WORD:
            fmt, mask = conv
            word = fmt.unpack_from(buf, start)[0]
            return word != 0 if mask is None else bool(word & mask)
        if how == _STRING:
            return _decode_string(conv(buf[start : start + size]), self._signals[name])
        swap, fmt, digits = conv  # _BCD
        packed = fmt.unpack(swap(buf[start : start + size]))[0]
        text = f"{packed:0{digits}X}"
        if not text.isdigit():
            return _decode_bcd(packed, self._signals[name])  # raises with the full message
        return int(text)

    def _decode_each(
        self,
        items: Sequence[int] | Sequence[bool],
        values: dict[str, Value],
        problems: dict[str, str],
    ) -> None:
        """The slow path: :func:`decode` per signal, which names the bad signal and why."""
        for name, offset in self._offsets.items():
            signal = self._signals[name]
            try:
                values[name] = decode(items[offset : offset + signal.register_count], signal)
            except DecodeError as exc:
                problems[name] = str(exc)
