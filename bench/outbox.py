"""Outbox throughput: events per second in (committed) and out (read and acknowledged).

Run: ``.venv/bin/python -m bench.outbox [--events N] [--backlog N]``. Uses a temporary
directory on the same disk as the current one (fsync cost is the disk's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path

from gateway.outbox import Entry, Outbox
from gateway.routing import Route

PAYLOAD_PAD = "x" * 250  # an event envelope is ~350 bytes


def entry(n: int, type_: str) -> Entry:
    body = {"id": f"{n:032x}", "type": type_, "sequence": n, "pad": PAYLOAD_PAD}
    return Entry(
        machine=f"m{n % 40}",
        topic=f"b/site/a/l/m{n % 40}/event/{type_}",
        payload=json.dumps(body).encode(),
        destinations=frozenset({"a"}),
        event_type=type_,
        order_id=f"PO-{n % 40}",
        created=time.time(),
    )


async def live(path: Path, events: int, burst: int) -> tuple[float, float]:
    """Producer appends bursts of events (one tracker step each) while a consumer acks."""
    ob = Outbox(path, ["a"])
    await ob.open()
    writer = asyncio.create_task(ob.run())
    q = ob.queue(Route("a"))
    q.start()
    ready = asyncio.Event()
    q.waker = ready.set
    got = 0
    t0 = time.perf_counter()

    async def consume() -> None:
        nonlocal got
        while got < events:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            q.ack(item[0])
            got += 1

    consumer = asyncio.create_task(consume())
    for start in range(0, events, burst):
        ob.append(
            [entry(n, "order.progress") for n in range(start, min(events, start + burst))],
            {f"m{start % 40}": {"sequence": start}},
        )
        await asyncio.sleep(0)  # the loop stays free: the writer commits in its thread
    await ob.flush()
    t_in = time.perf_counter() - t0
    await consumer
    await ob.flush()
    t_out = time.perf_counter() - t0
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await ob.close()
    return events / t_in, events / t_out


async def backlog(path: Path, events: int) -> tuple[float, float]:
    """Fill a backlog with no consumer, then drain it; returns (fill s, drain s)."""
    ob = Outbox(path, ["a"], max_events=events * 2)
    await ob.open()
    writer = asyncio.create_task(ob.run())
    t0 = time.perf_counter()
    for start in range(0, events, 1000):
        ob.append([entry(n, "order.completed") for n in range(start, start + 1000)])
        await ob.flush()
    fill = time.perf_counter() - t0
    q = ob.queue(Route("a"))
    ready = asyncio.Event()
    q.waker = ready.set
    q.start()
    t0 = time.perf_counter()
    got = 0
    while got < events:
        item = q.take()
        if item is None:
            ready.clear()
            await ready.wait()
            continue
        q.ack(item[0])
        got += 1
    await ob.flush()
    drain = time.perf_counter() - t0
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await ob.close()
    return fill, drain


def main() -> None:
    """Print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--burst", type=int, default=5, help="events per tracker step")
    p.add_argument("--backlog", type=int, default=200_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        rate_in, rate_out = asyncio.run(live(Path(tmp) / "live.db", args.events, args.burst))
        print(f"live: {args.events} events, bursts of {args.burst}, every commit fsynced")
        print(f"  into the outbox (committed): {rate_in:,.0f} events/s")
        print(f"  through it (committed, read, acknowledged): {rate_out:,.0f} events/s")
        fill, drain = asyncio.run(backlog(Path(tmp) / "backlog.db", args.backlog))
        print(f"backlog: {args.backlog} events")
        print(f"  filled in {fill:.1f} s ({args.backlog / fill:,.0f} events/s)")
        print(f"  drained in {drain:.1f} s ({args.backlog / drain:,.0f} events/s)")


if __name__ == "__main__":
    main()
