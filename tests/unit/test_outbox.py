"""Durable outbox on a real SQLite file: commit, read back, acknowledge, restart, overflow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from structlog.testing import capture_logs

from gateway.core.model import Location
from gateway.core.routing import Route
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.outbox import Entry, Outbox, OutboxQueue
from gateway.delivery.records import Record

DESTS = ("a", "b")


def event(
    n: int,
    *,
    machine: str = "m1",
    type_: str = "order.started",
    dests: Sequence[str] = DESTS,
    order_id: str | None = "PO-1",
    created: float = 1000.0,
    extra: str = "",
) -> Entry:
    body: dict[str, object] = {"n": n}
    if extra:
        body["operator"] = extra
    loc = Location("s", "a", "l", machine)
    record = Record(machine, type_, loc, n, 1000.0 + n, body, f"id-{n}", "gw", 1, order_id)
    return Entry(
        machine=machine,
        topic=f"t/{machine}/event/{type_}",
        payload=b"",
        destinations=frozenset(dests),
        event_type=type_,
        order_id=order_id,
        created=created,
        record=record,
    )


@contextlib.asynccontextmanager
async def running(path: Path, dests: Sequence[str] = DESTS, **kw: object) -> AsyncIterator[Outbox]:
    ob = Outbox(path, dests, **kw)  # type: ignore[arg-type]
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


async def drain(q: OutboxQueue, expect: int, *, ack: bool = True) -> list[Message]:
    """Take (and ack) messages until ``expect`` came out; waits for fetches."""
    got: list[Message] = []
    ready = asyncio.Event()
    q.waker = ready.set
    async with asyncio.timeout(5):
        while len(got) < expect:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            key, msg = item
            got.append(msg)
            if ack:
                q.ack(key)
    return got


def ns(msgs: Sequence[Message]) -> list[int]:
    docs = [json.loads(m.payload) for m in msgs]
    return [doc.get("data", doc)["n"] for doc in docs]


async def test_rows_and_tracker_state_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    async with running(db) as ob:
        seqs = ob.append([event(i) for i in range(1, 6)], {"m1": {"sequence": 5}})
        assert seqs == [1, 2, 3, 4, 5]
        await ob.flush()
        qa = ob.queue(Route("a"), clock=lambda: 1000.0)
        qa.start()
        await drain(qa, 3)  # a acknowledges three, b nothing
        await ob.flush()
        assert ob.backlog("a") == 2
        assert ob.backlog("b") == 5
    async with running(db) as ob:
        assert ob.trackers == {"m1": {"sequence": 5}}
        assert ob.append([event(6)]) == [6]  # sequence continues
        qa = ob.queue(Route("a"), clock=lambda: 1000.0)
        qb = ob.queue(Route("b"), clock=lambda: 1000.0)
        qa.start()
        qb.start()
        assert ns(await drain(qa, 3)) == [4, 5, 6]
        assert ns(await drain(qb, 6)) == [1, 2, 3, 4, 5, 6]
        await ob.flush()
        assert ob.stats.stored == 0


async def test_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "ob.db"
    async with running(db) as ob:
        ob.append([event(1)])
        await ob.flush()
        for f in tmp_path.joinpath("sub").iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_routing_mask_only_stores_for_named_destinations(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db") as ob:
        ob.append([event(1, dests=["a"]), event(2, dests=["b"]), event(3, dests=[])])
        await ob.flush()
        assert (ob.backlog("a"), ob.backlog("b"), ob.stats.stored) == (1, 1, 2)
        qa, qb = ob.queue(Route("a")), ob.queue(Route("b"))
        qa.start()
        qb.start()
        assert ns(await drain(qa, 1)) == [1]
        assert ns(await drain(qb, 1)) == [2]


async def test_requeue_resends_in_flight_in_order(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db") as ob:
        q = ob.queue(Route("a"))
        q.start()
        ob.append([event(i) for i in range(1, 5)])
        first = await drain(q, 2, ack=False)
        assert ns(first) == [1, 2]
        q.requeue()
        assert ns(await drain(q, 4)) == [1, 2, 3, 4]
        assert q.in_flight == 0


async def test_state_messages_follow_the_events_committed_before_them(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db") as ob:
        q = ob.queue(Route("a"))
        q.start()
        ob.append([event(1)])
        q.push(Message("t/m1/state", b'{"v":1}', 1, True))
        ob.append([event(2)])
        q.push(Message("t/m1/state", b'{"v":2}', 1, True))  # replaces v1, moves after 2
        got = await drain(q, 3)
        assert [m.topic for m in got] == ["t/m1/event/order.started"] * 2 + ["t/m1/state"]
        assert got[-1].payload == b'{"v":2}'


async def test_delayed_flag_for_old_and_previous_run_rows(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    now = [1000.0]
    async with running(db) as ob:
        q = ob.queue(Route("a"), clock=lambda: now[0], delayed_after=5)
        q.start()
        ob.append([event(1, created=1000.0)])
        live = await drain(q, 1)
        assert b"delayed" not in live[0].payload
        now[0] = 1010.0
        ob.append([event(2, created=1000.0)])
        late = await drain(q, 1)
        assert json.loads(late[0].payload)["delayed"] is True
        ob.append([event(3, created=1010.0)], None)
    async with running(db) as ob:
        q = ob.queue(Route("a"), clock=lambda: 1010.0)
        q.start()
        (replayed,) = await drain(q, 1)
        doc = json.loads(replayed.payload)
        assert doc["delayed"] is True and doc["id"] == "id-3"


async def test_batch_mode_and_redaction(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db") as ob:
        ob.append([event(i, extra="anna") for i in range(1, 6)])
        await ob.flush()
        q = ob.queue(
            Route("a", batch=True, operator="pseudonymise"), batch_topic="t/batch", secret=b"k"
        )
        qb = ob.queue(Route("b"))
        q.start()
        qb.start()
        (msg,) = await drain(q, 1)
        assert msg.topic == "t/batch"
        docs = json.loads(msg.payload)
        assert [d["data"]["n"] for d in docs] == [1, 2, 3, 4, 5]
        assert {d["data"]["operator"] for d in docs} == {docs[0]["data"]["operator"]} != {"anna"}
        plain = await drain(qb, 5)
        assert all("operator" not in json.loads(m.payload)["data"] for m in plain)  # default: drop
        await ob.flush()
        assert ob.backlog("a") == 0


async def test_overflow_drops_the_oldest_superseded_progress(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running(tmp_path / "ob.db", max_events=10) as ob:
            entries = [event(1, type_="order.started")]
            entries += [event(200 + i, type_="order.progress") for i in range(12)]
            entries += [event(300, type_="order.completed")]
            ob.append(entries)
            await ob.flush()
            assert (ob.stats.stored, ob.stats.dropped_progress) == (10, 4)
            q = ob.queue(Route("a"))
            q.start()
            assert ns(await drain(q, 10)) == [1, *range(204, 212), 300]
            await ob.flush()
            assert ob.backlog("a") == 0
    overflow = [e for e in logs if e["event"] == "outbox.overflow"]
    assert len(overflow) == 1 and overflow[0]["dropped_progress"] == 4, overflow

    async with running(tmp_path / "ob2.db", max_events=5) as ob:
        entries = [event(1, type_="order.started")]
        entries += [event(200 + i, type_="order.progress") for i in range(8)]
        entries += [event(210, type_="order.progress", order_id="PO-2")]
        entries += [event(300, type_="order.completed")]
        ob.append(entries)
        await ob.flush()
        q = ob.queue(Route("a"))
        q.start()
        # The newest progress of each order stays; lifecycle events always stay.
        assert ns(await drain(q, ob.backlog("a"))) == [1, 206, 207, 210, 300]
        assert ob.stats.dropped_progress == 6


async def test_lifecycle_events_exceed_the_bound_rather_than_go(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running(tmp_path / "ob.db", max_events=5) as ob:
            ob.append([event(i, type_="order.completed") for i in range(20)])
            await ob.flush()
            assert ob.stats.stored == 20
    assert any(e["event"] == "outbox.over_bound" for e in logs)


async def test_full_disk_drops_by_policy_and_keeps_lifecycle(tmp_path: Path) -> None:
    # About a page a row (a record holds its data twice: typed and as the wire writes it).
    big = "x" * 1500
    async with running(tmp_path / "ob.db", max_page_count=60, retry_delay=0.01) as ob:
        progress = [event(i, type_="order.progress", extra=big) for i in range(40)]
        ob.append(progress)
        await ob.flush()
        kept = [event(1000 + i, type_="order.completed", extra=big) for i in range(20)]
        ob.append(kept)
        await ob.flush()
        assert ob.stats.dropped_progress > 0
        q = ob.queue(Route("a"), max_memory=10)
        q.start()
        got = ns(await drain(q, ob.backlog("a")))
        assert [n for n in got if n >= 1000] == list(range(1000, 1020))
        # The oldest superseded progress went first; the order's newest progress stays.
        left = [n for n in got if n < 1000]
        assert left == list(range(40 - len(left), 40))
        assert len(left) + ob.stats.dropped_progress == 40
