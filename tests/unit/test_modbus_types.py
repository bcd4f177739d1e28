"""New Modbus types, Modicon references, bit areas and gap splitting (pure)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.modbus.config import (
    ModbusConnectionConfig,
    ModbusSignalConfig,
    format_ref,
    parse_ref,
)
from shopfloor_gateway.adapters.modbus.decode import decode, encode
from shopfloor_gateway.adapters.modbus.plan import ReadRequest, plan_reads, split_gaps
from shopfloor_gateway.simulators.plc import (
    HOLDING_COUNT,
    HOLE,
    PLC_SIGNALS,
    PlcModel,
    encode_image,
)

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


def sig(**kw: Any) -> ModbusSignalConfig:
    return ModbusSignalConfig(**kw)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("40001", ("holding", 0, None)),
        ("40010.3", ("holding", 9, 3)),
        ("30001", ("input", 0, None)),
        ("00017", ("coil", 16, None)),
        ("10001", ("discrete_input", 0, None)),
        ("465536", ("holding", 65535, None)),
        ("49999", ("holding", 9998, None)),
    ],
)
def test_modicon_references(ref: str, expected: tuple[str, int, int | None]) -> None:
    assert parse_ref(ref) == expected
    assert parse_ref(format_ref(*expected)) == expected


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("20001", "not a Modicon reference"),
        ("40000", "must be 1..9999"),
        ("40001.16", "bits 0..15"),
        ("00001.2", "only applies to a register"),
        ("4001", "not a Modicon reference"),
    ],
)
def test_bad_references(ref: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_ref(ref)


def test_ref_in_a_signal_sets_area_address_and_bit() -> None:
    s = sig(ref="40010.3")
    assert (s.area, s.address, s.bit, s.type) == ("holding", 9, 3, "bool")
    assert sig(ref=30001, type="int16").area == "input"  # a YAML int is fine
    assert sig(area="coil", address=4).type == "bool"
    for data, fragment in [
        ({"ref": 40010.3}, "quote a Modicon reference"),
        ({"ref": "40001", "address": 0, "type": "uint16"}, "either ref"),
        ({"ref": "40001", "area": "input", "type": "uint16"}, "area says input"),
        ({"address": 0}, "type is missing"),
        ({"type": "uint16"}, "address is missing"),
        ({"address": 0, "type": "uint16", "bit": 2}, "is a bool"),
        ({"area": "coil", "address": 0, "bit": 1}, "only applies to a register"),
    ]:
        with pytest.raises(ValidationError, match=fragment):
            sig(**data)


def test_transport_rules() -> None:
    rtu = ModbusConnectionConfig(transport="rtu", serial={"port": "/dev/ttyUSB0"})  # type: ignore[arg-type]
    assert rtu.endpoint == "rtu:///dev/ttyUSB0"
    assert rtu.serial is not None and rtu.serial.parity == "E"
    # 19200 8E1 = 11 bits a character: 3.5 characters = ~2 ms.
    assert rtu.serial.frame_gap() == pytest.approx(3.5 * 11 / 19200)
    tcp = ModbusConnectionConfig(transport="rtu_over_tcp", host="10.0.0.5", port=4001)
    assert tcp.endpoint == "rtu+tcp://10.0.0.5:4001"
    for data, fragment in [
        ({"transport": "rtu"}, "needs serial"),
        ({"transport": "tcp"}, "needs host"),
        ({"host": "h", "serial": {"port": "/dev/x"}}, "only applies to transport rtu"),
        (
            {"transport": "rtu_over_tcp", "host": "h", "max_concurrent_requests": 2},
            "needs transport tcp",
        ),
    ]:
        with pytest.raises(ValidationError, match=fragment):
            ModbusConnectionConfig(**data)


# Hand-written vectors. float64 and int64 byte layouts follow IEEE 754 / two's complement as
# printed in the Schneider "Modicon M340 ... Data types" tables (big-endian words); BCD as in
# the Siemens S7 BCD format (one digit per nibble, W#16#1234 = 1234).
VECTORS: list[tuple[dict[str, Any], list[int], Any]] = [
    ({"type": "float64"}, [0x4028, 0xAE14, 0x7AE1, 0x47AE], 12.34),
    ({"type": "float64", "word_order": "CDAB"}, [0x47AE, 0x7AE1, 0xAE14, 0x4028], 12.34),
    ({"type": "float64", "word_order": "DCBA"}, [0xAE47, 0xE17A, 0x14AE, 0x2840], 12.34),
    ({"type": "int64"}, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], -2),
    ({"type": "uint64"}, [0x0000, 0x0001, 0x2A05, 0xF200], 5_000_000_000),
    ({"type": "bcd16"}, [0x1234], 1234),
    ({"type": "bcd32"}, [0x0012, 0x3456], 123456),
    ({"type": "bcd32", "word_order": "CDAB"}, [0x3456, 0x0012], 123456),
    ({"type": "bool", "bit": 0}, [0x0001], True),
    ({"type": "bool", "bit": 15}, [0x8000], True),
    ({"type": "bool"}, [0x0000], False),
    ({"area": "coil"}, [1], True),
    ({"area": "discrete_input"}, [0], False),
]


@pytest.mark.parametrize(("kw", "registers", "value"), VECTORS)
def test_vectors(kw: dict[str, Any], registers: list[int], value: Any) -> None:
    s = sig(address=0, **kw)
    decoded = decode(registers, s)
    assert decoded == pytest.approx(value) if isinstance(value, float) else decoded == value
    assert encode(decoded, s) == registers


def test_bcd_with_a_nibble_above_nine_is_bad() -> None:
    with pytest.raises(DecodeError, match="not BCD"):
        decode([0x12A4], sig(address=0, type="bcd16"))


def test_bit_of_a_register_ignores_the_other_bits() -> None:
    s = sig(ref="40005.2")
    assert decode([0b1111_1011], s) is False
    assert decode([0b0000_0100], s) is True


@given(st.sampled_from(["int64", "uint64"]), st.sampled_from(ORDERS), st.data())
def test_64_bit_round_trip(kind: str, order: str, data: st.DataObject) -> None:
    low, high = (-(2**63), 2**63 - 1) if kind == "int64" else (0, 2**64 - 1)
    value = data.draw(st.integers(low, high))
    s = sig(address=0, type=kind, word_order=order)
    assert decode(encode(value, s), s) == value


@given(st.sampled_from(["bcd16", "bcd32"]), st.sampled_from(ORDERS), st.data())
def test_bcd_round_trip(kind: str, order: str, data: st.DataObject) -> None:
    value = data.draw(st.integers(0, 9999 if kind == "bcd16" else 99_999_999))
    s = sig(address=0, type=kind, word_order=order)
    assert decode(encode(value, s), s) == value


@pytest.mark.parametrize("t", [0.0, 3.0, 61.5, 12345.6])
def test_decoder_agrees_with_the_plc_simulators_own_encoder(t: float) -> None:
    values = PlcModel().at(t)
    image = encode_image(values)
    expected = dataclasses.asdict(values)
    areas = {
        "holding": [image.holding.get(a, 0) for a in range(HOLDING_COUNT)],
        "input": image.input,
        "coil": image.coils,
        "discrete_input": image.discrete,
    }
    for name, body in PLC_SIGNALS.items():
        s = ModbusSignalConfig.model_validate(body)
        assert not set(range(s.start, s.start + s.register_count)) & set(HOLE) or s.is_bit_area
        items = areas[s.area][s.start : s.start + s.register_count]
        got = decode(items, s)
        want = expected[name]
        assert got == pytest.approx(want, rel=1e-6) if isinstance(want, float) else got == want


def test_bits_plan_with_their_own_limits() -> None:
    signals = {f"c{i}": sig(area="coil", address=i * 100) for i in range(30)}
    plan = plan_reads(signals, max_registers=125, max_gap=16, max_bits=2000, max_bit_gap=100)
    assert [(r.start, r.count) for r in plan] == [(0, 1901), (2000, 901)]
    assert all(r.count <= 2000 for r in plan)


def test_split_gaps_keeps_contiguous_runs_together() -> None:
    signals = {
        "a": sig(address=0, type="uint16"),
        "b": sig(address=1, type="uint32"),
        "c": sig(address=10, type="uint16"),
        "d": sig(address=11, type="uint16"),
    }
    (block,) = plan_reads(signals, max_registers=125, max_gap=16)
    parts = split_gaps(block)
    assert [(p.start, p.count, [pt.signal for pt in p.points]) for p in parts] == [
        (0, 3, ["a", "b"]),
        (10, 2, ["c", "d"]),
    ]
    assert all(isinstance(p, ReadRequest) for p in parts)
