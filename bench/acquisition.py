"""Acquisition + decode + map + track on one core: tags per CPU-second over real sockets.

The issue's figure for dense Modbus blocks: how many tags one core acquires, decodes and
feeds through the mapping and the order tracker per second of its own CPU. This process runs
the gateway's own parts (``ModbusAdapter`` per device over the shared-line client, ``Mapper``,
``MachineTracker``) on one uvloop event loop; the devices are the load simulator in another
process (``simulators.load``), so only the gateway side's CPU is counted (``process_time``
of this process). No outbox and no MQTT: those are per event, not per tag, and measured by
``bench.scale_modbus``, ``bench.publish`` and ``bench.outbox``.

``--layers`` builds a poll's CPU up step by step (``LAYERS``); the ``memory`` step runs the
``full`` step's Python with no I/O at all, so the difference between the two is what the
sockets, the wake-ups and the idle gaps between polls cost on this machine.

Each device is one dense block (3 fixed signals + uint16 telemetry filling the registers up
to ``--signals``; 115 signals make one full 125-register read).

    python -m bench.acquisition --devices 100 --signals 115 --poll 0.1 --window 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import uvloop

from bench.common import free_port_range, load_sim, raise_fd_limit, report
from gateway.core.mapping import Mapper
from gateway.core.tracker import MachineTracker, TrackerSettings
from shopfloor_gateway.adapters.base import first_deadline, next_deadline, poll_phase
from shopfloor_gateway.adapters.modbus import line as lines
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.tcpclient import TcpClient
from shopfloor_gateway.adapters.modbus.wire import MbapReader, mbap_request
from shopfloor_gateway.simulators.load import LoadDevice, signal_map
from shopfloor_gateway.simulators.load import registers as load_registers


class _FloorProtocol(asyncio.Protocol):
    """The least a poll can do: send a request, wait for one whole response frame."""

    def __init__(self) -> None:
        self.reader = MbapReader()
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.reader.feed(data) and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _floor_machine(
    port: int, registers: int, poll: float, phase: float, count: Callable[[], None]
) -> None:
    """The I/O floor of one device: the gateway's schedule, no client, decode or tracker."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_FloorProtocol, "127.0.0.1", port)
    deadline = first_deadline(loop.time(), poll, phase)
    transaction = 0
    while True:
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        transaction = (transaction + 1) & 0xFFFF
        proto.waiter = loop.create_future()
        proto.transport.write(mbap_request(transaction, 1, 3, 0, registers))
        await proto.waiter
        count()
        deadline, _ = next_deadline(deadline, loop.time(), poll)


#: What each ``--layers`` step adds on top of the one before (CPU per poll, this machine).
LAYERS = {
    "floor": "send the request, wait for one response frame (no client)",
    "client": "the gateway's TcpClient.read",
    "line": "the shared line's read (slot, connection checks)",
    "poll": "ModbusAdapter._poll: plan, decode, samples",
    "samples": "ModbusAdapter.samples(): the async generator the supervisor iterates",
    "full": "plus mapping and the order tracker (the default)",
    "memory": "the full step's Python alone: responses from memory, machines back to back "
    "(or in batches with idle gaps: --memory-gap)",
}


class _MemoryLine:
    """A line that answers every read at once from a register list (the ``memory`` step)."""

    def __init__(self) -> None:
        self.words: list[int] = []

    async def read(
        self, unit_id: int, area: str, start: int, count: int, *, reply_within: float
    ) -> list[int]:
        return self.words[start : start + count]


async def _memory(
    devices: int, signals: int, window: float, batch: int = 0, gap: float = 0.0
) -> dict[str, Any]:
    """The ``full`` step's work with no I/O: what the Python of a poll costs.

    Every machine has its own adapter, mapping and tracker as in ``full``; each round polls
    all of them from memory, the registers those of the load simulator one second later than
    the round before (counts and telemetry move as on the wire). Back to back by default;
    with ``gap``, the process sleeps ``gap`` seconds after every ``batch`` polls, as the
    gateway does between its poll slots, which shows what idle time costs the same work.
    """
    sigs = {
        k: ModbusSignalConfig.model_validate(v)
        for k, v in signal_map(LoadDevice("x", 1, signals=signals)).items()
    }
    machines = []
    for i in range(devices):
        name = f"m{i:04d}"
        conn = ModbusConnectionConfig(host="127.0.0.1", port=1 + i, timeout=2.0)
        adapter = ModbusAdapter(name, conn, sigs, 1.0)
        line = _MemoryLine()
        adapter._line = cast(Any, line)
        tracker = MachineTracker(name, TrackerSettings(counter_mode="lifetime"))
        device = LoadDevice(name, 1, signals=signals)
        machines.append((device, line, adapter, Mapper(sigs), tracker))
    t0 = time.time()
    polls = events = 0
    cpu = 0.0
    second = 0
    started = time.perf_counter()
    while time.perf_counter() - started < window:
        second += 1
        for device, line, *_ in machines:
            line.words = load_registers(device, t0 + second)
        c0 = time.process_time()
        now = t0 + second
        for i, (_, _, adapter, mapper, tracker) in enumerate(machines, 1):
            mapped, _ = mapper.apply(await adapter._poll())
            events += len(tracker.observe(mapped, now))
            if gap and i % batch == 0:
                await asyncio.sleep(gap)
        cpu += time.process_time() - c0
        polls += devices
    wall = time.perf_counter() - started
    return _figures(devices, signals, 0.0, wall, cpu, polls, polls * signals, events)


def _figures(
    devices: int,
    signals: int,
    poll: float,
    wall: float,
    cpu: float,
    polls: int,
    tags: int,
    events: int,
) -> dict[str, Any]:
    """One measurement's figures from its counts, wall and CPU seconds."""
    return {
        "devices": devices,
        "signals": signals,
        "poll_s": poll,
        "window_s": round(wall, 2),
        "polls_per_s": round(polls / wall, 1),
        "tags_per_s": round(tags / wall),
        "cpu_fraction": round(cpu / wall, 4),
        "tags_per_cpu_s": round(tags / max(cpu, 1e-9)),
        "cpu_us_per_poll": round(1e6 * cpu / max(polls, 1), 1),
        "events": events,
    }


async def _layer_machine(
    layer: str,
    name: str,
    port: int,
    registers: int,
    sigs: dict[str, ModbusSignalConfig],
    poll: float,
    phase: float,
    count: Callable[[], None],
) -> None:
    """One device read the way ``layer`` says, on the gateway's schedule."""
    loop = asyncio.get_running_loop()
    if layer == "floor":
        await _floor_machine(port, registers, poll, phase, count)
        return
    conn = ModbusConnectionConfig(host="127.0.0.1", port=port, timeout=2.0)
    adapter = ModbusAdapter(name, conn, sigs, poll, start_offset=phase)
    client = line = None
    if layer == "client":
        client = await TcpClient.connect("127.0.0.1", port, framing="mbap", connect_within=2.0)
    elif layer == "line":
        line = await lines.LinePool().acquire(conn)
    async with contextlib.AsyncExitStack() as stack:
        if layer in ("poll", "samples"):
            await stack.enter_async_context(adapter)
        if layer == "samples":
            async for _ in adapter.samples():
                count()
            return
        deadline = first_deadline(loop.time(), poll, phase)
        while True:
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if client is not None:
                await client.read(1, "holding", 0, registers, 2.0)
            elif line is not None:
                await line.read(1, "holding", 0, registers, reply_within=2.0)
            else:
                await adapter._poll()
            count()
            deadline, _ = next_deadline(deadline, loop.time(), poll)


async def run(
    devices: int,
    signals: int,
    poll: float,
    window: float,
    work: Path,
    spread: str = "slots",
    layer: str = "full",
    memory_gap: tuple[int, float] = (0, 0.0),
) -> dict[str, Any]:
    """One measurement; returns its figures."""
    if layer == "memory":
        return await _memory(devices, signals, window, *memory_gap)
    base = free_port_range(devices)
    args = [f"--devices={devices}", f"--signals={signals}", f"--base-port={base}"]
    async with load_sim(work, *args) as sim:
        sigs = {
            k: ModbusSignalConfig.model_validate(v)
            for k, v in signal_map(LoadDevice("x", 1, signals=signals)).items()
        }
        counts = {"tags": 0, "polls": 0, "events": 0}
        measuring = [False]

        async def machine(name: str, port: int, offset: float) -> None:
            conn = ModbusConnectionConfig(host="127.0.0.1", port=port, timeout=2.0)
            adapter = ModbusAdapter(name, conn, sigs, poll, start_offset=offset)
            mapper = Mapper(sigs)
            tracker = MachineTracker(name, TrackerSettings(counter_mode="lifetime"))
            async with adapter:
                async for batch in adapter.samples():
                    now = time.time()
                    mapped, _ = mapper.apply(batch)
                    events = tracker.observe(mapped, now)
                    if measuring[0]:
                        counts["tags"] += len(batch)
                        counts["polls"] += 1
                        counts["events"] += len(events)

        def phase(i: int, name: str) -> float:
            # "slots": the gateway's own phases; "even": every device at its own instant.
            return poll_phase(name, poll) if spread == "slots" else poll * i / devices

        registers = LoadDevice("x", 1, signals=signals).register_count

        def counted() -> None:
            if measuring[0]:
                counts["tags"] += signals
                counts["polls"] += 1

        tasks = [
            asyncio.create_task(
                machine(d["name"], d["port"], phase(i, d["name"]))
                if layer == "full"
                else _layer_machine(
                    layer,
                    d["name"],
                    d["port"],
                    registers,
                    sigs,
                    poll,
                    phase(i, d["name"]),
                    counted,
                )
            )
            for i, d in enumerate(sim.devices)
        ]
        try:
            await asyncio.sleep(2 * poll + 1)  # connected, past the first polls
            for t in tasks:
                if t.done():
                    t.result()  # a device that failed: raise its error here
            measuring[0] = True
            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(window)
            c1, t1 = time.process_time(), time.perf_counter()
            measuring[0] = False
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
    return _figures(
        devices, signals, poll, t1 - t0, c1 - c0, counts["polls"], counts["tags"], counts["events"]
    )


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--signals", default="30,115", help="comma-separated signals per device")
    p.add_argument("--poll", type=float, default=0.1)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument(
        "--spread",
        choices=("slots", "even"),
        default="slots",
        help="poll phases: the gateway's slots (POLL_SLOT in adapters/base.py), or evenly spread",
    )
    p.add_argument(
        "--layers",
        default="full",
        help="comma-separated steps to measure, each adding to the one before: "
        + "; ".join(f"{k}: {v}" for k, v in LAYERS.items()),
    )
    p.add_argument(
        "--memory-gap",
        default="",
        metavar="K:S",
        help="memory step only: sleep S seconds after every K polls (e.g. 50:0.1, the "
        "gateway's 50 devices per 100 ms slot at 500 devices); default back to back",
    )
    p.add_argument("--name", default="acquisition")
    args = p.parse_args()
    memory_gap = (0, 0.0)
    if args.memory_gap:
        try:
            k, _, gap = args.memory_gap.partition(":")
            memory_gap = (int(k), float(gap))
        except ValueError:
            p.error(f"--memory-gap: give K:S, e.g. 25:0.05, not {args.memory_gap!r}")
        if memory_gap[0] < 1 or not memory_gap[1] > 0:
            p.error("--memory-gap: K must be 1 or more and S more than 0")
    raise_fd_limit()
    rows: list[tuple[str, Any, str]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-acq-") as tmp:
        for signals in (int(s) for s in args.signals.split(",")):
            for layer in args.layers.split(","):
                if layer not in LAYERS:
                    p.error(f"--layers: unknown step {layer!r} (known: {', '.join(LAYERS)})")
                work = Path(tmp) / f"s{signals}-{layer}"
                work.mkdir()
                r = uvloop.run(
                    run(
                        args.devices,
                        signals,
                        args.poll,
                        args.window,
                        work,
                        args.spread,
                        layer,
                        memory_gap,
                    )
                )
                label = f"{args.devices} devices x {signals} tags @ {args.poll}s"
                if layer == "memory":
                    # No poll interval: back to back, or in batches with idle gaps.
                    label = f"{args.devices} devices x {signals} tags"
                    if memory_gap[0]:
                        label += f", {memory_gap[0]} polls then {memory_gap[1]} s idle"
                if layer != "full":
                    label += f", {layer}"
                results[label] = r
                rows += [
                    (f"{label}: tags/s", r["tags_per_s"], ""),
                    (f"{label}: CPU (1 core = 1)", r["cpu_fraction"], ""),
                    (
                        f"{label}: tags per CPU-second",
                        r["tags_per_cpu_s"],
                        ">= 250,000 (dense)" if layer == "full" else "",
                    ),
                    (f"{label}: CPU us per poll", r["cpu_us_per_poll"], ""),
                ]
    params = {
        "devices": args.devices,
        "signals": args.signals,
        "poll_s": args.poll,
        "spread": args.spread,
        "memory_gap": args.memory_gap or None,
    }
    out = report(args.name, params, rows)
    import json

    data = json.loads(out.read_text())
    data["scenarios"] = results
    out.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
