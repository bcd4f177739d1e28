"""A full disk on a real small filesystem: the outbox drops and holds, never crashes.

A 400 KiB tmpfs is mounted as the outbox's directory (the test runs as root). SQLite's page
limit, which the unit tests use, lets deletions through; a real full disk does not: in WAL
mode a deletion needs room in the WAL too, and so does the commit of the deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.outbox import Entry, Outbox, OutboxQueue
from gateway.routing import Route

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tmpfs (a real full disk) needs root"
)


@contextlib.contextmanager
def small_disk(where: Path, size: str = "400k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``, unmounted afterwards whatever happened."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def step(n: int, *, order: int) -> list[Entry]:
    """One tracker step: a progress event and, every tenth, a lifecycle event."""
    body = {"id": f"id-{n}", "n": n, "pad": "p" * 400}
    out = [
        Entry(
            machine="m1",
            topic="t/m1/event/order.progress",
            payload=json.dumps({**body, "type": "order.progress"}).encode(),
            destinations=frozenset({"a"}),
            event_type="order.progress",
            order_id=f"PO-{order}",
            created=1000.0 + n,
        )
    ]
    if n % 10 == 0:
        out.append(
            Entry(
                machine="m1",
                topic="t/m1/event/order.started",
                payload=json.dumps({**body, "type": "order.started"}).encode(),
                destinations=frozenset({"a"}),
                event_type="order.started",
                order_id=f"PO-{order}",
                created=1000.0 + n,
            )
        )
    return out


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[tuple[Outbox, asyncio.Task[None]]]:
    ob = Outbox(path, ["a"], retry_delay=0.02, full_quiet=1.0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        yield ob, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


def take_all(q: OutboxQueue, *, ack: bool) -> list[dict[str, object]]:
    """Everything the queue has ready now, acknowledged when ``ack``."""
    got = []
    while (item := q.take()) is not None:
        key, msg = item
        got.append(json.loads(msg.payload))
        if ack:
            q.ack(key)
    return got


class Machine:
    """Appends tracker steps like a running machine and remembers what it emitted."""

    def __init__(self, ob: Outbox) -> None:
        self.ob = ob
        self.n = 0
        self.started: list[int] = []
        self.progress = 0

    def step(self, *, lifecycle_only: bool = False) -> None:
        if lifecycle_only:
            self.n += 10 - self.n % 10
        entries = step(self.n, order=self.n // 50)
        if lifecycle_only:
            entries = entries[1:]
        for e in entries:
            if e.event_type == "order.started":
                self.started.append(self.n)
            else:
                self.progress += 1
        self.ob.append(entries, {"m1": {"n": self.n}})
        self.n += 1


async def test_a_full_tmpfs_drops_progress_holds_the_rest_and_recovers(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk, capture_logs() as logs:
        async with running(disk / "ob.db") as (ob, task):
            q = ob.queue(Route("a"), prefetch=50)
            q.start()
            m = Machine(ob)
            sent: list[dict[str, object]] = []
            # The broker is down: nothing is acknowledged, the backlog fills the disk, and
            # progress that newer progress supersedes goes first, as the overflow policy says.
            async with asyncio.timeout(30):
                while not ob.stats.dropped_progress:
                    assert not task.done(), task.exception()
                    m.step()
                    await asyncio.sleep(0.002)
            assert ob.disk_full
            # Then only lifecycle events are left: they are held in memory, not dropped.
            async with asyncio.timeout(30):
                while ob.committed_upto == ob.assigned_upto:
                    assert not task.done(), task.exception()
                    for _ in range(10):
                        m.step(lifecycle_only=True)
                    await asyncio.sleep(0.005)
            assert ob.disk_full
            # The broker is back: acknowledgements free the disk, the held events go in, and
            # the machine goes on producing.
            async with asyncio.timeout(30):
                while ob.disk_full or ob.committed_upto < ob.assigned_upto:
                    assert not task.done(), task.exception()
                    sent += take_all(q, ack=True)
                    m.step()
                    await asyncio.sleep(0.01)
                await ob.flush()
                while ob.backlog("a"):
                    sent += take_all(q, ack=True)
                    await asyncio.sleep(0.01)
            assert not task.done()
    full = [e for e in logs if e["event"] == "outbox.disk_full"]
    assert len(full) == 1, full
    assert [e["event"] for e in logs if e["event"] == "outbox.disk_writable"] == [
        "outbox.disk_writable"
    ]
    # Every lifecycle event reached the destination, in order; only progress went.
    started = [e["n"] for e in sent if e["type"] == "order.started"]
    assert started == m.started
    progress = [e["n"] for e in sent if e["type"] == "order.progress"]
    assert progress == sorted(set(progress))
    assert ob.stats.dropped_progress > 0
    # Rows already in the send window when dropped may still go out (docs/delivery.md).
    assert len(progress) + ob.stats.dropped_progress >= m.progress
