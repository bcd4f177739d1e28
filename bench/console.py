"""Console cost: what three open browsers add to a gateway reading 500 machines.

The load simulator serves N Modbus machines; the gateway runs as its own process with the
console on (as always) and publishes to a private Mosquitto. One run, alternating windows:
no console client, then three clients that each load the floor (``/api/floor``) and keep
the live stream (``/api/stream``, Server-Sent Events) open and read, as three tablets on
the floor page would; twice over, so a drift of the process over time is not taken for
the console's cost. CPU and memory come from ``/proc/<gateway pid>``.

    python -m bench.console --devices 500 --signals 30 --window 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import (
    cpu_seconds,
    free_port_range,
    gateway,
    load_sim,
    memory_kib,
    raise_fd_limit,
    report,
    subscriber,
    wait_connected,
    write_config,
)
from shopfloor_gateway.simulators.load import LoadDevice, signal_map
from shopfloor_gateway.simulators.modbus_server import free_port
from tests.brokers import MosquittoBroker

CLIENTS = 3


class StreamClient:
    """One browser on the floor page: the floor once, then the live stream, read as it comes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bytes = 0
        self.updates = 0
        self.floor_bytes = 0

    async def _get(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        return reader, writer

    async def run(self) -> None:
        reader, writer = await self._get("/api/floor")
        self.floor_bytes = len(await reader.read())
        writer.close()
        reader, writer = await self._get("/api/stream")
        try:
            while chunk := await reader.read(65536):
                self.bytes += len(chunk)
                self.updates += chunk.count(b"event: machines")
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def clients(port: int, n: int) -> AsyncIterator[list[StreamClient]]:
    """``n`` stream clients reading until the block ends."""
    group = [StreamClient(port) for _ in range(n)]
    tasks = [asyncio.create_task(c.run()) for c in group]
    try:
        yield group
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(pid: int, window: float) -> dict[str, float]:
    """CPU fraction of one core and RSS at the end of a window."""
    t0, c0 = time.time(), cpu_seconds(pid)
    await asyncio.sleep(window)
    t1, c1 = time.time(), cpu_seconds(pid)
    mem = memory_kib(pid)
    return {"cpu": (c1 - c0) / (t1 - t0), "rss_mib": mem["VmRSS"] / 1024}


async def run(devices: int, signals: int, poll: float, window: float, work: Path) -> dict[str, Any]:
    """The alternating windows; returns the figures."""
    broker = MosquittoBroker(work / "broker")
    broker.start()
    try:
        base = free_port_range(devices)
        port = free_port()
        args = [f"--devices={devices}", f"--signals={signals}", f"--base-port={base}"]
        async with load_sim(work, *args) as sim:
            config = write_config(
                work / "gateway.yaml",
                broker_port=broker.port,
                devices=sim.devices,
                signals=signal_map(LoadDevice("x", 1, signals=signals)),
                poll=poll,
                health_port=port,
            )
            ok = {d["name"] for d in sim.devices if d["mode"] == "ok"}
            async with (
                subscriber(broker.port) as arrivals,
                gateway(config, work / "gateway.log") as gw,
            ):
                if not await wait_connected(arrivals, ok, timeout=30 + devices * 0.05):
                    raise RuntimeError(f"machines never connected; see {gw.log}")
                await asyncio.sleep(2 * poll + 2)
                without: list[dict[str, float]] = []
                with_: list[dict[str, float]] = []
                streamed: list[StreamClient] = []
                for _ in range(2):
                    without.append(await measure(gw.pid, window))
                    async with clients(port, CLIENTS) as group:
                        await asyncio.sleep(2)  # connected and first push received
                        with_.append(await measure(gw.pid, window))
                        streamed += group
                    await asyncio.sleep(1)
    finally:
        broker.stop()

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    cpu_without, cpu_with = mean(without, "cpu"), mean(with_, "cpu")
    return {
        "cpu_without_clients": round(cpu_without, 4),
        "cpu_with_clients": round(cpu_with, 4),
        "cpu_added_fraction_of_core": round(cpu_with - cpu_without, 4),
        "rss_without_clients_mib": round(max(r["rss_mib"] for r in without), 1),
        "rss_with_clients_mib": round(max(r["rss_mib"] for r in with_), 1),
        "rss_added_mib": round(
            max(r["rss_mib"] for r in with_) - max(r["rss_mib"] for r in without), 1
        ),
        "stream_updates_per_client_s": round(
            sum(c.updates for c in streamed) / len(streamed) / window, 2
        ),
        "stream_kib_per_client_s": round(
            sum(c.bytes for c in streamed) / len(streamed) / window / 1024, 1
        ),
        "floor_json_kib": round(max(c.floor_bytes for c in streamed) / 1024, 1),
    }


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--signals", type=int, default=30)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--window", type=float, default=15.0, help="seconds per measured window")
    p.add_argument("--name", default="console")
    a = p.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        figures = asyncio.run(run(a.devices, a.signals, a.poll, a.window, Path(tmp)))
    params = {"devices": a.devices, "signals": a.signals, "poll": a.poll, "window": a.window}
    rows = [
        (
            k,
            v,
            "<= 0.01"
            if k == "cpu_added_fraction_of_core"
            else "<= 15"
            if k == "rss_added_mib"
            else "",
        )
        for k, v in figures.items()
    ]
    report(a.name, {**params, "clients": CLIENTS}, rows)


if __name__ == "__main__":
    main()
