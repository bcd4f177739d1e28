"""Glitch-proof counters: drops, spikes and torn reads never create or lose pieces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import Sample
from gateway.core.tracker import MachineTracker, TrackerSettings

M = "box-01"
T0 = 1_700_000_000.0


def run(readings: list[Any], *, order: str = "PO-1", **settings: Any) -> MachineTracker:
    """Feed one good_count reading per second (the order id shown throughout)."""
    tr = MachineTracker(M, TrackerSettings(**settings))
    for i, value in enumerate(readings):
        t = T0 + i
        samples = [Sample(M, "order_id", order, t), Sample(M, "state", "running", t)]
        if isinstance(value, dict):
            samples += [Sample(M, k, v, t) for k, v in value.items()]
        else:
            samples.append(Sample(M, "good_count", value, t))
        tr.observe(samples, t)
    return tr


def good(tr: MachineTracker) -> int:
    order = tr.snapshot()["order"]
    assert order is not None
    return int(order["good"]) + int(order["overrun"])


def test_a_drop_by_a_few_counts_is_a_glitch_not_a_reset() -> None:
    # The first reading of a per-order counter belongs to the order (gateway started late).
    tr = run([100, 101, 99, 102, 103])
    # An increase is credited once two readings agree on it: 102 so far.
    assert good(tr) == 102
    tr = run([100, 101, 99, 102, 103, 103])
    assert good(tr) == 103
    assert tr.rejected_readings["good_count"] == 1


def test_a_rejected_spike_never_moves_the_baseline() -> None:
    tr = run([100, 105, 5_000_000, 104, 106, 106], counter_mode="lifetime")
    # lifetime: the first reading (100) is the baseline; 105 then 106 are real.
    assert good(tr) == 6
    assert tr.rejected_readings["good_count"] == 2  # the spike and the drop below 105


def test_a_spike_just_under_the_old_jump_limit_is_not_credited() -> None:
    tr = run([200, 203, 999_999, 204, 205, 205], order="PO-9")
    order = tr.snapshot()["order"]
    assert order["status"] == "running" and good(tr) == 205


def test_a_spike_does_not_complete_an_order() -> None:
    steps: list[Any] = [{"target_count": 100_000, "good_count": 200}, 203, 999_999, 204, 204]
    tr = run(steps)
    order = tr.snapshot()["order"]
    assert order["status"] == "running" and order["good"] == 204


def test_a_reset_is_accepted_once_confirmed() -> None:
    tr = run([30, 40, 40, 3], counter_mode="lifetime")
    assert good(tr) == 10  # not confirmed yet: the old baseline stands
    tr = run([30, 40, 40, 3, 5], counter_mode="lifetime")
    assert good(tr) == 13  # the reset, and 3 on the counter since; 5 is held until agreed
    tr = run([30, 40, 40, 3, 5, 5], counter_mode="lifetime")
    assert good(tr) == 15
    assert tr.rejected_readings["good_count"] == 0


def test_confirmation_count_is_configurable() -> None:
    tr = run([30, 40, 40, 40, 3, 5], counter_mode="lifetime", counter_confirm=3)
    assert good(tr) == 10
    tr = run([30, 40, 40, 40, 3, 5, 6, 6, 6], counter_mode="lifetime", counter_confirm=3)
    assert good(tr) == 16
    # counter_confirm = 1 trusts every reading at once.
    tr = run([30, 40, 3], counter_mode="lifetime", counter_confirm=1)
    assert good(tr) == 13


def test_a_torn_read_is_rejected() -> None:
    # 65535 -> 65536 read as high word of the new value and low word of the old one.
    tr = run([65_534, 65_535, 131_071, 65_536, 65_537, 65_537], counter_mode="lifetime")
    assert good(tr) == 3
    tr = run([65_534, 65_535, 0, 65_536, 65_537, 65_537], counter_mode="lifetime")
    assert good(tr) == 3


def test_a_small_drop_with_a_reset_bit_is_a_reset() -> None:
    tr = run([0, 5, {"good_count": 1, "counter_reset": True}, 2, 2], counter_mode="lifetime")
    assert good(tr) == 7
    tr = run([0, 5, 5, 1, 2], counter_mode="lifetime")  # no reset bit: a glitch
    assert good(tr) == 5


def test_a_drop_after_a_changeover_is_a_reset() -> None:
    tr = run([0, 5, {"good_count": 1, "state": "setup"}], counter_mode="lifetime")
    assert good(tr) == 6


def test_pieces_made_while_offline_are_still_counted() -> None:
    tr = MachineTracker(M, TrackerSettings())
    tr.observe([Sample(M, "order_id", "A", T0), Sample(M, "good_count", 10, T0)], T0)
    tr.connection(False, T0 + 1)
    tr.observe([Sample(M, "good_count", 1_210, T0 + 301)], T0 + 301)
    tr.observe([Sample(M, "good_count", 1_210, T0 + 302)], T0 + 302)
    assert good(tr) == 1_210


@pytest.mark.parametrize(
    "bad",
    [
        {"counter_confirm": 0},
        {"counter_glitch": -1},
        {"max_rate_per_hour": 0},
        {"poll_interval": 0},
    ],
)
def test_glitch_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrackerSettings(**bad)


# ---------------------------------------------------------------- property: glitches never count

glitch_steps = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.integers(0, 3), st.integers(0, 1)),
        st.tuples(st.just("run"), st.integers(0, 3), st.integers(0, 1)),
        st.tuples(st.just("idle"), st.integers(1, 400)),
        st.tuples(st.just("drop"), st.integers(1, 10)),
        st.tuples(st.just("spike"), st.integers(1, 30)),
        st.tuples(st.just("spike"), st.integers(100, 10**7)),
        st.tuples(st.just("torn"), st.booleans(), st.integers(1, 9)),
        st.tuples(st.just("reboot"), st.booleans(), st.integers(0, 5)),
        st.tuples(
            st.just("order"),
        ),
    ),
    min_size=1,
    max_size=60,
)


@dataclass
class GlitchyDevice:
    """A counter box: the truth per order, and readings of it with glitches injected."""

    mode: str
    wrap: int | None
    good: int
    scrap: int
    order: int = 0
    truth: dict[str, list[int]] = field(default_factory=lambda: {"o0": [0, 0]})

    def make(self, good: int, scrap: int) -> None:
        modulus = self.wrap or 2**53
        self.good = (self.good + good) % modulus
        self.scrap = (self.scrap + scrap) % modulus
        self.truth[f"o{self.order}"][0] += good
        self.truth[f"o{self.order}"][1] += scrap


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(["per_order", "lifetime"]),
    wrap=st.sampled_from([None, 16, 32]),
    near=st.integers(0, 40),
    confirm=st.integers(2, 3),  # 1 trusts every single reading: no filter to test
    steps=glitch_steps,
)
def test_glitches_never_change_the_per_order_counts(
    mode: str, wrap: int | None, near: int, confirm: int, steps: list[tuple[Any, ...]]
) -> None:
    """Drops, spikes, torn reads and reboots: once steady again, the counts are the truth."""
    modulus = 2**wrap if wrap else None
    # Lifetime counters start just below a 16-bit boundary, where torn reads hurt.
    start = 0 if mode == "per_order" else 3 * 65536 - near
    if modulus is not None:
        start %= modulus
    dev = GlitchyDevice(mode, modulus, start, start)
    tr = MachineTracker(
        M, TrackerSettings(counter_mode=mode, counter_wrap=modulus, counter_confirm=confirm)
    )
    now = T0
    seen: dict[str, dict[str, Any]] = {}

    def read(good: int | None = None, scrap: int | None = None, **more: Any) -> None:
        nonlocal now
        now += 1
        values = {
            "order_id": f"o{dev.order}",
            "good_count": dev.good if good is None else good,
            "scrap_count": dev.scrap if scrap is None else scrap,
            **more,
        }
        for e in tr.observe([Sample(M, k, v, now) for k, v in values.items()], now):
            if e.type == "order.completed":
                # An order's final counts: the readings held at its end are credited then.
                seen[e.data["order_id"]] = {**e.data, "overrun": 0}
        order = tr.snapshot()["order"]
        if order is not None:
            seen[order["order_id"]] = order

    def bad(value: int) -> int:
        return value % modulus if modulus is not None else value

    read()
    for step in steps:
        kind = step[0]
        if kind == "run":
            dev.make(step[1], step[2])
            read()
        elif kind == "idle":
            now += step[1]  # a pause: nothing made, then a read
            read()
        elif kind == "drop":
            read(good=max(0, dev.good - step[1]))
            read()
        elif kind == "spike":
            jump = step[1]
            if modulus is not None:
                # A spike that lands a few counts ahead once wrapped is a plausible reading.
                jump = jump if jump <= 30 else 100 + jump % (modulus - 200)
            read(good=bad(dev.good + jump), scrap=bad(dev.scrap + jump))
            read()
        elif kind == "torn" and wrap != 16:
            old = dev.good
            dev.make(step[2], 0)
            new = dev.good
            # A 32-bit value read as two registers in two requests, the counter moving between.
            torn = (new & ~0xFFFF) | (old & 0xFFFF) if step[1] else (old & ~0xFFFF) | (new & 0xFFFF)
            read(good=torn)
            read()
        elif kind == "reboot":
            tr.connection(False, now, "timeout")
            now += 30
            made = step[2]
            # A reset from above half the modulus looks like a wrap (docs/tracker.md).
            wraps_alike = modulus is not None and max(dev.good, dev.scrap) > modulus // 2
            if (step[1] or mode == "per_order") and not wraps_alike:
                # Counters not retentive. Only a reboot that shows as a drop can be seen:
                # as many pieces after it as before look like no change at all.
                made = min(made, max(0, dev.good - 1))
                dev.good = dev.scrap = 0
            dev.make(made, 0)
            tr.connection(True, now, "reconnected")
            read()
        elif kind == "order":
            dev.order += 1
            dev.truth[f"o{dev.order}"] = [0, 0]
            if mode == "per_order":
                dev.good = dev.scrap = 0
            read()
    for _ in range(confirm):  # steady again
        read()
    for order_id, (good_truth, scrap_truth) in dev.truth.items():
        order = seen[order_id]
        assert (order["good"] + order["overrun"], order["scrap"]) == (good_truth, scrap_truth), (
            order_id,
            order,
        )


def test_a_reset_before_the_new_order_id_counts_no_piece_twice() -> None:
    tr = MachineTracker(M, TrackerSettings())
    steps: list[dict[str, Any]] = [
        {"order_id": "A", "good_count": 0},
        {"good_count": 15},
        {"good_count": 15},  # (a count read once, then lower again, is taken as a spike)
        {"good_count": 0},  # the operator resets the counter for the next job ...
        {"good_count": 0},
        {"good_count": 1},  # ... a piece is made, still under A's id ...
        {"order_id": "B", "good_count": 1},  # ... then the new job's id is scanned
        {"good_count": 3},
        {"good_count": 3},
    ]
    done: dict[str, int] = {}
    for i, values in enumerate(steps):
        t = T0 + 2 * i
        for e in tr.observe([Sample(M, k, v, t) for k, v in values.items()], t):
            if e.type == "order.completed":
                done[e.data["order_id"]] = e.data["good"]
    # The piece made after the reset went to A (its id was shown); B has only its own.
    assert done == {"A": 16}
    assert good(tr) == 2


def test_readings_rejected_by_this_tracker_are_counted_apart_from_restored_ones() -> None:
    tr = run([100, 101, 99, 102, 103])
    assert tr.rejected_total == 1
    again = MachineTracker.restore(M, TrackerSettings(), tr.export_state(), downtime=False)
    # The per-signal count survives a restart; the process's own count starts at 0, so the
    # metric (a Prometheus counter) does not jump by everything rejected before.
    assert again.rejected_readings["good_count"] == 1 and again.rejected_total == 0


@pytest.mark.parametrize(
    ("readings", "truth"),
    [
        ([100, 105, 120, 106, 107, 108], 108),  # +15 and back: 228 reported before
        ([100, 101, 112, 102, 103, 104], 104),  # +11 and back: 112 until passed
        ([100, 101, 103, 102, 103, 104], 104),  # +1 and back: a glitch, not a reset
    ],
)
def test_a_small_spike_and_its_return_count_no_piece(readings: list[int], truth: int) -> None:
    # The spike is never credited, not even for one reading ...
    for end in range(1, len(readings) + 1):
        assert good(run(readings[:end])) <= truth
    # ... and the count is the truth once two readings agree on it.
    assert good(run([*readings, readings[-1]])) == truth
