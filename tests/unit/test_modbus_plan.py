"""Read planning: hand-made layouts, the optimum by brute force, splitting, poll deadlines."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shopfloor_gateway.adapters.base import POLL_SLOT, first_deadline, next_deadline, poll_phase
from shopfloor_gateway.adapters.modbus.config import ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.plan import Point, ReadRequest, plan_reads, split


def u16(address: int, area: str = "holding") -> ModbusSignalConfig:
    """A one-register signal."""
    return ModbusSignalConfig(address=address, type="uint16", area=area)


def wide(address: int, length: int, area: str = "holding") -> ModbusSignalConfig:
    """A signal ``length`` registers wide (a string)."""
    return ModbusSignalConfig(address=address, type="string", length=length, area=area)


def test_adjacent_signals_make_one_request() -> None:
    signals = {
        "state": u16(0),
        "count": ModbusSignalConfig(address=1, type="uint32"),
        "order": wide(3, 4),
    }
    assert plan_reads(signals, max_registers=125, max_gap=0) == (
        ReadRequest(
            "holding",
            0,
            7,
            (Point("state", 0, 1), Point("count", 1, 2), Point("order", 3, 4)),
        ),
    )


def test_gap_is_bridged_up_to_max_gap() -> None:
    signals = {"a": u16(10), "b": u16(15)}  # four unmapped registers in between
    assert plan_reads(signals, max_registers=125, max_gap=4) == (
        ReadRequest("holding", 10, 6, (Point("a", 0, 1), Point("b", 5, 1))),
    )
    assert plan_reads(signals, max_registers=125, max_gap=3) == (
        ReadRequest("holding", 10, 1, (Point("a", 0, 1),)),
        ReadRequest("holding", 15, 1, (Point("b", 0, 1),)),
    )


def test_areas_are_never_mixed() -> None:
    signals = {"h": u16(0), "i": u16(1, area="input")}
    plan = plan_reads(signals, max_registers=125, max_gap=16)
    assert [(r.area, r.start, r.count) for r in plan] == [("holding", 0, 1), ("input", 1, 1)]


def test_max_registers_splits_without_cutting_a_signal() -> None:
    signals = {"a": u16(0), "b": ModbusSignalConfig(address=2, type="uint32")}
    plan = plan_reads(signals, max_registers=3, max_gap=16)
    assert [(r.start, r.count) for r in plan] == [(0, 1), (2, 2)]


def test_overlapping_and_nested_signals() -> None:
    # A status word read whole and as its low register; a string with a field inside.
    signals = {
        "word": ModbusSignalConfig(address=0, type="uint32"),
        "low": u16(1),
        "text": wide(10, 8),
        "inner": u16(12),
        "after": u16(20),
    }
    plan = plan_reads(signals, max_registers=8, max_gap=16)
    assert [(r.start, r.count, [p.signal for p in r.points]) for r in plan] == [
        (0, 2, ["word", "low"]),
        (10, 8, ["text", "inner"]),  # 10..17 fits in 8 registers, "after" (20) does not
        (20, 1, ["after"]),
    ]
    _check_plan(signals, plan, max_registers=8, max_gap=16)


def test_too_wide_signal_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"'serial' is 20 registers wide; one read takes at most 10"
    ):
        plan_reads({"serial": wide(0, 20)}, max_registers=10, max_gap=0)


def test_empty_signals_make_an_empty_plan() -> None:
    assert plan_reads({}, max_registers=125, max_gap=16) == ()


def test_split_gives_one_request_per_signal() -> None:
    block = ReadRequest("input", 100, 12, (Point("a", 0, 2), Point("b", 2, 1), Point("c", 8, 4)))
    assert split(block) == (
        ReadRequest("input", 100, 2, (Point("a", 0, 2),)),
        ReadRequest("input", 102, 1, (Point("b", 0, 1),)),
        ReadRequest("input", 108, 4, (Point("c", 0, 4),)),
    )


@pytest.mark.parametrize(
    ("previous", "now", "expected"),
    [
        (10.0, 10.2, (11.0, 0)),  # on time
        (10.0, 9.5, (11.0, 0)),  # clock earlier than the deadline: still the next slot
        (10.0, 11.0, (12.0, 1)),  # exactly one slot late: that slot is skipped
        (10.0, 13.5, (14.0, 3)),  # overran three slots: skip them, no burst
    ],
)
def test_next_deadline_skips_missed_ticks(
    previous: float, now: float, expected: tuple[float, int]
) -> None:
    assert next_deadline(previous, now, 1.0) == expected


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_next_deadline_refuses_bad_intervals(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        next_deadline(0.0, 0.0, interval)


@given(
    previous=st.floats(0, 1e6),
    late=st.floats(-10, 1e3),
    interval=st.floats(0.01, 100),
)
def test_next_deadline_properties(previous: float, late: float, interval: float) -> None:
    now = previous + late
    deadline, skipped = next_deadline(previous, now, interval)
    assert deadline >= now - 1e-6 * max(1.0, abs(now))
    assert deadline == pytest.approx(previous + (skipped + 1) * interval)
    assert skipped >= 0


# --- brute force ---------------------------------------------------------------------


def _partitions(items: list[str]) -> Iterator[list[list[str]]]:
    """Every set partition of ``items``."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in _partitions(rest):
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]
        yield [[first], *smaller]


def _group_ok(
    signals: Mapping[str, ModbusSignalConfig], group: list[str], max_registers: int, max_gap: int
) -> bool:
    """Could one request read exactly this group (definition straight from the rules)?"""
    areas = {signals[n].area for n in group}
    if len(areas) != 1:
        return False
    start = min(signals[n].address for n in group)
    end = max(signals[n].address + signals[n].register_count for n in group)
    if end - start > max_registers:
        return False
    area = areas.pop()
    mapped = {
        r
        for s in signals.values()
        if s.area == area
        for r in range(s.address, s.address + s.register_count)
    }
    run = 0
    for register in range(start, end):
        run = 0 if register in mapped else run + 1
        if run > max_gap:
            return False
    return True


def _optimum(signals: Mapping[str, ModbusSignalConfig], max_registers: int, max_gap: int) -> int:
    return min(
        len(p)
        for p in _partitions(sorted(signals))
        if all(_group_ok(signals, g, max_registers, max_gap) for g in p)
    )


def _check_plan(
    signals: Mapping[str, ModbusSignalConfig],
    plan: tuple[ReadRequest, ...],
    *,
    max_registers: int,
    max_gap: int,
) -> None:
    """Every rule of a plan, checked on the output."""
    seen = [p.signal for r in plan for p in r.points]
    assert sorted(seen) == sorted(signals)  # every signal exactly once
    for request in plan:
        assert 1 <= request.count <= max_registers
        names = [p.signal for p in request.points]
        assert _group_ok(signals, names, max_registers, max_gap)
        for point in request.points:
            s = signals[point.signal]
            assert s.area == request.area
            assert request.start + point.offset == s.address
            assert point.width == s.register_count
            assert point.offset + point.width <= request.count
        # Starts and ends on a mapped register of its own points: nothing wasted at the edges.
        assert min(p.offset for p in request.points) == 0
        assert max(p.offset + p.width for p in request.points) == request.count


@st.composite
def layouts(draw: st.DrawFn) -> tuple[dict[str, ModbusSignalConfig], int, int]:
    n = draw(st.integers(1, 6))
    signals: dict[str, ModbusSignalConfig] = {}
    for i in range(n):
        address = draw(st.integers(0, 40))
        area = draw(st.sampled_from(["holding", "holding", "input"]))
        kind = draw(st.sampled_from(["uint16", "uint32", "string"]))
        length = draw(st.integers(1, 6)) if kind == "string" else None
        signals[f"s{i}"] = ModbusSignalConfig(
            address=address,
            area=area,
            type=kind,
            length=length,
        )
    widest = max(s.register_count for s in signals.values())
    max_registers = draw(st.integers(widest, 20))
    max_gap = draw(st.integers(0, 8))
    return signals, max_registers, max_gap


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_plan_is_valid_and_minimal(layout: tuple[dict[str, ModbusSignalConfig], int, int]) -> None:
    signals, max_registers, max_gap = layout
    plan = plan_reads(signals, max_registers=max_registers, max_gap=max_gap)
    _check_plan(signals, plan, max_registers=max_registers, max_gap=max_gap)
    assert len(plan) == _optimum(signals, max_registers, max_gap)


@settings(deadline=None)
@given(layouts())
def test_split_covers_the_same_signals(
    layout: tuple[dict[str, ModbusSignalConfig], int, int],
) -> None:
    signals, max_registers, max_gap = layout
    for request in plan_reads(signals, max_registers=max_registers, max_gap=max_gap):
        parts = split(request)
        assert len(parts) == len(request.points)
        _check_plan(
            {p.signal: signals[p.signal] for p in request.points},
            parts,
            max_registers=max_registers,
            max_gap=0,
        )


@pytest.mark.parametrize(
    ("now", "interval", "phase", "expected"),
    [
        (10.0, 1.0, 0.25, 10.25),
        (10.25, 1.0, 0.25, 10.25),
        (10.26, 1.0, 0.25, 11.25),
        (0.0, 0.1, 0.04, 0.04),
    ],
)
def test_first_deadline_is_the_next_point_of_the_phase_grid(
    now: float, interval: float, phase: float, expected: float
) -> None:
    assert first_deadline(now, interval, phase) == pytest.approx(expected)


def test_poll_phases_are_slots_within_one_interval_and_stable() -> None:
    phases = {poll_phase(f"m{i:03d}", 1.0) for i in range(500)}
    assert all(0 <= p < 1.0 for p in phases)
    # Slot starts only, so devices share wake-ups; and spread over all the slots.
    assert all(abs(p / POLL_SLOT - round(p / POLL_SLOT)) < 1e-9 for p in phases)
    assert len(phases) == round(1.0 / POLL_SLOT)
    assert poll_phase("m001", 1.0) == poll_phase("m001", 1.0)
    assert {poll_phase(f"m{i}", 2 * POLL_SLOT) for i in range(100)} == {0.0, POLL_SLOT}
    # An interval of one slot or shorter: everyone at phase 0.
    assert {poll_phase(f"m{i}", POLL_SLOT) for i in range(100)} == {0.0}
    assert poll_phase("m001", 0.005) == 0.0
