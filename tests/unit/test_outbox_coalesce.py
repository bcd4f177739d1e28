"""Outbox commit coalescing: events commit at once, acknowledgements share commits, and
the fsync is spent only where the durability contract asks for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.core.routing import Route
from gateway.delivery.outbox import Entry, Outbox, OutboxQueue
from tests.unit import test_outbox


def entry(n: int, type_: str = "order.started", machine: str = "m1") -> Entry:
    """An event routed to destination ``a``."""
    return Entry(
        machine=machine,
        topic=f"t/{machine}/{type_}",
        payload=json.dumps({"n": n}).encode(),
        destinations=frozenset({"a"}),
        event_type=type_,
        order_id="PO-1",
        created=1000.0,
    )


async def take_all(q: OutboxQueue, expect: int) -> list[tuple[int, int]]:
    """(key, n) of ``expect`` messages, in the order the queue hands them out."""
    ready = asyncio.Event()
    q.waker = ready.set
    got: list[tuple[int, int]] = []
    async with asyncio.timeout(5):
        while len(got) < expect:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            got.append((item[0], json.loads(item[1].payload)["n"]))
    return got


@pytest.mark.parametrize(
    ("types", "with_state", "fsyncs"),
    [
        (["order.started"], True, 1),
        # A progress event has a sequence number that must never be handed out twice.
        (["order.progress", "order.progress"], True, 1),
        (["order.progress"], False, 1),
        # A tracker state may hold an accepted platform order.
        ([], True, 1),
        (["order.progress", "order.started", "machine.alarm.raised"], True, 1),
        (["machine.state.changed"], True, 1),
    ],
)
async def test_commits_with_events_or_tracker_state_are_fsynced(
    tmp_path: Path, types: Sequence[str], with_state: bool, fsyncs: int
) -> None:
    async with running(tmp_path / "ob.db") as ob:
        state = {"m1": {"sequence": 1}} if with_state else None
        ob.append([entry(i, t) for i, t in enumerate(types)], state)
        await ob.flush()
        assert (ob.stats.commits, ob.stats.fsyncs) == (1, fsyncs)
        assert ob.committed_upto == len(types)


async def test_events_do_not_wait_for_the_commit_window(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db", commit_window=1.0) as ob:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ob.append([entry(1)])
        async with asyncio.timeout(0.5):
            await ob.flush()
        assert ob.committed_upto == 1
        assert loop.time() - t0 < 0.5


async def test_acknowledgements_share_one_commit_within_the_window(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db", commit_window=1.0, commit_rows=1000) as ob:
        ob.append([entry(i) for i in range(1, 11)])
        await ob.flush()
        commits, fsyncs = ob.stats.commits, ob.stats.fsyncs
        q = ob.queue(Route("a"))
        q.start()
        got = await take_all(q, 10)
        for key, _ in got:
            q.ack(key)
            await asyncio.sleep(0)  # one PUBACK per loop iteration, as from a broker
        async with asyncio.timeout(3):
            await ob.flush()
        assert ob.stats.commits == commits + 1
        # Acknowledgements alone are not fsynced: a power cut costs duplicates, never events.
        assert ob.stats.fsyncs == fsyncs
        assert (ob.backlog("a"), ob.stats.stored, ob.stats.acked) == (0, 0, 10)


async def test_enough_acknowledgements_commit_without_waiting(tmp_path: Path) -> None:
    async with running(tmp_path / "ob.db", commit_window=1.0, commit_rows=5) as ob:
        ob.append([entry(i) for i in range(1, 6)])
        await ob.flush()
        q = ob.queue(Route("a"))
        q.start()
        loop = asyncio.get_running_loop()
        got = await take_all(q, 5)
        t0 = loop.time()
        for key, _ in got:
            q.ack(key)
        async with asyncio.timeout(0.5):
            await ob.flush()
        assert loop.time() - t0 < 0.5
        assert ob.backlog("a") == 0


async def test_rows_keep_their_order_across_coalesced_commits(tmp_path: Path) -> None:
    db = tmp_path / "ob.db"
    async with running(db) as ob:
        q = ob.queue(Route("a"))
        q.start()
        n = 0
        for burst in range(30):
            kind = "order.progress" if burst % 2 else "machine.state.changed"
            ob.append([entry(n + i, kind) for i in range(3)])
            n += 3
            if burst % 4 == 0:
                await asyncio.sleep(0)
        got = await take_all(q, n)
        assert [x for _, x in got] == list(range(n))
        assert [k for k, _ in got] == sorted(k for k, _ in got)
        for key, _ in got[:10]:
            q.ack(key)
    # Everything committed, the ten acknowledged rows gone, the rest still in order.
    async with running(db) as ob:
        q = ob.queue(Route("a"))
        q.start()
        assert [x for _, x in await take_all(q, n - 10)] == list(range(10, n))


def test_bad_coalescing_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="commit_window"):
        Outbox(tmp_path / "x.db", ["a"], commit_window=-1)
    with pytest.raises(ValueError, match="commit_rows"):
        Outbox(tmp_path / "x.db", ["a"], commit_rows=0)


def running(path: Path, **kw: float) -> contextlib.AbstractAsyncContextManager[Outbox]:
    """An open outbox for destination ``a`` with its writer task, closed afterwards."""
    return test_outbox.running(path, ["a"], **kw)
