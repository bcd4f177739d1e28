"""TelemetryLine: the history's per-poll line, built directly, equals the general path's."""

from __future__ import annotations

import enum
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import Location, Quality, Sample
from gateway.delivery.influx.sink import STATE_CODES, TelemetryLine, telemetry_point, to_line

LOC = Location("plant-a", "hall 1", "line,2", "sew=01")
OTHER = Location("plant-a", "hall 2", "line-3", "sew-01")
PERSONAL = frozenset({"operator"})


class Mode(enum.IntEnum):
    AUTO = 2


class Colour(enum.StrEnum):
    RED = "red"
    RUNNING = "running"  # a state value as an enum member still gets its state_code


def general(
    loc: Location, samples: list[Sample], order_id: str | None, order_tag: bool = False
) -> str | None:
    """What the gateway wrote before: a point from the kept samples, then its line."""
    kept = [s for s in samples if s.signal not in PERSONAL]
    point = telemetry_point(loc, kept, order_id, order_tag=order_tag)
    return to_line(point) if point is not None else None


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from([*STATE_CODES, "nonsense"]),
    st.sampled_from([Mode.AUTO, Colour.RED, Colour.RUNNING]),
)
names = st.sampled_from(
    [
        "state",
        "state_code",
        "order_id",
        "operator",
        "t 1",
        "a,b",
        "x=y",
        'q"',
        "back\\slash",
        "good_count",
        "z",
    ]
)
samples = st.lists(
    st.tuples(names, values, st.floats(0, 2e9), st.sampled_from(list(Quality))),
    max_size=8,
    unique_by=lambda t: t[0],
)


@settings(max_examples=400, deadline=None)
@given(
    polls=st.lists(
        st.tuples(samples, st.sampled_from([None, "", "PO 1", "PO,2"]), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    order_tag=st.booleans(),
)
def test_same_line_as_the_general_path(
    polls: list[tuple[list[tuple[str, object, float, Quality]], str | None, bool]],
    order_tag: bool,
) -> None:
    # One builder over several polls: its remembered layout must follow what changes.
    builder = TelemetryLine(PERSONAL, order_tag=order_tag)
    for rows, order_id, other_place in polls:
        loc = OTHER if other_place else LOC
        batch = [Sample("m", n, v, t, q) for n, v, t, q in rows]  # type: ignore[arg-type]
        expected = general(loc, batch, order_id, order_tag)
        assert builder.line(loc, batch, order_id) == expected


def test_a_steady_machine_reuses_its_layout() -> None:
    builder = TelemetryLine(PERSONAL)
    batch = [
        Sample("m", "state", "running", 10.0),
        Sample("m", "operator", "badge-7", 10.0),
        Sample("m", "stitch_rate", 812, 10.2),
        Sample("m", "temp", math.nan, 11.0),
        Sample("m", "note", 'say "hi"\n', 9.0, Quality.UNCERTAIN),
        Sample("m", "spindle", None, 12.0, Quality.BAD),
    ]
    first = builder.line(LOC, batch, "PO-1")
    # The order is a field: one series per machine and signal, whatever the orders.
    assert first == (
        "shopfloor_telemetry,area=hall\\ 1,line=line\\,2,machine=sew\\=01,"
        'site=plant-a note="say \\"hi\\" ",order_id="PO-1",state="running",'
        f"state_code={float(STATE_CODES['running'])!r},stitch_rate=812.0 11000"
    )
    layout = builder._layout
    # The next poll, same signals: the layout is not worked out again.
    again = [s._replace(source_time=s.source_time + 1) for s in batch]
    assert builder.line(LOC, again, "PO-1") == general(LOC, again, "PO-1")
    assert builder._layout is layout
    # Personal data never reaches the line.
    assert "badge" not in (first or "")
    # Nothing writable: no line at all.
    assert builder.line(LOC, [Sample("m", "spindle", None, 1.0, Quality.BAD)], None) is None
    # A source time at infinity is not a line (it is not a crash of the poll either).
    assert builder.line(LOC, [Sample("m", "spindle", 1, math.inf)], None) is None


def test_the_order_as_a_tag_when_configured() -> None:
    batch = [Sample("m", "stitch_rate", 812, 10.0)]
    tagged = TelemetryLine(PERSONAL, order_tag=True).line(LOC, batch, "PO-1")
    assert tagged == (
        "shopfloor_telemetry,area=hall\\ 1,line=line\\,2,machine=sew\\=01,order=PO-1,"
        "site=plant-a stitch_rate=812.0 10000"
    )
    # Two orders, one series key by default.
    builder = TelemetryLine(PERSONAL)
    heads = {
        (builder.line(LOC, batch, order) or "").partition(" order_id")[0].partition(" stitch")[0]
        for order in ("PO-1", "PO-2", None)
    }
    assert heads == {
        "shopfloor_telemetry,area=hall\\ 1,line=line\\,2,machine=sew\\=01,site=plant-a"
    }
    # The order alone is no line.
    bad = [Sample("m", "spindle", None, 1.0, Quality.BAD)]
    assert builder.line(LOC, bad, "PO-1") is None
