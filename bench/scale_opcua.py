"""Scale, OPC UA: K monitored items across several simulator processes, gateway measured.

Each simulator process (``python -m simulators.opcua_cli cnc``) serves ``--machines``
simulated CNC machines (one ``OpcUaMachineServer`` each, on its own port); the gateway reads
every machine with the built-in ``machine-tool-umati`` profile (11 signals) over
subscriptions, as its own process, and publishes to a private Mosquitto; this process
subscribes and counts. Gateway CPU and memory come from ``/proc/<gateway pid>``.
Latency is gateway-added: the event's ``time`` (when the gateway received the data-change
notification that caused it) to its arrival at the subscriber; the publishing interval
comes on top of it.

    python -m bench.scale_opcua --processes 3 --machines 6 --window 20
    python -m bench.scale_opcua --processes 4 --machines 10 --publishing-interval 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    PREFIX,
    ROOT,
    SITE,
    check_profiler,
    cpu_seconds,
    free_port_range,
    gateway,
    memory_kib,
    parse_time,
    raise_fd_limit,
    report,
    start_profiler,
    subscriber,
    summary_ms,
    wait_connected,
)
from tests.brokers import MosquittoBroker
from tests.gatewayproc import stop

#: Signals of the ``machine-tool-umati`` profile: monitored items per machine.
ITEMS_PER_MACHINE = 11


@contextlib.asynccontextmanager
async def simulators(
    work: Path,
    processes: int,
    machines: int,
    base: int,
    speed: float,
    extra: Sequence[str] = (),
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Start the CNC simulator processes (``extra``: more options for each); wait until
    every machine's port accepts."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i in range(processes):
            with (work / f"sim-{i}.log").open("wb") as log:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "shopfloor_gateway.simulators.opcua_cli",
                        "cnc",
                        f"--machines={machines}",
                        f"--port={base + i * machines}",
                        f"--seed={i}",
                        f"--speed={speed}",
                        *extra,
                        cwd=ROOT,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log,
                        stderr=asyncio.subprocess.STDOUT,
                    )
                )
        # Building an asyncua server costs about a second of CPU: allow for it.
        try:
            async with asyncio.timeout(30 + 2 * processes * machines):
                for port in range(base, base + processes * machines):
                    await _wait_port(port, procs)
        except RuntimeError as exc:
            logs = " | ".join((work / f"sim-{i}.log").read_text()[-500:] for i in range(processes))
            raise RuntimeError(f"{exc}: {logs}") from exc
        yield procs
    finally:
        await asyncio.gather(*(stop(proc) for proc in procs))


async def _wait_port(port: int, procs: list[asyncio.subprocess.Process]) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection (a simulator died: raise)."""
    while True:
        dead = [p for p in procs if p.returncode is not None]
        if dead:
            raise RuntimeError(f"a simulator process exited with {dead[0].returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)  # a readiness poll of another process, not a test
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def machine_id(index: int) -> str:
    """Gateway machine id of the simulated machine number ``index``."""
    return f"cnc-{index:03d}"


def write_config(
    path: Path,
    *,
    broker_port: int,
    ports: list[int],
    publishing: float,
    sampling: float | None = None,
    coalesce: float | None = None,
) -> Path:
    """A gateway config reading every simulated machine with the umati profile."""
    options = f"publishing_interval: {publishing}"
    if sampling is not None:
        options += f", sampling_interval: {sampling}"
    if coalesce is not None:
        options += f", coalesce: {coalesce}"
    lines = [
        f"gateway: {{id: gw-bench, site: {SITE}, topic_prefix: {PREFIX}}}",
        f"broker: {{host: 127.0.0.1, port: {broker_port}, keepalive: 30}}",
        "logging: {level: info, format: json}",
        "machines:",
    ]
    for i, port in enumerate(ports):
        lines += [
            f"  - id: {machine_id(i)}",
            "    area: machining",
            f"    line: line-{i // 20:02d}",
            "    profile: machine-tool-umati",
            f'    connection: {{protocol: opcua, url: "opc.tcp://127.0.0.1:{port}/", {options}}}',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_one(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One scenario; returns its figures."""
    n = args.processes * args.machines
    broker = MosquittoBroker(work / "broker")
    broker.start()
    try:
        base = free_port_range(n)
        latencies: list[float] = []
        measuring = [float("inf")]

        def on_event(arrived: float, event: dict[str, Any]) -> None:
            if arrived < measuring[0] or event["short_type"] == "machine.connection.changed":
                return
            latencies.append(arrived - parse_time(event["time"]))

        async with simulators(work, args.processes, args.machines, base, args.speed) as sims:
            config = write_config(
                work / "gateway.yaml",
                broker_port=broker.port,
                ports=list(range(base, base + n)),
                publishing=args.publishing_interval,
            )
            names = {machine_id(i) for i in range(n)}
            async with (
                subscriber(broker.port, on_event) as arrivals,
                gateway(config, work / "gateway.log") as gw,
            ):
                up = await wait_connected(arrivals, names, timeout=30 + n * 0.5)
                if not up:
                    missing = sorted(names - arrivals.connected)
                    raise RuntimeError(
                        f"{len(missing)} machines never connected ({missing[:5]}...); see {gw.log}"
                    )
                connected_after = time.time() - gw.started
                await asyncio.sleep(2 * args.publishing_interval + 1)  # settle past the start
                t0, c0, e0, m0 = (
                    time.time(),
                    cpu_seconds(gw.pid),
                    arrivals.events,
                    arrivals.messages,
                )
                s0 = sum(cpu_seconds(p.pid) for p in sims)
                measuring[0] = t0
                spy = await start_profiler(gw.pid, args.window, args.profile, "opcua")
                await asyncio.sleep(args.window)
                t1, c1, e1, m1 = (
                    time.time(),
                    cpu_seconds(gw.pid),
                    arrivals.events,
                    arrivals.messages,
                )
                s1 = sum(cpu_seconds(p.pid) for p in sims)
                mem = memory_kib(gw.pid)
                if spy is not None:
                    await spy.wait()
    finally:
        broker.stop()
    span = t1 - t0
    return {
        "machines": n,
        "monitored_items": n * ITEMS_PER_MACHINE,
        "connected_after_s": round(connected_after, 2),
        "window_s": round(span, 2),
        "cpu_fraction": round((c1 - c0) / span, 4),
        "rss_mib": round(mem["VmRSS"] / 1024, 1),
        "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
        "simulator_cpu_fraction": round((s1 - s0) / span, 4),
        "events_per_s": round((e1 - e0) / span, 1),
        "messages_per_s": round((m1 - m0) / span, 1),
        "latency_gateway_added": summary_ms(latencies),
    }


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=3, help="simulator processes")
    p.add_argument("--machines", type=int, default=6, help="machines per simulator process")
    p.add_argument("--publishing-interval", type=float, default=1.0, help="seconds")
    p.add_argument("--speed", type=float, default=10.0, help="scenario seconds per second")
    p.add_argument("--window", type=float, default=20.0, help="measured seconds")
    p.add_argument("--name", default="scale_opcua")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway during the window")
    args = p.parse_args()
    check_profiler(p, args)
    if args.processes < 1 or args.machines < 1:
        p.error("--processes and --machines must be at least 1")
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        r = asyncio.run(run_one(args, Path(tmp)))
    n = r["machines"]
    lat = r["latency_gateway_added"]
    label = f"{n} machines, {r['monitored_items']} items"
    rows: list[tuple[str, Any, str]] = [
        (f"{label}: gateway CPU (1 core = 1)", r["cpu_fraction"], ""),
        (f"{label}: RSS MiB", r["rss_mib"], ""),
        (f"{label}: connected after s", r["connected_after_s"], ""),
        (f"{label}: events/s", r["events_per_s"], ""),
        (f"{label}: messages/s", r["messages_per_s"], ""),
        (
            f"{label}: gateway-added p50/p99 ms",
            f"{lat['p50_ms']}/{lat['p99_ms']}",
            f"+ publishing interval {args.publishing_interval * 1000:.0f} ms",
        ),
        (f"{label}: simulator CPU (all processes)", r["simulator_cpu_fraction"], ""),
    ]
    params = {
        "processes": args.processes,
        "machines_per_process": args.machines,
        "publishing_interval_s": args.publishing_interval,
        "speed": args.speed,
        "window_s": args.window,
    }
    report(args.name, params, rows)


if __name__ == "__main__":
    main()
