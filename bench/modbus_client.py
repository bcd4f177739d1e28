"""Modbus client cost: the gateway's lean TCP client vs pymodbus, reads/s and CPU per read.

The load simulator runs in its own process (one device per port); this process reads
``--registers`` holding registers back to back over 1 and 50 connections (one per device),
with each client in turn, and measures its own CPU time (``time.process_time``) over the
window. Three clients:

- ``line``: :class:`adapters.modbus.line.Line` on the lean client: what the gateway calls;
- ``tcpclient``: :class:`adapters.modbus.tcpclient.TcpClient` alone (the line's overhead is
  the difference);
- ``pymodbus``: ``AsyncModbusTcpClient.read_holding_registers``, bare (no timeout wrapper).

    python -m bench.modbus_client --duration 3 --connections 1,50

Both processes share the machine's cores: compare the clients within one run, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import free_port_range, load_sim, raise_fd_limit, report
from gateway.runtime import logs
from shopfloor_gateway.adapters.modbus import line as lines
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig
from shopfloor_gateway.adapters.modbus.tcpclient import TcpClient

HOST = "127.0.0.1"
CLIENTS = ("line", "tcpclient", "pymodbus")

Read = Callable[[], Awaitable[object]]


async def _open(kind: str, port: int, registers: int) -> tuple[Read, Callable[[], None]]:
    """A read function for one connection of ``kind``, and how to close it."""
    if kind == "line":
        conn = ModbusConnectionConfig(host=HOST, port=port, timeout=2.0)
        pool = lines.LinePool()
        line = await pool.acquire(conn)

        async def read_line() -> object:
            return await line.read(1, "holding", 0, registers, reply_within=2.0)

        return read_line, pool.close
    if kind == "tcpclient":
        client = await TcpClient.connect(HOST, port, framing="mbap", connect_within=2.0)

        async def read_raw() -> object:
            return await client.read(1, "holding", 0, registers, 2.0)

        return read_raw, client.close
    from pymodbus.client import AsyncModbusTcpClient

    pm = AsyncModbusTcpClient(HOST, port=port, timeout=2.0, retries=0, reconnect_delay=3600)
    if not await pm.connect():
        raise RuntimeError(f"pymodbus cannot connect to {HOST}:{port}")

    async def read_pymodbus() -> object:
        response = await pm.read_holding_registers(0, count=registers, device_id=1)
        return response.registers

    return read_pymodbus, pm.close


async def measure(
    kind: str, ports: list[int], registers: int, duration: float, warmup: float
) -> dict[str, float]:
    """Reads/s and CPU microseconds per read of ``kind`` over one connection per port."""
    opened = [await _open(kind, port, registers) for port in ports]
    counts = [0] * len(opened)
    running = True

    async def worker(i: int, read: Read) -> None:
        first = await read()
        if not (isinstance(first, list) and len(first) == registers):
            raise RuntimeError(f"{kind}: unexpected answer {first!r}")
        while running:
            await read()
            counts[i] += 1

    tasks = [asyncio.create_task(worker(i, r)) for i, (r, _) in enumerate(opened)]
    try:
        await asyncio.sleep(warmup)
        start_reads, start_cpu, start_wall = sum(counts), time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        reads = sum(counts) - start_reads
        cpu = time.process_time() - start_cpu
        wall = time.perf_counter() - start_wall
    finally:
        running = False
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, close in opened:
            close()
    return {
        "reads_per_s": reads / wall,
        "cpu_us_per_read": cpu / reads * 1e6 if reads else float("nan"),
        "cpu_share": cpu / wall,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the simulator, measure every client at every connection count."""
    raise_fd_limit()
    counts = [int(c) for c in args.connections.split(",")]
    devices = max(counts)
    base = free_port_range(devices)
    sim_args = [f"--devices={devices}", f"--signals={args.registers}", f"--base-port={base}"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-modbus-client-") as tmp:
        async with load_sim(Path(tmp), *sim_args):
            for n in counts:
                ports = list(range(base, base + n))
                for kind in args.clients.split(","):
                    figures = await measure(kind, ports, args.registers, args.duration, 0.3)
                    results[f"{kind}/{n}"] = figures
    return results


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="bench.modbus_client", description=__doc__.splitlines()[0])
    p.add_argument("--connections", default="1,50", help="connection counts, comma separated")
    p.add_argument("--clients", default=",".join(CLIENTS), help="subset of " + ",".join(CLIENTS))
    p.add_argument("--registers", type=int, default=30, help="holding registers per read")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = p.parse_args()
    logs.configure("warning")
    if args.loop == "uvloop":
        import uvloop

        results = uvloop.run(run(args))
    else:
        results = asyncio.run(run(args))
    print(f"\n{'client/connections':<22} {'reads/s':>10} {'CPU us/read':>12} {'CPU share':>10}")
    for key, f in results.items():
        print(
            f"{key:<22} {f['reads_per_s']:>10,.0f} {f['cpu_us_per_read']:>12.1f}"
            f" {f['cpu_share']:>10.2f}"
        )
    rows: list[tuple[str, Any, str]] = []
    for key, f in results.items():
        rows.append((f"{key} reads/s", round(f["reads_per_s"]), ""))
        rows.append((f"{key} CPU us/read", round(f["cpu_us_per_read"], 1), ""))
    params = {
        "registers": args.registers,
        "duration_s": args.duration,
        "loop": args.loop,
        "connections": args.connections,
    }
    report("modbus_client", params, rows)


if __name__ == "__main__":
    main()
