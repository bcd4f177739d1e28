"""Fuzz: the Modbus decoder over arbitrary register contents, every type and word order."""

from __future__ import annotations

import math
from typing import get_args

from hypothesis import given
from hypothesis import strategies as st

from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.modbus.config import ModbusSignalConfig as Signal
from shopfloor_gateway.adapters.modbus.config import RegisterType, WordOrder
from shopfloor_gateway.adapters.modbus.decode import decode, encode
from tests.fuzz import fuzz

TYPES: tuple[str, ...] = get_args(RegisterType)
ORDERS: tuple[str, ...] = get_args(WordOrder)


@st.composite
def signals(draw: st.DrawFn) -> Signal:
    """Any valid signal config: register types, bits, strings, bit areas."""
    kind = draw(st.sampled_from(TYPES))
    area = draw(st.sampled_from(["holding", "input", "coil", "discrete_input"]))
    fields: dict[str, object] = {"address": draw(st.integers(0, 1000)), "type": kind}
    if kind == "bool" and area in ("coil", "discrete_input"):
        fields["area"] = area
    else:
        fields["area"] = draw(st.sampled_from(["holding", "input"]))
        fields["word_order"] = draw(st.sampled_from(ORDERS))
        if kind == "bool" and draw(st.booleans()):
            fields["bit"] = draw(st.integers(0, 15))
        if kind == "string":
            fields["length"] = draw(st.integers(1, 125))
    return Signal.model_validate(fields)


#: Register contents as a device (or a broken one) might return them.
words = st.one_of(
    st.integers(0, 0xFFFF),
    st.integers(-(2**20), 2**20),  # out of range: a broken client or device
    st.booleans(),
)


@fuzz(200)
@given(signals(), st.data())
def test_decode_returns_a_value_of_the_type_or_a_decode_error(
    sig: Signal, data: st.DataObject
) -> None:
    width = sig.register_count
    count = data.draw(st.one_of(st.just(width), st.integers(0, width + 3)))
    registers = data.draw(st.lists(words, min_size=count, max_size=count))
    try:
        value = decode(registers, sig)
    except DecodeError:
        return
    kind = sig.value_type
    if kind == "bool":
        assert isinstance(value, bool)
    elif kind == "string":
        assert isinstance(value, str) and value.isascii()
        assert len(value) <= width * 2
    elif kind.startswith("float"):
        assert isinstance(value, float)
    else:
        assert isinstance(value, int) and not isinstance(value, bool)
        if kind.startswith("uint") or kind.startswith("bcd"):
            assert value >= 0
        assert abs(value) < 2 ** (16 * width)


@fuzz(200)
@given(signals(), st.data())
def test_in_range_registers_round_trip_through_encode(sig: Signal, data: st.DataObject) -> None:
    registers = data.draw(
        st.lists(st.integers(0, 0xFFFF), min_size=sig.register_count, max_size=sig.register_count)
    )
    if sig.is_bit_area:
        registers = [data.draw(st.integers(0, 1))]
    try:
        value = decode(registers, sig)
    except DecodeError:
        return
    if isinstance(value, float) and math.isnan(value):
        return  # many NaN bit patterns decode to the one float NaN
    if sig.value_type == "bool" or sig.value_type == "string":
        # Decoding drops other bits / trailing padding: compare values, not registers.
        assert decode(encode(value, sig), sig) == value
    else:
        assert encode(value, sig) == registers
