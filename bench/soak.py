"""Soak test: the demo factory at full speed, faults injected, the broker restarted.

Runs simulated sewing stations behind fault proxies, a private Mosquitto and the gateway as
a subprocess (``python -m gateway run``), with a platform-like subscriber on a persistent
session. At the end it reports events emitted vs received, duplicates, the gateway's memory
(RSS) after warm-up and at the end, its CPU use, and the longest gap per machine.

    python -m bench.soak --duration 1200 --stations 10 --speed 20
    make soak SOAK_SECONDS=300

Exit status 0 when the checks hold (memory growth under 10%, no event lost), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from gateway.runtime import logs
from shopfloor_gateway.simulators.faultproxy import FaultProxy, parse_plan
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Subscriber
from tests.gatewayproc import start_gateway, stop

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "soak"
SITE = "soak-plant"
WARMUP = 30.0

#: Every station's link misbehaves once a minute, each at its own moment.
FAULTS: list[dict[str, Any]] = [
    {"at": 5, "fault": "latency", "seconds": 0.05, "duration": 10},
    {"at": 20, "fault": "stall", "duration": 4},
    {"at": 30, "fault": "late", "seconds": 0.8},
    {"at": 40, "fault": "drop", "count": 1, "direction": "down"},
    {"at": 50, "fault": "cut"},
]


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _tasks(health_port: int) -> int | None:
    """``shopfloor_asyncio_tasks`` from the gateway's /metrics (``None`` if unreadable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    match = re.search(r"^shopfloor_asyncio_tasks (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


def _config(
    path: Path, broker_port: int, ports: dict[str, int], poll: float, health_port: int
) -> None:
    lines = [
        f"gateway: {{id: gw-soak, site: {SITE}, topic_prefix: {PREFIX}}}",
        f"broker: {{host: 127.0.0.1, port: {broker_port}, keepalive: 5}}",
        f"health: {{listen: '127.0.0.1:{health_port}'}}",
        "logging: {level: info, format: json}",
        "tracker: {progress_step_percent: 10, progress_interval: 5}",
        "machines:",
    ]
    for i, (name, port) in enumerate(ports.items()):
        lines += [
            f"  - id: {name}",
            "    area: sewing",
            f"    line: line-{1 + i % 3}",
            "    profile: sewing-station",
            f"    poll_interval: {poll}",
            f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {port}, timeout: 0.5}}",
        ]
    path.write_text("\n".join(lines) + "\n")


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak and return the report."""
    work = Path(args.workdir)
    names = [f"sew-{i:02d}" for i in range(1, args.stations + 1)]
    stations = [
        StationSpec(n, free_port(), StationModel(None, seed=args.seed, name=n)) for n in names
    ]
    broker = MosquittoBroker(work / "mosquitto")
    broker.start()
    report: dict[str, Any] = {"duration_s": args.duration, "stations": args.stations}
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(SimulatedFloor(stations, speed=args.speed))
            proxies: dict[str, FaultProxy] = {}
            for i, s in enumerate(stations):
                # Stagger the plans so the faults do not hit every station at once.
                steps = [
                    {**f, "at": (f["at"] + i * 60 / len(stations)) % (59 - f.get("duration", 0))}
                    for f in FAULTS
                ]
                plan = parse_plan({"repeat_every": 60, "steps": steps})
                proxies[s.name] = await stack.enter_async_context(
                    FaultProxy("127.0.0.1", s.port, plan=plan, framing="modbus", name=s.name)
                )
            config = work / "gateway.yaml"
            health_port = free_port()
            ports = {n: p.port for n, p in proxies.items()}
            _config(config, broker.port, ports, args.poll, health_port)
            sub = await stack.enter_async_context(
                Subscriber(broker.host, broker.port, f"{PREFIX}/#", session="soak-platform")
            )
            log_path = work / "gateway.log"
            proc = await start_gateway(config, log_path)
            try:
                report.update(await _drive(args, proc, broker, health_port))
            finally:
                await stop(proc, 15)
            # Let the last acknowledged events reach the subscriber.
            await asyncio.sleep(2.0)
            report.update(_tally(sub, log_path))
            report["proxy"] = {
                n: {"dropped": p.state.dropped, "delayed": p.state.delayed, "cuts": p.stats.cuts}
                for n, p in proxies.items()
            }
    finally:
        broker.stop()
    report["workdir"] = str(work)
    growth = report["rss_end_kib"] / max(1, report["rss_start_kib"]) - 1
    report["rss_growth_percent"] = round(growth * 100, 1)
    report["ok"] = growth < 0.10 and report["missing"] == 0
    return report


async def _drive(
    args: argparse.Namespace,
    proc: asyncio.subprocess.Process,
    broker: MosquittoBroker,
    health_port: int,
) -> dict[str, Any]:
    """Let it run; restart the broker a few times; sample memory, CPU and the task count."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    warmup = min(WARMUP, args.duration / 5)
    await asyncio.sleep(warmup)
    rss_start, cpu_start, t_cpu = _rss_kib(proc.pid), _cpu_seconds(proc.pid), loop.time()
    tasks_start = await asyncio.to_thread(_tasks, health_port)
    tasks_seen = [] if tasks_start is None else [tasks_start]
    restarts = 0
    restart_every = (args.duration - warmup) / (args.broker_restarts + 1)
    next_restart = loop.time() + restart_every
    rss_peak = rss_start
    while loop.time() - started < args.duration:
        if proc.returncode is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        await asyncio.sleep(1.0)
        rss_peak = max(rss_peak, _rss_kib(proc.pid))
        if len(tasks_seen) < 10_000 and (n := await asyncio.to_thread(_tasks, health_port)):
            tasks_seen.append(n)
        if restarts < args.broker_restarts and loop.time() >= next_restart:
            broker.stop()
            await asyncio.sleep(3.0)  # an outage the gateway must ride out
            broker.start()
            restarts += 1
            next_restart += restart_every
    rss_end, cpu_end = _rss_kib(proc.pid), _cpu_seconds(proc.pid)
    wall = loop.time() - t_cpu
    tasks_end = await asyncio.to_thread(_tasks, health_port)
    return {
        # Device supervisors, publishers, listeners...: flat while nothing leaks.
        "asyncio_tasks_start": tasks_start,
        "asyncio_tasks_end": tasks_end,
        "asyncio_tasks_max": max(tasks_seen, default=None),
        "rss_start_kib": rss_start,
        "rss_end_kib": rss_end,
        "rss_peak_kib": rss_peak,
        "cpu_percent": round(100 * (cpu_end - cpu_start) / wall, 1),
        "broker_restarts": restarts,
    }


def _tally(sub: Any, log_path: Path) -> dict[str, Any]:
    """Events received, duplicates, gaps, and what the gateway says it emitted."""
    ids: set[str] = set()
    duplicates = 0
    seqs: dict[str, list[int]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)
    for m in sub.messages:
        if "/event/" not in m.topic:
            continue
        doc = json.loads(m.payload)
        if doc["id"] in ids:
            duplicates += 1
            continue
        ids.add(doc["id"])
        seqs[doc["subject"]].append(int(doc["sequence"]))
        times[doc["subject"]].append(_epoch(doc["time"]))
    emitted = None
    for line in log_path.read_text(errors="replace").splitlines():
        if '"gateway.stopped"' in line:
            emitted = json.loads(line).get("events")
    missing = 0
    for values in seqs.values():
        values.sort()
        missing += values[-1] - values[0] + 1 - len(set(values))
    gaps = {
        m: round(max((b - a for a, b in zip(sorted(t), sorted(t)[1:], strict=False)), default=0), 1)
        for m, t in times.items()
    }
    return {
        "events_emitted": emitted,
        "events_received": len(ids),
        "duplicates": duplicates,
        "missing": missing + (emitted - len(ids) if emitted is not None else 0),
        "sequence_holes": missing,
        "longest_gap_s": gaps,
    }


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.soak``."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds (default 1200)")
    parser.add_argument("--stations", type=int, default=10)
    parser.add_argument("--speed", type=float, default=20.0, help="simulation speed factor")
    parser.add_argument("--poll", type=float, default=0.2, help="poll interval in seconds")
    parser.add_argument("--broker-restarts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", help="keep logs here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    # The proxies and simulators log every injected fault; the report is what matters here.
    logs.configure("warning")
    # The simulated stations' pymodbus servers log every send the fault proxy's cuts broke
    # ("Cancel send, because not connected!"), with a hex dump: expected here, and noise.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="shopfloor-soak-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        # `make soak` writes var/soak.json, and var/ is not part of a fresh clone.
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
