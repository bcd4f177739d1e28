"""Modbus frames on the wire: requests, stream splitting, response checks, CRC (pure)."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu import ExceptionResponse as PymodbusException
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

from shopfloor_gateway.adapters.modbus.wire import (
    ExceptionResponse,
    FrameError,
    MbapReader,
    MismatchError,
    Response,
    RtuReader,
    crc16,
    decode_response,
    mbap_request,
    rtu_request,
)
from shopfloor_gateway.simulators import load

words = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125)
bit_lists = st.lists(st.booleans(), min_size=1, max_size=2000)
units = st.integers(1, 247)


def rtu_frame(body: bytes) -> bytes:
    """``body`` with its CRC appended, low byte first."""
    crc = crc16(body)
    return body + bytes((crc & 0xFF, crc >> 8))


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# ------------------------------------------------------------------ requests and CRC


def test_crc_matches_the_spec_example() -> None:
    # Modbus over Serial Line v1.02, 6.2.2: read holding 0x006B..+3 of unit 0x11.
    assert rtu_request(0x11, 3, 0x6B, 3) == bytes.fromhex("1103006b00037687")
    assert crc16(b"") == 0xFFFF


def test_mbap_request_layout() -> None:
    expected = bytes.fromhex("1234 0000 0006 07 04 0064 000a")
    assert mbap_request(0x1234, 7, 4, 100, 10) == expected


@pytest.mark.parametrize(
    ("unit_id", "function", "start", "count", "message"),
    [
        (256, 3, 0, 1, "unit id"),
        (1, 5, 0, 1, "not a read"),
        (1, 3, 0, 126, "1..125"),
        (1, 1, 0, 2001, "1..2000"),
        (1, 3, 0, 0, "1..125"),
        (1, 3, 65530, 10, "outside"),
        (1, 3, -1, 1, "outside"),
    ],
)
def test_impossible_requests_are_refused(
    unit_id: int, function: int, start: int, count: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mbap_request(1, unit_id, function, start, count)
    with pytest.raises(ValueError, match=message):
        rtu_request(unit_id, function, start, count)


def test_transaction_id_must_fit_16_bits() -> None:
    with pytest.raises(ValueError, match="transaction"):
        mbap_request(65536, 1, 3, 0, 1)


@given(st.integers(0, 0xFFFF), units, st.sampled_from([3, 4]), st.integers(0, 65535 - 125), words)
def test_request_round_trip_through_the_load_simulator(
    tid: int, unit: int, function: int, start: int, values: list[int]
) -> None:
    frame = mbap_request(tid, unit, function, start, len(values))
    requests, rest = load.parse_requests(frame)
    assert rest == b""
    assert requests == [load.Request(tid, unit, function, start, len(values))]
    # ...and the simulator's answer decodes to the words it served.
    device = [0] * start + values
    answer = load.respond(requests[0], device)
    (response,) = MbapReader().feed(answer)
    assert response.transaction == tid
    assert decode_response(response, unit, function, len(values)) == values


def test_simulator_exception_round_trip() -> None:
    request = load.Request(9, 1, 3, 50, 10)
    (response,) = MbapReader().feed(load.respond(request, [0] * 20))
    assert decode_response(response, 1, 3, 10) == ExceptionResponse(2)


@given(st.integers(1, 0xFFFF), units, st.integers(0, 65535 - 125), st.integers(1, 125))
def test_requests_decode_in_pymodbus_server_framers(
    tid: int, unit: int, start: int, count: int
) -> None:
    for framer, frame in (
        (FramerSocket(DecodePDU(True)), mbap_request(tid, unit, 3, start, count)),
        (FramerRTU(DecodePDU(True)), rtu_request(unit, 3, start, count)),
    ):
        used, pdu = framer.handleFrame(frame, 0, 0)
        assert used == len(frame)
        assert isinstance(pdu, ReadHoldingRegistersRequest)
        assert (pdu.dev_id, pdu.address, pdu.count) == (unit, start, count)


# ------------------------------------------------------ responses from pymodbus framers


def _pymodbus_responses(function: int, unit: int, tid: int, values: list[int]) -> ModbusPDU:
    cls = ReadHoldingRegistersResponse if function == 3 else ReadInputRegistersResponse
    return cls(registers=values, dev_id=unit, transaction_id=tid)


@given(st.integers(0, 0xFFFF), units, st.sampled_from([3, 4]), words, st.lists(st.integers()))
def test_mbap_registers_from_pymodbus_any_segmentation(
    tid: int, unit: int, function: int, values: list[int], cuts: list[int]
) -> None:
    frame = FramerSocket(DecodePDU(False)).buildFrame(
        _pymodbus_responses(function, unit, tid, values)
    )
    reader = MbapReader()
    got: list[Response] = []
    for part in chunks(frame, cuts):
        got += reader.feed(part)
    assert reader.pending == 0
    (response,) = got
    assert response.transaction == tid
    assert decode_response(response, unit, function, len(values)) == values


@given(units, st.sampled_from([3, 4]), words, st.lists(st.integers()))
def test_rtu_registers_from_pymodbus_any_segmentation(
    unit: int, function: int, values: list[int], cuts: list[int]
) -> None:
    frame = FramerRTU(DecodePDU(False)).buildFrame(_pymodbus_responses(function, unit, 0, values))
    reader = RtuReader()
    got: list[Response] = []
    for part in chunks(frame, cuts):
        got += reader.feed(part)
    (response,) = got
    assert response.transaction == -1
    assert decode_response(response, unit, function, len(values)) == values


@given(units, st.sampled_from([1, 2]), bit_lists)
def test_bits_from_pymodbus_both_framings(unit: int, function: int, values: list[bool]) -> None:
    cls = ReadCoilsResponse if function == 1 else ReadDiscreteInputsResponse
    pdu = cls(bits=values, dev_id=unit, transaction_id=5)
    (mbap,) = MbapReader().feed(FramerSocket(DecodePDU(False)).buildFrame(pdu))
    (rtu,) = RtuReader().feed(FramerRTU(DecodePDU(False)).buildFrame(pdu))
    assert decode_response(mbap, unit, function, len(values)) == values
    assert decode_response(rtu, unit, function, len(values)) == values


@given(units, st.sampled_from([1, 2, 3, 4]), st.integers(1, 255))
def test_exceptions_from_pymodbus_both_framings(unit: int, function: int, code: int) -> None:
    pdu = PymodbusException(function, code, device_id=unit, transaction=3)
    (mbap,) = MbapReader().feed(FramerSocket(DecodePDU(False)).buildFrame(pdu))
    (rtu,) = RtuReader().feed(FramerRTU(DecodePDU(False)).buildFrame(pdu))
    assert decode_response(mbap, unit, function, 1) == ExceptionResponse(code)
    assert decode_response(rtu, unit, function, 1) == ExceptionResponse(code)


def test_several_frames_in_one_segment_and_a_partial_tail() -> None:
    a = bytes.fromhex("0001 0000 0005 01 03 02 002a")
    b = bytes.fromhex("0002 0000 0003 01 83 02")
    c = bytes.fromhex("0003 0000 0005 01 03 02 0007")
    reader = MbapReader()
    first = reader.feed(a + b + c[:4])
    assert [r.transaction for r in first] == [1, 2]
    assert reader.pending == 4
    (last,) = reader.feed(c[4:])
    assert decode_response(last, 1, 3, 1) == [7]
    rtu = RtuReader()
    got = rtu.feed(rtu_frame(b"\x01\x03\x02\x00\x2a") + rtu_frame(b"\x01\x83\x02"))
    assert [decode_response(r, 1, 3, 1) for r in got] == [[42], ExceptionResponse(2)]


# ----------------------------------------------------------------- garbled framing


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (bytes.fromhex("00010001000501030200"), "protocol id 1"),
        (bytes.fromhex("000100000001"), "length field 1"),
        (bytes.fromhex("00010000ffff01"), "length field 65535"),
    ],
)
def test_garbled_mbap_header_is_a_frame_error(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        MbapReader().feed(frame + b"\x00" * 8)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (bytes.fromhex("0103020001ffff"), "CRC mismatch"),
        (bytes.fromhex("01100000000a"), "function code 16"),
        (bytes.fromhex("0103fc"), "announces 252 bytes"),
    ],
)
def test_garbled_rtu_is_a_frame_error(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        RtuReader().feed(frame)


@given(st.binary(min_size=1, max_size=300), st.lists(st.integers()))
def test_readers_never_fail_other_than_with_frame_error(data: bytes, cuts: list[int]) -> None:
    for reader in (MbapReader(), RtuReader()):
        try:
            for part in chunks(data, cuts):
                for response in reader.feed(part):
                    with contextlib.suppress(FrameError, MismatchError):
                        decode_response(response, 1, 3, 2)
        except FrameError:
            pass


@given(st.binary(min_size=2, max_size=40), st.integers(0, 40), st.integers(0, 7))
def test_flipping_any_bit_of_an_rtu_frame_is_caught(body: bytes, at: int, bit: int) -> None:
    frame = bytearray(rtu_frame(bytes((1, 3, len(body))) + body))
    # Every byte but function and byte count (which change the frame's length, so the CRC is
    # checked over other bytes): CRC-16 detects every single-bit error of a frame.
    positions = [0, *range(3, len(frame))]
    frame[positions[at % len(positions)]] ^= 1 << bit
    with pytest.raises(FrameError, match="CRC mismatch"):
        RtuReader().feed(bytes(frame))


# ------------------------------------------------------------ responses vs requests


def mbap(unit: int, function: int, data: bytes) -> Response:
    """A response as the MBAP reader yields it."""
    return Response(1, unit, function, data)


@pytest.mark.parametrize(
    ("response", "unit", "function", "count", "error", "message"),
    [
        (mbap(2, 3, b"\x02\x00\x01"), 1, 3, 1, MismatchError, "unit 2, asked unit 1"),
        (mbap(1, 4, b"\x02\x00\x01"), 1, 3, 1, MismatchError, "function 4, sent 3"),
        (mbap(1, 0x84, b"\x02"), 1, 3, 1, MismatchError, "function 4, sent 3"),
        (mbap(1, 3, b"\x04\x00\x01\x00\x02"), 1, 3, 1, MismatchError, "2 registers, asked 1"),
        (mbap(1, 1, b"\x02\xff\x01"), 1, 1, 8, MismatchError, "16 bits, asked 8"),
        (
            mbap(1, 3, b"\x04\x00\x01"),
            1,
            3,
            1,
            FrameError,
            "announces 4 bytes of values, carries 2",
        ),
        (mbap(1, 3, b""), 1, 3, 1, FrameError, "announces no bytes"),
        (mbap(1, 0x83, b"\x02\x00"), 1, 3, 1, FrameError, "exception response of 3 bytes"),
    ],
)
def test_responses_that_do_not_answer_the_request(
    response: Response,
    unit: int,
    function: int,
    count: int,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        decode_response(response, unit, function, count)


def test_unit_zero_accepts_any_answering_unit() -> None:
    assert decode_response(mbap(9, 3, b"\x02\x00\x05"), 0, 3, 1) == [5]


def test_bits_are_least_significant_first_and_padding_dropped() -> None:
    # 6.1's example: coils 20..38 -> CD 6B 05.
    got = decode_response(mbap(1, 1, b"\x03\xcd\x6b\x05"), 1, 1, 19)
    expected = [bool(0xCD >> i & 1) for i in range(8)] + [bool(0x6B >> i & 1) for i in range(8)]
    expected += [True, False, True]
    assert got == expected


def test_registers_are_big_endian() -> None:
    data = struct.pack(">B3H", 6, 1, 0x1234, 0xFFFF)
    assert decode_response(mbap(1, 4, data), 1, 4, 3) == [1, 0x1234, 0xFFFF]


def test_a_whole_frame_with_a_bad_header_is_refused_too() -> None:
    # Exactly one frame's worth of bytes (the reader's fast path) with protocol id 1.
    with pytest.raises(FrameError, match="protocol id 1"):
        MbapReader().feed(bytes.fromhex("0001 0001 0005 01 03 02 0001"))
