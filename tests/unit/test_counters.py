"""Table-driven tests for the pure counter arithmetic."""

from __future__ import annotations

import pytest

from gateway.core.counters import CounterRule, CounterState, advance, counter_delta, parse_count


@pytest.mark.parametrize(
    ("previous", "current", "wrap", "delta", "why"),
    [
        (10, 10, None, 0, "duplicate read"),
        (10, 13, None, 3, "normal increase"),
        (10, 510, None, 500, "jump after an offline gap: pieces made meanwhile"),
        (10, 0, None, 0, "reset to zero"),
        (10, 4, None, 4, "reset, then 4 pieces before the next read"),
        (65530, 5, 65536, 11, "16-bit wrap: 6 to the wrap, 5 after it"),
        (65535, 0, 65536, 1, "16-bit wrap exactly at the modulus"),
        (2**32 - 1, 9, 2**32, 10, "32-bit wrap"),
        (30000, 10, 65536, 10, "drop by less than half the modulus is a reset"),
        (32768, 0, 65536, 0, "drop by exactly half the modulus is a reset"),
        (32769, 0, 65536, 65536 - 32769, "drop by more than half the modulus is a wrap"),
        (10, 4, 65536, 4, "small drop with wrap set: reset"),
        (0, 65535, 65536, 65535, "increases are increases, also near the modulus"),
    ],
)
def test_counter_delta(previous: int, current: int, wrap: int | None, delta: int, why: str) -> None:
    assert counter_delta(previous, current, wrap) == delta, why


ONE = CounterRule(confirm=1)
HELD = CounterState(7, 1.0, (), False, ((9, 2.0),))


@pytest.mark.parametrize(
    ("state", "value", "time", "rule", "expected"),
    [
        (CounterState(), 7, 1.0, ONE, (CounterState(7, 1.0), 0, True)),
        (CounterState(7, 1.0), 9, 2.0, ONE, (CounterState(9, 2.0), 2, True)),
        (CounterState(7, 1.0), 9, 1.0, ONE, (CounterState(9, 1.0), 2, True)),
        (CounterState(7, 2.0), 3, 1.0, ONE, (CounterState(7, 2.0), 0, False)),
        (CounterState(7, 2.0), 9, 1.5, ONE, (CounterState(7, 2.0), 0, False)),
        (CounterState(0, None), 5, 1.0, ONE, (CounterState(5, 1.0), 5, True)),
        # Two readings must agree on an increase: it is held, then credited up to the lower.
        (CounterState(7, 1.0), 9, 2.0, None, (HELD, 0, True)),
        (HELD, 12, 3.0, None, (CounterState(9, 2.0, (), False, ((12, 3.0),)), 2, True)),
        (HELD, 8, 3.0, None, (CounterState(8, 3.0, (), False, ((8, 3.0),)), 1, True)),
        (HELD, 9, 2.0, None, (HELD, 0, True)),
        (HELD, 10, 1.5, None, (HELD, 0, False)),
    ],
    ids=[
        "first-is-baseline",
        "increase",
        "same-time",
        "late-drop",
        "late-rise",
        "zeroed",
        "held",
        "agreed",
        "spike-returns",
        "held-again",
        "older-than-held",
    ],
)
def test_advance(
    state: CounterState,
    value: int,
    time: float,
    rule: CounterRule | None,
    expected: tuple[CounterState, int, bool],
) -> None:
    step = advance(state, value, time) if rule is None else advance(state, value, time, rule)
    assert tuple(step)[:3] == expected


def test_advance_with_wrap() -> None:
    # 636 pieces in 99 s: within the default rate (10 per second), credited once agreed.
    rule = CounterRule(wrap=65536)
    held = advance(CounterState(65000, 1.0), 100, 100.0, rule)
    assert held.delta == 0
    assert advance(held.state, 101, 101.0, rule).delta == 636


@pytest.mark.parametrize(
    ("value", "wrap", "expected"),
    [(0, None, 0), (12, None, 12), (12.0, None, 12), (65535, 65536, 65535)],
)
def test_parse_count_accepts(value: object, wrap: int | None, expected: int) -> None:
    assert parse_count(value, wrap) == expected


@pytest.mark.parametrize(
    ("value", "wrap", "message"),
    [
        (True, None, "bool"),
        (1.5, None, "whole number"),
        (float("nan"), None, "whole number"),
        (float("inf"), None, "whole number"),
        ("12", None, "integer"),
        (None, None, "integer"),
        (-1, None, "negative"),
        (2**60, None, "implausibly large"),
        (65536, 65536, "wrap modulus"),
    ],
)
def test_parse_count_rejects(value: object, wrap: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_count(value, wrap)
