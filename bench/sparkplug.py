"""Sparkplug B edge node: 500 (and 2,000) devices x 30 tags, every value changing every second.

    python -m bench.sparkplug --devices 500,2000 --seconds 20

Runs :class:`gateway.delivery.sparkplug.client.SparkplugNode` on uvloop in a child process
per device count, connected to a private Mosquitto, and feeds it each device's 30 mapped
samples once a second, the devices spread evenly over the second (as their polls are):
10 counters, 14 analog values, 3 booleans that toggle and 3 strings, all changed every
time, so every DDATA carries all 30 metrics. What it measures is the Sparkplug output
alone (report by exception, encoding, publishing at QoS 0); reading the devices is
measured by ``bench.acquisition``. Figures: CPU % of one core of the node (the child's
CPU less a second child that makes the same samples and feeds no node), RSS of the child,
DDATA messages/s and bytes/s on the wire (PUBLISH packets as written to the broker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.common import cpu_seconds, memory_kib, report
from gateway.core.model import Sample
from gateway.delivery.mqtt.publisher import BrokerSettings
from gateway.delivery.sparkplug.client import SparkplugNode, SparkplugSettings
from gateway.runtime import logs
from tests.brokers import MosquittoBroker

#: Scheduler ticks per second: each tick feeds 1/TICKS of the devices.
TICKS = 50
SIGNALS = 30


def _samples(device: str, n: int, now: float) -> list[Sample]:
    """The device's 30 samples of its ``n``-th poll: every value differs from the last."""
    out = [Sample(device, f"count_{i}", n * 10 + i, now) for i in range(10)]
    out += [Sample(device, f"analog_{i}", n * 0.5 + i * 0.001, now) for i in range(14)]
    out += [Sample(device, f"flag_{i}", (n + i) % 2 == 0, now) for i in range(3)]
    out += [Sample(device, f"text_{i}", f"step-{n}-{i}", now) for i in range(3)]
    return out


async def child(
    devices: int, seconds: float, warmup: float, port: int, *, feed_only: bool = False
) -> dict[str, Any]:
    """Feed the node for ``warmup`` + ``seconds``; measure over the last ``seconds``.

    ``feed_only``: make the same samples on the same schedule but give them to no node,
    the bench's own share of the CPU figure.
    """
    rss_before = memory_kib(os.getpid())["VmRSS"]
    node = SparkplugNode(
        SparkplugSettings(
            name="bench",
            broker=BrokerSettings(host="127.0.0.1", port=port, client_id="bench-edge"),
            group_id="bench",
            edge_node_id="edge-1",
        )
    )
    task = asyncio.create_task(node.run())
    names = [f"m{i:04d}" for i in range(devices)]
    polls = [0] * devices
    loop = asyncio.get_running_loop()
    start = loop.time()
    measured: dict[str, float] = {}
    tick = 0
    try:
        while True:
            # Always yield, also when behind: the node's pump runs on this loop too.
            await asyncio.sleep(max(0.0, start + tick / TICKS - loop.time()))
            now = time.time()
            for d in range(tick % TICKS, devices, TICKS):
                polls[d] += 1
                samples = _samples(names[d], polls[d], now)
                if not feed_only:
                    node.observe(names[d], samples)
            tick += 1
            elapsed = loop.time() - start
            if not measured and elapsed >= warmup:
                measured = {
                    "cpu": cpu_seconds(os.getpid()),
                    "wall": loop.time(),
                    "published": node.published,
                    "wire": node.wire_bytes,
                }
            if elapsed >= warmup + seconds:
                break
        wall = loop.time() - measured["wall"]
        cpu = cpu_seconds(os.getpid()) - measured["cpu"]
        mem = memory_kib(os.getpid())
        return {
            "cpu_percent": 100 * cpu / wall,
            "rss_mib": mem["VmRSS"] / 1024,
            "rss_added_mib": (mem["VmRSS"] - rss_before) / 1024,
            "msg_per_s": (node.published - measured["published"]) / wall,
            "bytes_per_s": (node.wire_bytes - measured["wire"]) / wall,
            "lost": node.lost,
            "held_dropped": node.node.held_dropped,
            "metrics_per_s": devices * SIGNALS,
        }
    finally:
        await node.close(timeout=2)
        task.cancel()


def _run_child(devices: int, port: int, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """One measurement in a fresh process (its own RSS, no earlier run's garbage)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sparkplug",
            "--child",
            str(devices),
            "--port",
            str(port),
            "--seconds",
            str(args.seconds),
            "--warmup",
            str(args.warmup),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=args.seconds + args.warmup + 60,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="500,2000", help="comma-separated device counts")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per count")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--feed-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    logs.configure("warning")
    if args.child:
        r = uvloop.run(
            child(args.child, args.seconds, args.warmup, args.port, feed_only=args.feed_only)
        )
        print(json.dumps(r))
        return
    rows: list[tuple[str, Any, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-sparkplug-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker")
        broker.start()
        try:
            for devices in (int(d) for d in args.devices.split(",")):
                r = _run_child(devices, broker.port, args)
                feed = _run_child(devices, broker.port, args, "--feed-only")
                goal = "<= 6%" if devices == 500 else ""
                net = r["cpu_percent"] - feed["cpu_percent"]
                rows += [
                    (f"{devices} devices: CPU % of one core, node", round(net, 1), goal),
                    (
                        f"{devices} devices: CPU %, whole bench process",
                        round(r["cpu_percent"], 1),
                        "",
                    ),
                    (f"{devices} devices: CPU %, feeding alone", round(feed["cpu_percent"], 1), ""),
                    (f"{devices} devices: RSS MiB", round(r["rss_mib"], 1), ""),
                    (
                        f"{devices} devices: RSS added by the node MiB",
                        round(r["rss_added_mib"], 1),
                        "",
                    ),
                    (f"{devices} devices: DDATA msg/s", round(r["msg_per_s"]), ""),
                    (f"{devices} devices: bytes/s on the wire", round(r["bytes_per_s"]), ""),
                    (f"{devices} devices: metrics/s fed", r["metrics_per_s"], ""),
                    (f"{devices} devices: messages lost", r["lost"], "0"),
                ]
        finally:
            broker.stop()
    report(
        "sparkplug",
        {"devices": args.devices, "signals": SIGNALS, "seconds": args.seconds},
        rows,
    )


if __name__ == "__main__":
    main()
