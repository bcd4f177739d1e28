"""Typed outbox records: encoding per destination, memoised, redaction on the typed payload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.contract.envelope import encode_event, read_event
from gateway.contract.wire import mark_delayed
from gateway.core.model import Event, Location
from gateway.core.routing import Route, pseudonym
from gateway.delivery.outbox import Entry, Outbox, OutboxQueue, _read_row, record_columns
from gateway.delivery.records import Record, WireEncodings, wire_payload

LOC = Location("plant", "hall", "line-1", "press-1")
SECRET = b"s3cret"


def record(n: int = 1, **data: Any) -> Record:
    body = {"order_id": "PO-1", "started_at": 1_800_000_000.5, **data}
    return Record("m1", "order.started", LOC, n, 1_800_000_001.25, body, f"id-{n}", "gw", 7, "PO-1")


def test_the_wire_payload_is_the_cloudevent_of_the_event() -> None:
    r = record(operator="anna")
    plain = encode_event(r.event(), LOC, gateway_id="gw", event_id="id-1", epoch=7)
    assert wire_payload(r) == plain
    # Delayed is the last attribute, as the old byte splice put it.
    assert wire_payload(r, delayed=True) == mark_delayed(plain)


def test_redaction_acts_on_the_typed_payload_at_any_depth() -> None:
    r = record(operator="anna", shifts=[{"operator": "bo"}], operators=["anna", "bo"])
    dropped = json.loads(wire_payload(r, "drop"))["data"]
    assert "operator" not in dropped and "operators" not in dropped
    assert dropped["shifts"] == [{}]
    pseudo = json.loads(wire_payload(r, "pseudonymise", SECRET))["data"]
    assert pseudo["operator"] == pseudonym(SECRET, "anna")
    assert pseudo["shifts"] == [{"operator": pseudonym(SECRET, "bo")}]
    # Without a secret there is no pseudonym: dropped.
    assert "operator" not in json.loads(wire_payload(r, "pseudonymise", None))["data"]
    # Times are converted after redaction, as before.
    assert pseudo["started_at"] == "2027-01-15T08:00:00.500Z"


def test_encodings_are_shared_by_destinations_that_encode_alike() -> None:
    memo = WireEncodings(size=4)
    clean, named = record(1), record(2, operator="anna")
    a = memo.encode(1, clean, "pass", None)
    # No operator in it: every policy sends the same bytes, encoded once.
    assert memo.encode(1, clean, "drop", None) is a
    assert memo.encode(1, clean, "pseudonymise", SECRET) is a
    assert memo.encode(1, clean, "pass", None) is a
    assert (memo.encoded, memo.hits) == (1, 3)
    p = memo.encode(2, named, "pseudonymise", SECRET)
    assert memo.encode(2, named, "pseudonymise", SECRET) is p
    assert memo.encode(2, named, "drop", None) != p
    assert memo.encode(2, named, "pseudonymise", b"other") != p
    assert len(memo) <= 4


def test_read_event_gives_back_the_typed_event() -> None:
    data = {"order_id": "PO-1", "due": 1_800_000_100.0, "eta": "soon", "x": {"done_at": 5.25}}
    ev = Event("m1", "order.started", 1_800_000_000.125, 3, data)
    payload = encode_event(ev, LOC, gateway_id="gw", event_id="id-9", epoch=4)
    got = read_event(payload, "m1")
    assert got.event == ev and got.location == LOC
    assert (got.gateway_id, got.event_id, got.epoch) == ("gw", "id-9", 4)
    with pytest.raises(ValueError, match="source"):
        read_event(payload.replace(b"/shopfloor/plant/", b"/elsewhere/"), "m1")


DESTS = ("a", "b", "influxdb")


def entry(n: int, **data: Any) -> Entry:
    r = record(n, **data)
    return Entry("m1", f"t/{n}", b"", frozenset(DESTS), r.type, "PO-1", created=1.0, record=r)


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[Outbox]:
    ob = Outbox(path, DESTS, commit_window=0.0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        yield ob
    finally:
        await ob.flush()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


async def take(q: OutboxQueue, n: int) -> list[Any]:
    ready = asyncio.Event()
    q.waker = ready.set
    got: list[Any] = []
    async with asyncio.timeout(5):
        while len(got) < n:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            got.append(item[1])
            q.ack(item[0])
    return got


async def test_a_backlog_read_by_two_destinations_is_encoded_once(tmp_path: Path) -> None:
    path = tmp_path / "ob.db"
    async with running(path) as ob:
        ob.append([entry(n) for n in range(1, 6)])
    async with running(path) as ob:
        qa = ob.queue(Route("a", operator="pass"))
        qb = ob.queue(Route("b", operator="drop"))
        qa.start()
        qb.start()
        got_a = await take(qa, 5)
        got_b = await take(qb, 5)
        assert [m.payload for m in got_a] == [m.payload for m in got_b]
        assert all(x.payload is y.payload for x, y in zip(got_a, got_b, strict=True))
        assert (ob.encodings.encoded, ob.encodings.hits) == (5, 5)
        # From a previous run: delayed, and otherwise the record's own encoding.
        assert [m.payload for m in got_a] == [
            wire_payload(record(n), delayed=True) for n in range(1, 6)
        ]


async def test_the_history_queue_hands_out_records_with_the_operator_policy(
    tmp_path: Path,
) -> None:
    async with running(tmp_path / "ob.db") as ob:
        q = ob.record_queue(Route("influxdb"))  # the default policy: drop
        q.start()
        ob.append([entry(1, operator="anna"), entry(2)])
        got = await take(q, 2)
    assert all(isinstance(r, Record) for r in got)
    assert "operator" not in got[0].data and got[0].data["started_at"] == 1_800_000_000.5
    assert got[1] == record(2)


async def test_a_stored_record_that_cannot_be_encoded_is_released_not_sent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ob.db"
    async with running(path) as ob:
        ob.append([entry(n) for n in range(1, 4)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        # Valid JSON, but a time no RFC 3339 string can carry: damage, not a real event.
        db.execute(
            """UPDATE messages SET data = '{"started_at": 1e300}', data_wire = NULL"""
            " WHERE seq = 2"
        )
        db.commit()
    with capture_logs() as logs:
        async with running(path) as ob:
            q = ob.queue(Route("a"))
            q.start()
            got = await take(q, 2)
            await ob.flush()
            assert ob.backlog("a") == 0
    assert [json.loads(m.payload)["sequence"] for m in got] == [1, 3]
    assert [e["seq"] for e in logs if e["event"] == "outbox.record_unencodable"] == [2]


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**53), 2**53),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "due", "x_at", 'é"k']), inner, max_size=3),
    ),
    max_leaves=8,
)
payloads = st.dictionaries(
    st.one_of(st.sampled_from(["order_id", "eta", "started_at", "since", "s_since"]), st.text()),
    st.one_of(json_values, st.floats(0, 4e9)),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(data=payloads)
def test_a_stored_record_encodes_as_the_event_did(data: dict[str, Any]) -> None:
    ev = Event("m1", "order.progress", 1_800_000_000.5, 3, data)
    try:
        expected = encode_event(ev, LOC, gateway_id="gw", event_id="id", epoch=2)
    except ValueError:
        return  # the emit path refuses it: never stored
    r = Record("m1", ev.type, LOC, 3, ev.time, data, "id", "gw", 2)
    raw = (1, "t", b"", 1, 1.0, 1, "m1", None, *record_columns(r))
    stored = _read_row(raw).record
    assert stored is not None
    assert wire_payload(stored) == expected
    assert stored.data == json.loads(r.data_json())


def test_a_time_too_large_for_milliseconds_is_refused_as_a_value_error() -> None:
    # Found by the property above: 1.8e305 s is finite, but not in milliseconds.
    with pytest.raises(ValueError, match="out of range"):
        wire_payload(record(eta=1.797693134862316e305))
