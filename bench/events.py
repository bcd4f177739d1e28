"""CPU per event: the gateway's emit path, outbox and publisher against a live Mosquitto.

    python -m bench.events --machines 500 --rate 100 --window 10 --rounds 2

Builds a real :class:`gateway.runtime.gateway.Gateway` in this process (on uvloop, durable SQLite
outbox, one destination) without devices: a driver feeds machine batches through the
runtime's own batch path in 50 ms slots, as polled devices do. Rounds alternate a *quiet*
phase (the same batches, unchanged: no events) and an *events* phase (each batch toggles the
machine's state: one event and its retained state message); the difference of the two, per
event, is what one event costs. Both phases run back to back in one process, so the figure is
a ratio within one run; the machine is shared, so compare builds in the same session.

CPU is read per thread from ``/proc/self/task``: the event loop's thread, the outbox's
writer thread, and the rest (connect threads). Wake-ups are the loop thread's voluntary
context switches (each one a sleep in epoll and a wake-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.common import check_profiler, report, start_profiler, write_config
from gateway.config.loader import load_config
from gateway.core.model import Sample
from gateway.runtime import logs
from gateway.runtime.gateway import Gateway
from shopfloor_gateway.simulators.load import LoadDevice, signal_map
from tests.brokers import MosquittoBroker

#: The runtime's poll phase slot: devices of one slot are read (and emit) together.
SLOT = 0.05


def thread_cpu(tid: int) -> float:
    """CPU seconds of one thread of this process (scheduler's run time, nanoseconds)."""
    try:
        # schedstat counts in ns; stat's user/system ticks (10 ms) are too coarse here.
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def voluntary_switches(tid: int) -> int:
    """Voluntary context switches of one thread (sleeps that ended in a wake-up)."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    return 0


@dataclass(slots=True)
class Reading:
    """CPU seconds per thread group and loop wake-ups at one instant."""

    loop: float
    writer: float
    other: float
    wakeups: int
    wall: float
    events: int
    commits: int
    fsyncs: int

    @classmethod
    def take(cls, loop_tid: int, writer_tid: int, gw: Gateway) -> Reading:
        """Read the counters now."""
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        total = {t: thread_cpu(t) for t in tids}
        loop = total.pop(loop_tid, 0.0)
        writer = total.pop(writer_tid, 0.0)
        return cls(
            loop,
            writer,
            sum(total.values()),
            voluntary_switches(loop_tid),
            time.perf_counter(),
            gw.events_emitted,
            gw.outbox.stats.commits,
            gw.outbox.stats.fsyncs,
        )

    def minus(self, other: Reading) -> dict[str, float]:
        """Differences to an earlier reading."""
        return {
            "loop": self.loop - other.loop,
            "writer": self.writer - other.writer,
            "other": self.other - other.other,
            "wakeups": self.wakeups - other.wakeups,
            "wall": self.wall - other.wall,
            "events": self.events - other.events,
            "commits": self.commits - other.commits,
            "fsyncs": self.fsyncs - other.fsyncs,
        }


class Driver:
    """Feeds ``rate`` machine batches a second through the runtime, in 50 ms slots."""

    def __init__(self, gw: Gateway, rate: float) -> None:
        """Cycle through every machine of ``gw``."""
        self.gw = gw
        self.rate = rate
        self.machines = list(gw.machines.values())
        self.state = {m.plan.id: 1 for m in self.machines}
        self.changing = False
        self._next = 0
        self._due = 0.0

    def _batch(self, machine: str, now: float) -> list[Sample]:
        if self.changing:
            self.state[machine] ^= 1
        return [
            Sample(machine, "state", self.state[machine], now),
            Sample(machine, "good_count", 100, now),
            Sample(machine, "order_id", f"PO-{machine}", now),
        ]

    async def run(self) -> None:
        """Until cancelled: each slot, the batches the rate owes so far."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            now = time.time()
            self._due += self.rate * SLOT
            while self._due >= 1:
                self._due -= 1
                m = self.machines[self._next % len(self.machines)]
                self._next += 1
                self.gw.devices.on_batch(m, self._batch(m.plan.id, now))
            # Slots anchored to the loop clock, as the runtime's poll phases are.
            start += SLOT
            await asyncio.sleep(max(0.0, start - loop.time()))


async def run(
    machines: int,
    rate: float,
    window: float,
    rounds: int,
    broker_port: int,
    work: Path,
    profile: bool = False,
) -> dict[str, Any]:
    """Alternate quiet and events phases; return the summed differences of each kind."""
    devices = [{"name": f"m{i:04d}", "port": 1, "unit_id": 1} for i in range(machines)]
    config = write_config(
        work / "gateway.yaml",
        broker_port=broker_port,
        devices=devices,
        signals=signal_map(LoadDevice("x", 1, signals=3)),
        poll=1.0,
        log_level="warning",
    )
    gw = Gateway(load_config(config))
    await gw.outbox.open()
    outbox_task = asyncio.create_task(gw.outbox.run(), name="outbox")
    for q in gw.queues.values():
        q.start()
    pubs = [asyncio.create_task(p.run(), name=f"publisher[{n}]") for n, p in gw.publishers.items()]
    driver = Driver(gw, rate)
    driving: asyncio.Task[None] | None = None
    sums: dict[str, dict[str, float]] = {"quiet": {}, "events": {}}
    try:
        # First batches connect every machine (their events are not measured); their
        # acknowledgement means every publisher is connected.
        for m in gw.machines.values():
            gw.devices.on_batch(m, driver._batch(m.plan.id, time.time()))
        for p in gw.publishers.values():
            if not await p.flush(30):
                raise RuntimeError("the first events were not acknowledged within 30 s")
        loop_tid = threading.get_native_id()
        writer_tid = gw.outbox._writer._thread.native_id or 0
        driving = asyncio.create_task(driver.run(), name="driver")
        await asyncio.sleep(1.0)  # settle
        for _ in range(rounds):
            for phase in ("quiet", "events"):
                driver.changing = phase == "events"
                await asyncio.sleep(0.5)  # the other phase's tail goes out first
                r0 = Reading.take(loop_tid, writer_tid, gw)
                spy = await start_profiler(
                    os.getpid(), window, profile and phase == "events", f"events-{phase}"
                )
                await asyncio.sleep(window)
                if spy is not None:
                    await spy.wait()
                    profile = False  # one profile of one events phase
                diff = Reading.take(loop_tid, writer_tid, gw).minus(r0)
                acc = sums[phase]
                for k, v in diff.items():
                    acc[k] = acc.get(k, 0.0) + v
        driving.cancel()
        for p in gw.publishers.values():
            if not await p.flush(30):
                raise RuntimeError("events were not acknowledged within 30 s")
        await gw.outbox.flush()
        backlog = gw.backlog()
    finally:
        if driving is not None:
            driving.cancel()
        for p in gw.publishers.values():
            await p.close(timeout=2)
        for t in pubs:
            t.cancel()
        outbox_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pubs, outbox_task, return_exceptions=True)
        await gw.outbox.close()
    return {"quiet": sums["quiet"], "events": sums["events"], "backlog": backlog}


def figures(result: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Per-event costs: the events phase minus the quiet phase, divided by the events."""
    q, e = result["quiet"], result["events"]
    n = e["events"] - q["events"]
    rows: list[tuple[str, Any, str]] = []
    rows.append(("events/s", round(e["events"] / e["wall"], 1), ""))
    rows.append(("events in the quiet phase", int(q["events"]), "0"))
    for part in ("loop", "writer", "other"):
        rows.append((f"quiet: {part} CPU (% of a core)", 100 * q[part] / q["wall"], ""))
        rows.append((f"events: {part} CPU (% of a core)", 100 * e[part] / e["wall"], ""))
    total = sum(e[p] - q[p] for p in ("loop", "writer", "other"))
    rows.append(("CPU us per event: loop", round(1e6 * (e["loop"] - q["loop"]) / n, 1), ""))
    rows.append(("CPU us per event: writer", round(1e6 * (e["writer"] - q["writer"]) / n, 1), ""))
    rows.append(("CPU us per event: total", round(1e6 * total / n, 1), ""))
    rows.append(("loop wake-ups per event", round((e["wakeups"] - q["wakeups"]) / n, 2), ""))
    rows.append(("commits per event", round(e["commits"] / n, 3), ""))
    rows.append(("fsyncs per event", round(e["fsyncs"] / n, 3), ""))
    rows.append(("quiet: commits/s", round(q["commits"] / q["wall"], 1), ""))
    rows.append(("backlog after flush", sum(result["backlog"].values()), "0"))
    return rows


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, default=500)
    p.add_argument("--rate", type=float, default=100.0, help="machine batches a second")
    p.add_argument("--window", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--profile", action="store_true", help="py-spy one events phase (bench/results/)"
    )
    args = p.parse_args()
    check_profiler(p, args)
    logs.configure("warning")
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker")
        broker.start()
        try:
            result = uvloop.run(
                run(
                    args.machines,
                    args.rate,
                    args.window,
                    args.rounds,
                    broker.port,
                    Path(tmp),
                    args.profile,
                )
            )
        finally:
            broker.stop()
    params = {k: getattr(args, k) for k in ("machines", "rate", "window", "rounds")}
    report("events", params, figures(result))


if __name__ == "__main__":
    main()
