"""Fuzz: the reference consumer (``FloorView.apply``) with arbitrary topics and payloads."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.cli.watch import FloorView
from tests.fuzz import fuzz

TYPES = [
    "machine.state.changed",
    "machine.connection.changed",
    "machine.alarm.raised",
    "machine.alarm.cleared",
    "order.started",
    "order.progress",
    "order.completed",
    "order.at_risk",
    "order.back_on_track",
    "bogus",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """CloudEvents-shaped documents with random holes and wrong types."""
    doc: dict[str, Any] = {
        "specversion": draw(st.sampled_from(["1.0", "0.3", 1])),
        "id": draw(st.text(max_size=40) | st.integers()),
        "type": draw(st.sampled_from(TYPES).map(lambda t: "io.shopfloor." + t) | json_values),
        "time": draw(st.sampled_from(["2026-11-22T10:00:00Z", "bad", ""]) | json_values),
        "sequence": draw(st.integers(-3, 2**64) | json_values),
        "data": draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "order_id": json_values,
                    "good": json_values,
                    "scrap": json_values,
                    "target": json_values,
                    "percent": json_values,
                    "state": st.sampled_from(["running", "idle", "x"]) | json_values,
                    "connected": json_values,
                    "eta": json_values,
                    "order": json_values,
                },
            )
            | json_values
        ),
    }
    for key in list(doc):
        if draw(st.integers(0, 5)) == 0:
            del doc[key]
    return doc


topics = st.one_of(
    st.sampled_from(TYPES).map(lambda t: f"sf/s/a/l/m/event/{t}"),
    st.just("sf/s/a/l/m/state"),
    st.just("sf/s/gateway/gw/status"),
    st.text(max_size=60),
)
payloads = st.one_of(
    st.binary(max_size=200),
    envelopes().map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
)


@fuzz(80)
@given(st.lists(st.tuples(topics, payloads, st.booleans()), max_size=8))
def test_apply_never_raises_and_never_hits_an_internal_error(
    messages: list[tuple[str, bytes, bool]],
) -> None:
    view = FloorView("sf")
    with capture_logs() as logs:
        for topic, payload, retained in messages:
            view.apply(topic, payload, retained)
        view.render(width=100, now=1_800_000_000.0)
    assert view.stats.messages == len(messages)
    internal = [p for p in view.problems if "internal error" in p]
    assert not internal, internal
    assert not [e for e in logs if e.get("log_level") == "error"]
