"""Reconnect delays: bounds, jitter and alignment to whole seconds."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.core.backoff import ALIGN_ABOVE, Backoff, aligned
from gateway.runtime.gateway import DEVICE_BACKOFF


@given(attempt=st.integers(0, 10_000), seed=st.integers(0, 2**32))
def test_full_jitter_stays_within_floor_and_ceiling(attempt: int, seed: int) -> None:
    b = Backoff(base=0.5, cap=30.0, floor=0.05)
    d = b.delay(attempt, random.Random(seed))
    assert b.floor <= d <= max(b.floor, b.ceiling(attempt))


@given(attempt=st.integers(0, 10_000), seed=st.integers(0, 2**32))
def test_equal_jitter_never_waits_less_than_half_the_ceiling(attempt: int, seed: int) -> None:
    d = DEVICE_BACKOFF.delay(attempt, random.Random(seed))
    ceiling = DEVICE_BACKOFF.ceiling(attempt)
    assert max(DEVICE_BACKOFF.floor, ceiling / 2) <= d <= ceiling


def test_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(base=0.5, cap=30.0)
    assert [b.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.ceiling(10**9) == 30.0


def test_a_long_outage_of_a_whole_floor_costs_fewer_attempts_with_equal_jitter() -> None:
    rng = random.Random(1)
    full = Backoff(base=0.5, cap=30.0)
    mean_full = sum(full.delay(50, rng) for _ in range(20_000)) / 20_000
    mean_equal = sum(DEVICE_BACKOFF.delay(50, rng) for _ in range(20_000)) / 20_000
    assert mean_full == pytest.approx(15.0, rel=0.03)
    assert mean_equal == pytest.approx(22.5, rel=0.03)


@pytest.mark.parametrize(
    "settings",
    [
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"base": 0.0},
        {"base": 2.0, "cap": 1.0},
        {"floor": -1.0},
    ],
)
def test_nonsense_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        Backoff(**settings)


@given(now=st.floats(0, 1e7), delay=st.floats(ALIGN_ABOVE, 60))
@example(now=2.220446049250313e-16, delay=2.0)  # the rounding once made the wait shorter
def test_long_waits_end_on_a_whole_second_and_are_stretched_by_less_than_one(
    now: float, delay: float
) -> None:
    wait = aligned(now, delay)
    assert delay <= wait < delay + 1.0 + 1e-6
    end = now + wait
    assert abs(end - round(end)) < 1e-6


@given(now=st.floats(0, 1e7), delay=st.floats(0, ALIGN_ABOVE, exclude_max=True))
def test_short_waits_after_a_cut_are_not_stretched(now: float, delay: float) -> None:
    assert aligned(now, delay) == delay


def test_retries_drawn_at_different_moments_share_a_wake_up() -> None:
    rng = random.Random(3)
    ends = set()
    for i in range(200):
        now = 1000.0 + i * 0.013  # 200 devices failing over 2.6 s
        ends.add(round(now + aligned(now, DEVICE_BACKOFF.delay(40, rng)), 6))
    # Waits of 15..30 s spread the retries over at most ~18 distinct seconds.
    assert len(ends) <= 19
