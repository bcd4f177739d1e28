"""The fault proxy's pure core: plans, the timeline, frame splitting, per-frame verdicts."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shopfloor_gateway.simulators.faultproxy import (
    Action,
    FaultState,
    PlanError,
    exception_reply,
    parse_command,
    parse_plan,
    split_frames,
    timeline,
)


def mbap(tid: int, pdu: bytes, unit: int = 1) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def opcua(kind: bytes, body: bytes) -> bytes:
    return kind + b"F" + struct.pack("<I", 8 + len(body)) + body


def test_modbus_frames_are_split_on_the_mbap_length() -> None:
    a, b = mbap(1, b"\x03\x00\x00\x00\x0a"), mbap(2, b"\x03\x14" + bytes(20))
    frames, rest = split_frames(a + b + b[:3], "modbus")
    assert frames == [a, b]
    assert rest == b[:3]


def test_opcua_frames_are_split_on_the_message_size() -> None:
    a, b = opcua(b"MSG", b"x" * 30), opcua(b"HEL", b"y" * 4)
    frames, rest = split_frames(a + b, "opcua")
    assert frames == [a, b]
    assert rest == b""


def test_a_stream_that_is_not_the_protocol_passes_through() -> None:
    junk = b"\x00\x01\x00\x00\xff\xff hello"
    assert split_frames(junk, "modbus") == ([junk], b"")
    assert split_frames(b"abc", "raw") == ([b"abc"], b"")


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=10), st.data())
def test_modbus_split_is_independent_of_how_tcp_cuts_the_stream(
    pdus: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(mbap(i, b"\x03" + p) for i, p in enumerate(pdus))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    got: list[bytes] = []
    buffer = b""
    for lo, hi in itertools.pairwise([0, *cuts, len(stream)]):
        frames, buffer = split_frames(buffer + stream[lo:hi], "modbus")
        got += frames
    assert buffer == b""
    assert got == [mbap(i, b"\x03" + p) for i, p in enumerate(pdus)]


def test_drop_then_delay_apply_to_the_next_frames_in_their_direction() -> None:
    state = FaultState()
    state.apply(Action(0, parse_command("drop 1 down")))
    state.apply(Action(0, parse_command("late 2.5")))
    assert not state.decide("up", 10.0).drop
    first, second, third = (state.decide("down", 10.0) for _ in range(3))
    assert first.drop
    assert not second.drop and second.deliver_at == pytest.approx(12.5)
    assert third.deliver_at == 10.0
    assert (state.dropped, state.delayed, state.forwarded) == (1, 1, 3)


def test_a_stall_drops_everything_until_it_ends_and_heal_clears_all() -> None:
    state = FaultState()
    stall = parse_command("stall 3")
    state.apply(Action(0, stall, True))
    assert state.decide("up", 1.0).drop and state.decide("down", 1.0).drop
    state.apply(Action(3, stall, False))
    assert not state.decide("up", 4.0).drop
    state.apply(Action(5, parse_command("latency 0.2 up")))
    state.apply(Action(5, parse_command("drop 5")))
    state.apply(Action(6, parse_command("heal")))
    verdict = state.decide("up", 7.0)
    assert not verdict.drop and verdict.deliver_at == 7.0


def test_cut_asks_for_the_connections_to_close() -> None:
    assert FaultState().apply(Action(0, parse_command("cut")))


def test_timeline_orders_starts_and_ends_and_repeats() -> None:
    plan = parse_plan(
        {
            "repeat_every": 10,
            "steps": [
                {"at": 2, "fault": "stall", "duration": 3},
                {"at": 5, "fault": "latency", "seconds": 0.1, "duration": 1},
                {"at": 1, "fault": "cut"},
            ],
        }
    )
    first = list(itertools.islice(timeline(plan), 10))
    assert [(a.at, a.step.fault, a.start) for a in first[:5]] == [
        (1, "cut", True),
        (2, "stall", True),
        (5, "stall", False),
        (5, "latency", True),
        (6, "latency", False),
    ]
    assert first[5].at == 11 and first[5].step.fault == "cut"


def test_a_one_shot_plan_ends() -> None:
    plan = parse_plan([{"at": 1, "fault": "stall"}])
    assert [a.at for a in timeline(plan)] == [1]
    assert list(timeline(parse_plan({"repeat_every": 5}))) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"fault": "latency"}], "latency needs seconds > 0"),
        ([{"fault": "cut", "duration": 3}], "acts once"),
        ([{"fault": "late", "seconds": 1, "direction": "up"}], "late delays answers"),
        ([{"fault": "explode"}], "steps.0.fault"),
        ({"repeat_every": 5, "steps": [{"at": 4, "fault": "stall", "duration": 2}]}, "ends at 6"),
        ([{"fault": "drop", "count": 0}], "count"),
    ],
)
def test_bad_plans_say_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan(data)


@pytest.mark.parametrize(
    ("text", "fault", "field", "value"),
    [
        ("stall 5", "stall", "duration", 5.0),
        ("latency 0.2 10 up", "latency", "direction", "up"),
        ("drop 3 down", "drop", "count", 3),
        ("late 2", "late", "direction", "down"),
        ("cut", "cut", "count", 1),
        ("exception", "exception", "code", 4),
        ("exception 6 2.5", "exception", "duration", 2.5),
    ],
)
def test_commands(text: str, fault: str, field: str, value: object) -> None:
    step = parse_command(text)
    assert step.fault == fault
    assert getattr(step, field) == value


@pytest.mark.parametrize("text", ["", "boom", "stall x", "drop 1 2 3", "cut 5"])
def test_bad_commands_are_refused(text: str) -> None:
    with pytest.raises(PlanError):
        parse_command(text)


def test_an_exception_reply_keeps_transaction_unit_and_function() -> None:
    request = mbap(0x1234, bytes([3, 0, 10, 0, 5]), unit=7)
    assert exception_reply(request, 4) == mbap(0x1234, bytes([0x83, 4]), unit=7)
    assert exception_reply(request[:7], 4) is None


def test_the_exception_fault_is_a_window_that_heal_ends() -> None:
    state = FaultState()
    step = parse_command("exception 6")
    state.apply(Action(0.0, step))
    assert state.excepting == 6
    state.apply(Action(1.0, step, start=False))
    assert state.excepting is None
    state.apply(Action(2.0, step))
    state.apply(Action(3.0, parse_command("heal")))
    assert state.excepting is None
