"""Signal mapping: enum maps, scale/offset and the checks on canonical signals."""

from __future__ import annotations

import math

import pytest

from gateway.core.mapping import Mapper, map_value
from gateway.core.model import Quality, Sample
from gateway.core.signals import SignalConfig
from gateway.core.tracker import MachineTracker, TrackerSettings

STATE = SignalConfig(map={0: "idle", 1: "running", 3: "fault"})


@pytest.mark.parametrize(
    ("signal", "raw", "cfg", "expected"),
    [
        ("state", 1, STATE, "running"),
        ("state", "3", STATE, "fault"),  # device gives text, YAML key is an int
        ("state", 9, SignalConfig(map={0: "idle"}, map_default="fault"), "fault"),
        ("good_count", 12, SignalConfig(), 12),
        ("good_count", 12.0, SignalConfig(), 12),
        ("spindle_temp", 215, SignalConfig(scale=0.1, offset=-1.0), pytest.approx(20.5)),
        ("order_id", "  PO-1 ", SignalConfig(), "PO-1"),
        ("order_id", 4711, SignalConfig(), "4711"),
        ("alarm_code", 7.0, SignalConfig(), 7),
        ("door_open", True, SignalConfig(scale=2.0), True),  # bools are not scaled
    ],
)
def test_map_value(signal: str, raw: object, cfg: SignalConfig, expected: object) -> None:
    value, reason = map_value(signal, raw, cfg)  # type: ignore[arg-type]
    assert reason is None
    assert value == expected


@pytest.mark.parametrize(
    ("signal", "raw", "cfg", "needle"),
    [
        ("state", 9, STATE, "not in the map"),
        ("state", "dancing", SignalConfig(), "unknown machine state"),
        ("good_count", -1, SignalConfig(), "must not be negative"),
        ("good_count", 1.5, SignalConfig(), "whole number"),
        ("good_count", "ten", SignalConfig(), "must be a number"),
        ("stitch_rate", math.nan, SignalConfig(), "finite"),
        ("order_id", "a\x00b", SignalConfig(), "printable"),
    ],
)
def test_bad_values_are_rejected_with_a_reason(
    signal: str, raw: object, cfg: SignalConfig, needle: str
) -> None:
    value, reason = map_value(signal, raw, cfg)  # type: ignore[arg-type]
    assert value is None
    assert reason is not None and needle in reason


def test_mapper_marks_only_the_bad_sample_bad() -> None:
    mapper = Mapper({"state": STATE, "good_count": SignalConfig()})
    batch = [
        Sample("m", "state", 42, 1.0),
        Sample("m", "good_count", 5, 1.0),
        Sample("m", "stitch_rate", 1200.0, 1.0),  # unmapped telemetry passes through
        Sample("m", "good_count", None, 1.0, Quality.BAD),
    ]
    out, problems = mapper.apply(batch)
    assert [s.quality for s in out] == [Quality.BAD, Quality.GOOD, Quality.GOOD, Quality.BAD]
    assert out[1].value == 5
    assert [p.signal for p in problems] == ["state"]


@pytest.mark.parametrize("raw", [" Running ", "RUNNING", "running\n", "Idle"])
def test_state_text_is_taken_as_the_tracker_takes_it(raw: str) -> None:
    """Blanks and case around a state name do not make a bad sample (the tracker's rule)."""
    value, reason = map_value("state", raw, SignalConfig())
    assert reason is None
    assert value == raw.strip().lower()


_SAMPLES: list[tuple[str, object]] = [
    (signal, value)
    for signal in (
        "state",
        "good_count",
        "target_count",
        "order_id",
        "alarm_text",
        "alarm_code",
        "operator",
        "counter_reset",
        "order_ended",
    )
    for value in (
        " Running ",
        "fault",
        "offline",
        "dancing",
        0,
        1,
        2,
        -3,
        7.0,
        2.5,
        True,
        "PO-1\x00\x00",
        "A\x07B",
        "x" * 65,
        "x" * 129,
        "x" * 257,
        20_000_000,
        2**60,
    )
]


@pytest.mark.parametrize(("signal", "raw"), _SAMPLES)
def test_mapper_and_tracker_accept_the_same_values(signal: str, raw: object) -> None:
    """A value the mapper passes as good is one the tracker takes, and the other way round.

    (``program`` is not here: the tracker does not read it.)
    """
    _, reason = map_value(signal, raw, SignalConfig())  # type: ignore[arg-type]
    tr = MachineTracker("m", TrackerSettings())
    tr.connection(True, 1.0)
    tr.observe([Sample("m", signal, raw, 1.0)], 1.0)  # type: ignore[arg-type]
    rejected = tr.drain_rejections()
    assert (reason is None) == (not rejected), (reason, rejected)
