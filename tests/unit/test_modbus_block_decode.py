"""The compiled block decoder gives exactly what ``decode()`` gives, signal by signal."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import Value
from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.modbus.config import TYPE_WIDTH, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.decode import BlockDecoder, decode
from shopfloor_gateway.adapters.modbus.plan import compile_decoder, plan_reads

WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
TYPES = (*TYPE_WIDTH, "string")


@st.composite
def register_signals(draw: st.DrawFn) -> tuple[list[tuple[str, int, ModbusSignalConfig]], int]:
    """Signals at random (possibly overlapping) offsets of one register block."""
    points: list[tuple[str, int, ModbusSignalConfig]] = []
    end = 1
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(TYPES))
        order = draw(st.sampled_from(WORD_ORDERS))
        offset = draw(st.integers(0, 20))
        fields: dict[str, Any] = {"address": offset, "type": kind, "word_order": order}
        if kind == "string":
            fields["length"] = draw(st.integers(1, 5))
        if kind == "bool":
            fields["bit"] = draw(st.none() | st.integers(0, 15))
        signal = ModbusSignalConfig.model_validate(fields)
        points.append((f"s{i}", offset, signal))
        end = max(end, offset + signal.register_count)
    return points, end


def equal(a: Value, b: Value) -> bool:
    """Equal values of equal type (NaN equals NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def one_by_one(
    points: list[tuple[str, int, ModbusSignalConfig]], items: list[Any]
) -> tuple[dict[str, Value], dict[str, str]]:
    """What ``decode()`` says for each signal."""
    values: dict[str, Value] = {}
    problems: dict[str, str] = {}
    for name, offset, signal in points:
        try:
            values[name] = decode(items[offset : offset + signal.register_count], signal)
        except DecodeError as exc:
            problems[name] = str(exc)
    return values, problems


def check_same(points: list[tuple[str, int, ModbusSignalConfig]], count: int, items: Any) -> None:
    """Block decoder and ``decode()`` agree on values, types and error texts."""
    bit_area = points[0][2].is_bit_area
    expected_values, expected_problems = one_by_one(points, items)
    values: dict[str, Value] = {}
    problems: dict[str, str] = {}
    BlockDecoder(points, count, bit_area=bit_area).decode_into(items, values, problems)
    assert problems == expected_problems
    assert values.keys() == expected_values.keys()
    for name, value in values.items():
        assert equal(value, expected_values[name]), (name, value, expected_values[name])


@settings(max_examples=300, deadline=None)
@given(data=st.data(), layout=register_signals())
def test_block_matches_decode_for_every_type_and_order(
    data: st.DataObject, layout: tuple[list[tuple[str, int, ModbusSignalConfig]], int]
) -> None:
    points, count = layout
    items = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count))
    check_same(points, count, items)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), layout=register_signals())
def test_block_matches_decode_on_bcd_and_ascii_edge_values(
    data: st.DataObject, layout: tuple[list[tuple[str, int, ModbusSignalConfig]], int]
) -> None:
    # Registers made of decimal nibbles and ASCII bytes, so good BCD and strings come up often.
    word = st.sampled_from([0x1234, 0x0999, 0x4142, 0x2000, 0x0000, 0x4100, 0x12A4, 0xC3A9])
    points, count = layout
    items = data.draw(st.lists(word, min_size=count, max_size=count))
    check_same(points, count, items)


@given(bits=st.lists(st.booleans(), min_size=1, max_size=40), data=st.data())
def test_bit_area_block_matches_decode(bits: list[bool], data: st.DataObject) -> None:
    offsets = data.draw(st.lists(st.integers(0, len(bits) - 1), min_size=1, max_size=8))
    points = [
        (f"c{i}", o, ModbusSignalConfig(area="coil", address=o)) for i, o in enumerate(offsets)
    ]
    check_same(points, len(bits), bits)


def test_values_out_of_register_range_fall_back_to_decode_errors() -> None:
    points = [
        ("a", 0, ModbusSignalConfig(address=0, type="uint16")),
        ("b", 1, ModbusSignalConfig(address=1, type="uint32", word_order="CDAB")),
    ]
    check_same(points, 3, [7, 70000, 1])
    values: dict[str, Value] = {}
    problems: dict[str, str] = {}
    BlockDecoder(points, 3).decode_into([7, 70000, 1], values, problems)
    assert values == {"a": 7}
    assert "0..65535" in problems["b"]


def test_short_response_marks_every_signal_bad() -> None:
    points = [("a", 0, ModbusSignalConfig(address=0, type="uint32"))]
    values: dict[str, Value] = {}
    problems: dict[str, str] = {}
    BlockDecoder(points, 2).decode_into([1], values, problems)
    assert values == {}
    assert "needs 2" in problems["a"]


def test_point_outside_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        BlockDecoder([("a", 1, ModbusSignalConfig(address=1, type="uint32"))], 2)


def test_compiled_plan_decodes_a_dense_block_in_one_struct() -> None:
    signals = {
        "good": ModbusSignalConfig(address=0, type="uint32"),
        "temp": ModbusSignalConfig(address=2, type="float32"),
        "order": ModbusSignalConfig(address=4, type="string", length=2),
        "speed": ModbusSignalConfig(address=8, type="int16"),
    }
    (request,) = plan_reads(signals, max_registers=125, max_gap=16)
    registers = [0, 42, *struct.unpack(">2H", struct.pack(">f", 1.5)), 0x504F, 0x3100, 0, 0]
    registers += [0xFFFF]
    values: dict[str, Value] = {}
    problems: dict[str, str] = {}
    compile_decoder(request, signals).decode_into(registers, values, problems)
    assert problems == {}
    assert values == {"good": 42, "temp": 1.5, "order": "PO1", "speed": -1}
