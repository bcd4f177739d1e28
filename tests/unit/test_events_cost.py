"""The cheaper per-event paths give the same results as the general ones they shortcut."""

from __future__ import annotations

import contextlib
import enum
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.contract.envelope import (
    _convert,
    _convert_explained,
    _dumps,
    convert_times,
    encode_state,
)
from gateway.core.model import Location
from gateway.delivery.outbox import Entry, Outbox
from tests.unit import test_outbox

KEYS = st.sampled_from(["state", "started_at", "state_since", "eta", "due", "good", "order", "x"])
NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=4_000_000_000),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=5))
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(KEYS, inner, max_size=4),
        st.tuples(inner, inner),
    ),
    max_leaves=12,
)


class Level(enum.IntEnum):
    """An int subclass: the fast walk must treat it as the general walk does."""

    HIGH = 7


@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_the_fast_walk_converts_like_the_explained_walk(value: dict[str, Any]) -> None:
    assert _convert(value) == _convert_explained(value, "")


def test_subclasses_and_read_only_mappings_take_the_general_branches() -> None:
    value = MappingProxyType(
        {
            "eta": Level.HIGH,
            "flag_at": True,
            "inner": MappingProxyType({"due": 1.5}),
            "n": Level.HIGH,
        }
    )
    assert _convert(value) == _convert_explained(value, "")
    assert convert_times(value)["eta"] == "1970-01-01T00:00:07.000Z"
    assert convert_times(value)["flag_at"] is True


def test_the_shared_encoder_writes_what_json_dumps_writes() -> None:
    doc = {"a": "é", "b": [1, 2.5, None, True], "c": {"d": "\u2028"}}
    expected = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert _dumps(doc, "doc") == expected.encode("utf-8")


def test_state_fixed_keys_still_win_over_snapshot_keys() -> None:
    loc = Location("s", "a", "l", "m1")
    body = json.loads(
        encode_state({"time": 1.0, "schema": "x", "state": "idle"}, loc, gateway_id="g", now=2.0)
    )
    assert body["time"] == "1970-01-01T00:00:02.000Z"
    assert body["schema"] == "urn:shopfloor:schema:v1:state"
    assert body["state"] == "idle"


def entry(n: int, event_type: str) -> Entry:
    return Entry("m1", f"t/{n}", b"{}", frozenset({"a"}), event_type=event_type)


async def synchronous(ob: Outbox) -> int:
    def read() -> int:
        assert ob._db is not None
        mode: int = ob._db.execute("PRAGMA synchronous").fetchone()[0]
        return mode

    return await ob._writer.call(read)


async def test_each_commit_runs_in_the_durability_mode_it_needs(tmp_path: Path) -> None:
    # The mode is set only when it changes: every switch must still happen.
    full, normal = 2, 1
    async with running(tmp_path / "o.db") as ob:
        ob.append([entry(1, "order.started")])
        await ob.flush()
        assert await synchronous(ob) == full
        ob.append([entry(2, "order.progress")])
        await ob.flush()
        assert await synchronous(ob) == full
        ob.ack("a", [1])  # acknowledgements only
        await ob.flush()
        assert await synchronous(ob) == normal
        ob.ack("a", [2])
        await ob.flush()
        assert await synchronous(ob) == normal
        ob.append([entry(3, "order.progress")])
        await ob.flush()
        assert await synchronous(ob) == full
        ob.append([], {"m1": {"version": 1}})  # a tracker state alone is fsynced too
        ob.ack("a", [3])
        await ob.flush()
        assert await synchronous(ob) == full
        assert (ob.stats.commits, ob.stats.fsyncs) == (6, 4)


def running(path: Path) -> contextlib.AbstractAsyncContextManager[Outbox]:
    """An open outbox for destination ``a`` that commits acknowledgements at once."""
    return test_outbox.running(path, ["a"], commit_window=0)
