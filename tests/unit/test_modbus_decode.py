"""Register decoding and encoding: hand-checked vectors, round trips, bad input."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.modbus.config import ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.decode import decode, encode

WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


def sig(type_: str, word_order: str = "ABCD", length: int | None = None) -> ModbusSignalConfig:
    """A signal at address 0 (the address does not matter for decoding)."""
    return ModbusSignalConfig(address=0, type=type_, word_order=word_order, length=length)


# float32 123.456 is 0x42F6E979; uint32 0x12345678; both in every word order.
VECTORS: list[tuple[str, str, list[int], Any]] = [
    ("float32", "ABCD", [0x42F6, 0xE979], 123.456),
    ("float32", "CDAB", [0xE979, 0x42F6], 123.456),
    ("float32", "BADC", [0xF642, 0x79E9], 123.456),
    ("float32", "DCBA", [0x79E9, 0xF642], 123.456),
    ("uint32", "ABCD", [0x1234, 0x5678], 0x12345678),
    ("uint32", "CDAB", [0x5678, 0x1234], 0x12345678),
    ("uint32", "BADC", [0x3412, 0x7856], 0x12345678),
    ("uint32", "DCBA", [0x7856, 0x3412], 0x12345678),
    ("int32", "ABCD", [0xFFFF, 0xFFFE], -2),
    ("int32", "CDAB", [0xFFFE, 0xFFFF], -2),
    ("int32", "ABCD", [0x8000, 0x0000], -(2**31)),
    ("uint16", "ABCD", [0x1234], 0x1234),
    ("uint16", "CDAB", [0x1234], 0x1234),
    ("uint16", "BADC", [0x1234], 0x3412),
    ("uint16", "DCBA", [0x1234], 0x3412),
    ("int16", "ABCD", [0xFFFF], -1),
    ("int16", "ABCD", [0x8000], -32768),
    ("int16", "BADC", [0x0080], -32768),
    ("string", "ABCD", [0x4142, 0x4344], "ABCD"),
    ("string", "CDAB", [0x4142, 0x4344], "ABCD"),
    ("string", "BADC", [0x4241, 0x4443], "ABCD"),
    ("string", "DCBA", [0x4241, 0x4443], "ABCD"),
]


@pytest.mark.parametrize(("type_", "order", "registers", "value"), VECTORS)
def test_vectors(type_: str, order: str, registers: list[int], value: Any) -> None:
    length = len(registers) if type_ == "string" else None
    signal = sig(type_, order, length)
    decoded = decode(registers, signal)
    if isinstance(value, float):
        assert decoded == pytest.approx(value, rel=1e-7)
        assert isinstance(decoded, float)
    else:
        assert decoded == value
        assert type(decoded) is type(value)
    assert encode(decoded, signal) == registers


@pytest.mark.parametrize(
    ("registers", "text"),
    [
        ([0x4F52, 0x442D, 0x3432, 0x0000], "ORD-42"),  # NUL padding
        ([0x4F52, 0x442D, 0x3432, 0x2020], "ORD-42"),  # space padding
        ([0x4F52, 0x4400, 0x2000, 0x0000], "ORD"),  # mixed padding
        ([0x2041, 0x2042, 0x0000, 0x0000], " A B"),  # leading and inner spaces kept
        ([0x0000, 0x0000, 0x0000, 0x0000], ""),
    ],
)
def test_string_padding(registers: list[int], text: str) -> None:
    assert decode(registers, sig("string", length=4)) == text


def test_string_encode_pads_with_nul() -> None:
    assert encode("ORD", sig("string", length=3)) == [0x4F52, 0x4400, 0x0000]
    assert encode("ORD", sig("string", "BADC", length=3)) == [0x524F, 0x0044, 0x0000]


def test_non_ascii_string_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"non-ASCII byte 0xC3 at position 1"):
        decode([0x41C3, 0xA900], sig("string", length=2))


@pytest.mark.parametrize(
    ("registers", "signal", "match"),
    [
        ([1], sig("uint32"), "needs 2 registers, got 1"),
        ([1, 2, 3], sig("float32"), "needs 2 registers, got 3"),
        ([], sig("uint16"), "needs 1 registers, got 0"),
        ([0x10000], sig("uint16"), "0..65535"),
        ([-1, 0], sig("int32"), "0..65535"),
        ([0x4142], sig("string", length=2), "needs 2 registers, got 1"),
    ],
)
def test_bad_register_input(registers: list[int], signal: ModbusSignalConfig, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(registers, signal)


def test_float_specials_pass_through() -> None:
    nan = decode([0x7FC0, 0x0000], sig("float32"))
    assert isinstance(nan, float)
    assert math.isnan(nan)
    assert decode([0x7F80, 0x0000], sig("float32")) == math.inf
    assert decode([0xFF80, 0x0000], sig("float32")) == -math.inf
    assert encode(math.inf, sig("float32", "CDAB")) == [0x0000, 0x7F80]


@pytest.mark.parametrize(
    ("value", "signal", "match"),
    [
        (65536, sig("uint16"), "does not fit in uint16"),
        (-1, sig("uint32"), "does not fit in uint32"),
        (32768, sig("int16"), "does not fit in int16"),
        (1.5, sig("int32"), "needs an int"),
        ("7", sig("uint16"), "needs a number"),
        (True, sig("uint16"), "needs a number"),
        (1e39, sig("float32"), "does not fit in float32"),
        ("ABCDE", sig("string", length=2), "room for 4"),
        ("Ä", sig("string", length=2), "not ASCII"),
        (5, sig("string", length=2), "needs a str"),
    ],
)
def test_encode_refuses_what_does_not_fit(
    value: Any, signal: ModbusSignalConfig, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode(value, signal)


INT_RANGES = {
    "uint16": (0, 2**16 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint32": (0, 2**32 - 1),
    "int32": (-(2**31), 2**31 - 1),
}


@pytest.mark.parametrize("order", WORD_ORDERS)
@pytest.mark.parametrize("type_", sorted(INT_RANGES))
@given(data=st.data())
def test_integer_round_trip(type_: str, order: str, data: st.DataObject) -> None:
    low, high = INT_RANGES[type_]
    value = data.draw(st.integers(low, high))
    signal = sig(type_, order)
    registers = encode(value, signal)
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert len(registers) == signal.register_count
    assert decode(registers, signal) == value


@pytest.mark.parametrize("order", WORD_ORDERS)
@given(value=st.floats(width=32, allow_nan=False))
def test_float_round_trip(order: str, value: float) -> None:
    signal = sig("float32", order)
    assert decode(encode(value, signal), signal) == value


@pytest.mark.parametrize("order", WORD_ORDERS)
@given(registers=st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2))
def test_float_registers_round_trip(order: str, registers: list[int]) -> None:
    # Every bit pattern (NaN payloads included) survives decode then encode.
    signal = sig("float32", order)
    value = decode(registers, signal)
    assert isinstance(value, float)
    again = encode(value, signal)
    if math.isnan(value):
        assert math.isnan(float(decode(again, signal)))
    else:
        assert again == registers


@pytest.mark.parametrize("order", WORD_ORDERS)
@given(
    text=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
    spare=st.integers(0, 3),
)
def test_string_round_trip(order: str, text: str, spare: int) -> None:
    length = max(1, (len(text) + 1) // 2 + spare)
    signal = sig("string", order, length)
    registers = encode(text, signal)
    assert len(registers) == length
    assert decode(registers, signal) == text


@pytest.mark.parametrize("order", WORD_ORDERS)
@pytest.mark.parametrize("type_", ["uint32", "int32", "float32"])
def test_word_orders_are_the_documented_permutations(type_: str, order: str) -> None:
    # Independent of the implementation: A B C D are the big-endian bytes of the value.
    fmt = {"uint32": ">I", "int32": ">i", "float32": ">f"}[type_]
    value: Any = 1.5 if type_ == "float32" else 0x0102_0304
    a, b, c, d = struct.pack(fmt, value)
    byte_at = {"A": a, "B": b, "C": c, "D": d}
    wire = [byte_at[ch] for ch in order]
    registers = [wire[0] << 8 | wire[1], wire[2] << 8 | wire[3]]
    assert encode(value, sig(type_, order)) == registers
    assert decode(registers, sig(type_, order)) == value
