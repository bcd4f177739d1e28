"""A counter box without a state signal gets a derived one: running while it counts."""

from __future__ import annotations

from gateway.core.derive import StateFromCounts
from gateway.core.model import Quality, Sample


def counts(good: int, at: float, quality: Quality = Quality.GOOD) -> list[Sample]:
    return [Sample("box", "good_count", good, at, quality)]


def test_idle_until_the_counter_moves_then_running_then_idle_again() -> None:
    d = StateFromCounts("box", idle_after=10.0)
    assert d.observe(counts(5, 0.0), 0.0).value == "idle"  # baseline only
    assert d.observe(counts(5, 1.0), 1.0).value == "idle"
    assert d.observe(counts(6, 2.0), 2.0).value == "running"
    assert d.observe(counts(6, 11.0), 11.0).value == "running"
    assert d.observe(counts(6, 12.5), 12.5).value == "idle"
    assert d.observe(counts(0, 13.0), 13.0).value == "running"  # a reset is activity too


def test_bad_readings_do_not_count_as_activity() -> None:
    d = StateFromCounts("box", idle_after=10.0)
    d.observe(counts(5, 0.0), 0.0)
    sample = d.observe([Sample("box", "good_count", None, 1.0, Quality.BAD)], 1.0)
    assert sample.value == "idle" and sample.signal == "state" and sample.machine == "box"
