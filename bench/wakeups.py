"""What a wake-up costs: the same small piece of work back to back, alone, or in batches.

The gateway's CPU on a small PC is dominated less by its work than by how often it wakes:
a process that sleeps between two pieces of work pays for the wake-up (timer, scheduler,
on a VM the exit and entry of an idle vCPU) and for cold caches. This benchmark does one
kind of work, a TCP connect to a closed loopback port (what a reconnect attempt to a dead
device costs), and an empty ``asyncio.sleep`` wake-up, in three rhythms:

- ``back to back``: N in a row, no sleep;
- ``alone``: one, then a sleep of ``--gap`` (the rhythm of 22 reconnects a second);
- ``batched``: ``--batch`` in a row, then a sleep of ``--gap`` x ``--batch``.

The CPU per operation is this process's (``time.process_time``).

    python -m bench.wakeups --count 400 --gap 0.045 --batch 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

import uvloop

from bench.common import report

Op = Callable[[], Awaitable[None]]


def _closed_ports(n: int) -> list[int]:
    """Loopback ports nobody listens on (bound and released at once)."""
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


async def _rhythm(op: Op, count: int, batch: int, gap: float) -> float:
    """CPU microseconds per operation: ``batch`` at a time, then a sleep of ``gap``."""
    c0 = time.process_time()
    for _ in range(count // batch):
        for _ in range(batch):
            await op()
        if gap:
            await asyncio.sleep(gap * batch)
    return (time.process_time() - c0) / (count // batch * batch) * 1e6


async def _measure(count: int, gap: float, batch: int) -> list[tuple[str, float, str]]:
    loop = asyncio.get_running_loop()
    ports = _closed_ports(50)
    turn = [0]

    async def refused() -> None:
        turn[0] += 1
        with contextlib.suppress(OSError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", ports[turn[0] % 50])

    async def wake() -> None:
        await asyncio.sleep(0)

    rows: list[tuple[str, float, str]] = []
    for name, op in (("refused connect", refused), ("empty wake-up", wake)):
        together = await _rhythm(op, count, 1, 0.0)
        alone = await _rhythm(op, count, 1, gap)
        batched = await _rhythm(op, count, batch, gap)
        rows += [
            (f"{name}: CPU us, back to back", round(together, 1), ""),
            (f"{name}: CPU us, alone every {gap * 1000:.0f} ms", round(alone, 1), ""),
            (f"{name}: CPU us, {batch} per wake-up", round(batched, 1), ""),
            (f"{name}: alone / batched", round(alone / max(batched, 1e-9), 1), ""),
        ]
    return rows


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=400, help="operations per rhythm")
    p.add_argument("--gap", type=float, default=0.045, help="seconds between single operations")
    p.add_argument("--batch", type=int, default=20, help="operations per wake-up when batched")
    p.add_argument("--name", default="wakeups")
    args = p.parse_args()
    rows = uvloop.run(_measure(args.count, args.gap, args.batch))
    report(args.name, {"count": args.count, "gap_s": args.gap, "batch": args.batch}, rows)


if __name__ == "__main__":
    main()
