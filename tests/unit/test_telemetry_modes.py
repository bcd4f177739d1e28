"""Telemetry publish modes (gateway.core.telemetry): which values of a poll are due."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import Quality, Sample
from gateway.core.telemetry import (
    PublishRule,
    TelemetryConfig,
    TelemetryFilter,
    changed_enough,
    resolve,
)


def _s(signal: str, value: object, quality: Quality = Quality.GOOD) -> Sample:
    return Sample("m1", signal, value, 0.0, quality)  # type: ignore[arg-type]


def _run(f: TelemetryFilter, polls: list[tuple[float, object]], signal: str = "x") -> list[float]:
    """Poll times at which the signal was due."""
    return [t for t, v in polls if f.due([_s(signal, v)], t)]


def test_every_poll_publishes_every_value() -> None:
    f = TelemetryFilter(default=PublishRule("every_poll"))
    assert _run(f, [(0, 1), (1, 1), (2, 1)]) == [0, 1, 2]


def test_on_change_publishes_first_value_and_changes_only() -> None:
    f = TelemetryFilter()
    assert _run(f, [(0, 1), (1, 1), (2, 2), (3, 2), (4, "a"), (5, "a")]) == [0, 2, 4]


def test_on_change_sees_type_changes_and_quality_changes() -> None:
    f = TelemetryFilter()
    assert f.due([_s("x", 1)], 0)
    assert f.due([_s("x", 1.0)], 1)  # int to float is a change of what the device says
    assert f.due([_s("x", True)], 2)
    assert not f.due([_s("x", True)], 3)
    assert f.due([_s("x", True, Quality.UNCERTAIN)], 4)
    assert f.due([_s("x", None, Quality.BAD)], 5)
    assert not f.due([_s("x", None, Quality.BAD)], 6)


def test_absolute_deadband_compares_with_last_published_value() -> None:
    f = TelemetryFilter(default=PublishRule("deadband", deadband=1.0))
    # 10 -> 10.5 -> 11.0: the drift reaches the band against 10, not against 10.5.
    assert _run(f, [(0, 10.0), (1, 10.5), (2, 11.0), (3, 11.9), (4, 10.0)]) == [0, 2, 4]


def test_percent_deadband_is_relative_to_last_published_value() -> None:
    f = TelemetryFilter(default=PublishRule("deadband", deadband_percent=10.0))
    assert _run(f, [(0, 100.0), (1, 109.0), (2, 110.0), (3, 120.0), (4, 121.0)]) == [0, 2, 4]


def test_both_bands_must_be_reached() -> None:
    rule = PublishRule("deadband", deadband=5.0, deadband_percent=10.0)
    assert not changed_enough(rule, 100.0, 106.0)  # 6 > 5 but < 10 %
    assert not changed_enough(rule, 10.0, 14.0)  # 40 % but < 5
    assert changed_enough(rule, 100.0, 111.0)


def test_deadband_ignores_text_and_booleans() -> None:
    rule = PublishRule("deadband", deadband=5.0)
    assert changed_enough(rule, "a", "b")
    assert changed_enough(rule, False, True)
    assert not changed_enough(rule, "a", "a")


def test_min_interval_holds_back_and_then_sends_the_latest_value() -> None:
    f = TelemetryFilter(default=PublishRule("on_change", min_interval=5.0))
    polls = [(0, 1), (1, 2), (2, 3), (5, 3), (6, 3), (10, 4)]
    due = [(t, v) for t, v in polls if f.due([_s("x", v)], t)]
    assert due == [(0, 1), (5, 3), (10, 4)]


def test_min_interval_throttles_every_poll() -> None:
    f = TelemetryFilter(default=PublishRule("every_poll", min_interval=2.0))
    assert _run(f, [(float(t), 1) for t in range(6)]) == [0, 2, 4]


def test_max_interval_is_a_heartbeat_for_unchanged_values() -> None:
    f = TelemetryFilter(default=PublishRule("on_change", max_interval=3.0))
    assert _run(f, [(float(t), 1) for t in range(8)]) == [0, 3, 6]


def test_never_and_per_signal_rules() -> None:
    f = TelemetryFilter({"secret": PublishRule("never"), "all": PublishRule("every_poll")})
    batch = [_s("secret", 1), _s("all", 1), _s("x", 1)]
    assert [s.signal for s in f.due(batch, 0)] == ["all", "x"]
    assert [s.signal for s in f.due(batch, 1)] == ["all"]


def test_forget_makes_every_signal_due_again() -> None:
    f = TelemetryFilter()
    f.due([_s("x", 1)], 0)
    f.forget()
    assert f.due([_s("x", 1)], 1)


def test_resolve_later_layers_win_and_signal_deadband_is_the_fallback() -> None:
    gateway = TelemetryConfig(publish="every_poll", max_interval=60)
    profile = TelemetryConfig(publish="deadband", deadband_percent=2)
    signal = TelemetryConfig(min_interval=1)
    rule = resolve(gateway, profile, None, signal, deadband=0.5)
    assert rule == PublishRule("deadband", 0.5, 2.0, 1.0, 60.0)
    assert resolve(TelemetryConfig(deadband=3), deadband=0.5).deadband == 3


def test_problems_of_resolved_rules() -> None:
    assert PublishRule("deadband").problem() is not None
    assert PublishRule("deadband", deadband_percent=1).problem() is None
    assert PublishRule("on_change", min_interval=10, max_interval=5).problem() is not None
    with pytest.raises(ValueError, match="shorter than min_interval"):
        TelemetryConfig(min_interval=10, max_interval=5)


numbers = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(numbers, min_size=1, max_size=40),
    band=st.floats(min_value=0.0, max_value=100.0),
    heartbeat=st.sampled_from([0.0, 3.0]),
)
def test_deadband_properties(values: list[float], band: float, heartbeat: float) -> None:
    """Every published value is at least the band away from the one published before it
    (or a heartbeat), and no value is ever further than the band from the last published."""
    rule = PublishRule("deadband" if band else "on_change", deadband=band, max_interval=heartbeat)
    f = TelemetryFilter(default=rule)
    last: float | None = None
    last_t = 0.0
    for t, v in enumerate(values):
        due = f.due([_s("x", v)], float(t))
        if last is None:
            assert due
        elif due:
            assert (heartbeat and t - last_t >= heartbeat) or abs(v - last) >= band
            assert heartbeat or v != last
        else:
            assert abs(v - last) < band or v == last
        if due:
            last, last_t = v, float(t)


values_and_qualities = st.lists(
    st.tuples(
        st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, 1.0, 2.5])),
        st.sampled_from(list(Quality)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(polls=values_and_qualities)
def test_plain_on_change_agrees_with_the_general_rule(polls: list[tuple[object, Quality]]) -> None:
    """The fast path of on_change without options decides as the general path does."""
    plain = TelemetryFilter(default=PublishRule("on_change"))
    general = TelemetryFilter(default=PublishRule("on_change", max_interval=1e9))
    assert PublishRule("on_change").plain and not general.default.plain
    for t, (value, quality) in enumerate(polls):
        batch = [_s("x", value, quality)]
        assert plain.due(batch, float(t)) == general.due(batch, float(t))
