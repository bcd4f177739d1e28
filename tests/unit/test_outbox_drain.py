"""Outbox under a drain: acknowledgements in runs, the overflow index, rows as read back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.core.routing import Route
from gateway.delivery.outbox import Entry, Row, seq_runs
from tests.unit.test_outbox import drain, running


def event(
    n: int,
    *,
    machine: str = "m1",
    type_: str = "order.progress",
    dests: Sequence[str] = ("a", "b"),
    order_id: str | None = "PO-1",
) -> Entry:
    body = {"id": f"id-{n}", "type": type_, "n": n}
    return Entry(
        machine=machine,
        topic=f"t/{machine}/event/{type_}",
        payload=json.dumps(body, separators=(",", ":")).encode(),
        destinations=frozenset(dests),
        event_type=type_,
        order_id=order_id,
        created=1000.0,
    )


@pytest.mark.parametrize(
    ("seqs", "runs"),
    [
        ([], []),
        ([7], [(7, 7)]),
        ([1, 2, 3], [(1, 3)]),
        ([3, 1, 2, 2, 7, 9, 8, 11], [(1, 3), (7, 9), (11, 11)]),
        ([5, 5, 5], [(5, 5)]),
        ([10, 1], [(1, 1), (10, 10)]),
    ],
)
def test_seq_runs(seqs: list[int], runs: list[tuple[int, int]]) -> None:
    assert seq_runs(seqs) == runs


async def test_acknowledgements_release_each_destinations_rows(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    async with running(db) as ob:
        ob.append([event(n) for n in range(1, 11)])  # seq 1..10: a and b
        ob.append([event(11, dests=["a"]), event(12, dests=["a"]), event(13, dests=["b"])])
        await ob.flush()
        # Out of order, a gap, a repeat, and rows of the other destination in between.
        ob.ack("a", [12, 3, 1, 2, 2, 6, 5, 11, 13])
        await ob.flush()
        assert (ob.backlog("a"), ob.backlog("b"), ob.stats.stored) == (5, 11, 11)
        ob.ack("b", [*range(1, 11), 13])
        await ob.flush()
        assert (ob.backlog("a"), ob.backlog("b"), ob.stats.stored) == (5, 0, 5)
    async with running(db) as ob:
        assert (ob.backlog("a"), ob.backlog("b"), ob.stats.stored) == (5, 0, 5)
        rows, _ = await ob.fetch("a", 0, 100)
        assert [r.seq for r in rows] == [4, 7, 8, 9, 10]
        assert {r.pending for r in rows} == {1 << ob.bits["a"]}


async def test_both_destinations_acknowledging_in_one_commit_delete_the_row(
    tmp_path: Path,
) -> None:
    async with running(tmp_path / "ob.db", commit_window=1.0, commit_rows=1000) as ob:
        ob.append([event(n) for n in range(1, 5)])
        await ob.flush()
        ob.ack("a", [1, 2, 3])
        ob.ack("b", [2, 3, 4])
        await ob.flush()
        assert (ob.backlog("a"), ob.backlog("b"), ob.stats.stored) == (1, 1, 2)
        assert ob.stats.acked == 6


async def test_rows_read_back_are_named_tuples(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db", ["a"]) as ob:
        ob.append([event(1, dests=["a"])])
        await ob.flush()
        (row,), upto = await ob.fetch("a", 0, 10)
        assert upto == 1
        assert isinstance(row, Row)
        # An opaque row (no typed record): its payload as stored.
        assert row == (1, "t/m1/event/order.progress", row.payload, 1, 1000.0, 1, None)
        assert json.loads(row.payload)["n"] == 1


async def test_a_file_with_the_old_overflow_indexes_loses_them(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    async with running(db) as ob:
        ob.append([event(1)])
        bits = (1 << ob.bits["a"]) | (1 << ob.bits["b"])
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("CREATE INDEX messages_drop ON messages (cls, machine, order_id, seq)")
        con.execute("CREATE INDEX messages_telemetry ON messages (seq) WHERE cls = 0")
        # A row of the former telemetry class (no version wrote one, the schema allowed it).
        con.execute(
            "INSERT INTO messages (seq, pending, cls, machine, topic, payload, qos, created)"
            " VALUES (2, ?, 0, 'm1', 't/m1/telemetry', ?, 0, 1000.0)",
            (bits, b'{"n":2}'),
        )
        con.commit()
    async with running(db, max_events=1) as ob:
        assert ob.backlog("a") == 2
        q = ob.queue(Route("a"))
        q.start()
        # Still sent, as stored; the overflow policy does not take it.
        got = await drain(q, 2)
        assert [(m.topic, json.loads(m.payload)["n"]) for m in got] == [
            ("t/m1/event/order.progress", 1),
            ("t/m1/telemetry", 2),
        ]
        assert ob.stats.dropped_progress == 0
    with contextlib.closing(sqlite3.connect(db)) as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not names & {"messages_drop", "messages_telemetry"}, names


async def test_superseded_progress_groups_by_machine_and_order_including_none(
    tmp_path: Path,
) -> None:
    async with running(tmp_path / "ob.db", ["a"], max_events=6) as ob:
        entries = [
            event(1, machine="m1", order_id=None, dests=["a"]),
            event(2, machine="m2", order_id=None, dests=["a"]),
            event(3, machine="m1", order_id=None, dests=["a"]),
            event(4, machine="m1", order_id="PO-1", dests=["a"]),
            event(5, machine="m2", order_id=None, dests=["a"]),
            event(6, machine="m1", order_id="PO-1", dests=["a"]),
            event(7, machine="m1", order_id="PO-2", dests=["a"]),
            event(8, machine="m1", order_id=None, dests=["a"]),
        ]
        ob.append(entries)
        await ob.flush()
        q = ob.queue(Route("a"))
        q.start()
        got = [json.loads(m.payload)["n"] for m in await drain(q, 6)]
        # Oldest superseded first: 1 (m1/None, newer 3 and 8) and 2 (m2/None, newer 5).
        assert got == [3, 4, 5, 6, 7, 8]
        assert ob.stats.dropped_progress == 2


async def test_batch_drain_of_a_backlog_is_complete_and_in_order(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    async with running(db, ["a"]) as ob:
        for start in range(0, 3000, 100):
            ob.append(
                [event(n, machine=f"m{n % 7}", dests=["a"]) for n in range(start, start + 100)]
            )
        await ob.flush()
    async with running(db, ["a"]) as ob:
        q = ob.queue(Route("a", batch=True), batch_topic="t/batch", batch_max=100)
        q.start()
        seen: list[int] = []
        ready = asyncio.Event()
        q.waker = ready.set
        async with asyncio.timeout(10):
            while len(seen) < 3000:
                if (item := q.take()) is None:
                    ready.clear()
                    await ready.wait()
                    continue
                key, msg = item
                doc = json.loads(msg.payload)
                # One row alone goes to its own topic; more go as a batch of at most 100.
                if msg.topic == "t/batch":
                    assert 2 <= len(doc) <= 100, len(doc)
                    docs = doc
                else:
                    assert isinstance(doc, dict), doc
                    docs = [doc]
                seen += [d["n"] for d in docs]
                q.ack(key)
        await ob.flush()
        assert ob.backlog("a") == 0
        assert ob.stats.stored == 0
    assert seen == list(range(3000))


async def test_a_batch_acknowledgement_counts_once_towards_commit_rows(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db", ["a"], commit_window=1.0, commit_rows=2) as ob:
        ob.append([event(n, dests=["a"]) for n in range(1, 302)])
        await ob.flush()
        ob.ack("a", range(1, 301))  # one PUBACK for a batch of 300 rows
        # Alone it waits for company (the window is a second), however many rows it holds.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await ob.flush()
        ob.ack("a", [301])  # the second acknowledgement: commit at once
        async with asyncio.timeout(0.5):
            await ob.flush()
        assert (ob.backlog("a"), ob.stats.stored) == (0, 0)


async def test_a_batch_destination_keeps_fifty_batches_ready(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db", ["a"]) as ob:
        for start in range(1, 8001, 1000):
            ob.append([event(n, dests=["a"]) for n in range(start, start + 1000)])
        await ob.flush()
        single = ob.queue(Route("a"))
        batched = ob.queue(Route("a", batch=True), batch_topic="t/batch", batch_max=20)
        wide = ob.queue(Route("a", batch=True), batch_topic="t/batch", batch_max=100)
        for q in (single, batched, wide):
            fetched = asyncio.Event()
            q.waker = fetched.set  # called after every chunk read
            q.start()
            async with asyncio.timeout(5):
                while q._fetching:  # white box: how far the queue reads ahead
                    fetched.clear()
                    await fetched.wait()
        assert len(single._rows) == 1000
        assert len(batched._rows) == 1000  # 50 batches of 20 fit in one chunk
        assert len(wide._rows) == 5000


async def test_each_acknowledged_row_reports_its_delivery_time(tmp_path: Path) -> None:
    now = [1000.0]
    async with running(tmp_path / "ob.db", ["a"]) as ob:
        ob.append([event(n, dests=["a"]) for n in range(1, 4)])  # created at 1000.0
        await ob.flush()
        single = ob.queue(Route("a"), clock=lambda: now[0])
        seen: list[float] = []
        single.on_delivered = seen.append
        single.start()
        now[0] = 1000.004
        await drain(single, 3)
        assert seen == pytest.approx([0.004] * 3)
    async with running(tmp_path / "ob2.db", ["a"]) as ob:
        ob.append([event(n, dests=["a"]) for n in range(1, 6)])
        await ob.flush()
        batched = ob.queue(
            Route("a", batch=True), batch_topic="t/batch", batch_max=100, clock=lambda: now[0]
        )
        seen.clear()
        batched.on_delivered = seen.append
        batched.start()
        now[0] = 1002.5
        # One PUBACK for the batch: every row in it was delivered then.
        await drain(batched, 1)
        assert seen == pytest.approx([2.5] * 5)
