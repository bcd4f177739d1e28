"""Start-up: gateway process start → first event published, and import time.

    python -m bench.startup --devices 10 --runs 3

The first event is the subscriber's first ``.../event/...`` message (a machine's
``machine.connection.changed``), measured from just before the process is spawned. Import
time is a fresh interpreter importing what ``shopfloor run`` imports, best of ``--runs``;
``-X importtime`` names the heaviest packages.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    free_port_range,
    gateway,
    load_sim,
    raise_fd_limit,
    report,
    subscriber,
    write_config,
)
from shopfloor_gateway.simulators.load import LoadDevice, signal_map
from tests.brokers import MosquittoBroker

IMPORTS = "import " + ", ".join(
    (
        "gateway.cli.main",
        "gateway.runtime.gateway",
        "shopfloor_gateway.adapters.registry",
        "shopfloor_gateway.adapters.modbus.adapter",
    )
)


async def first_event(devices: int, work: Path) -> tuple[float, float]:
    """Seconds from spawn to the online status and to the first event at the subscriber."""
    broker = MosquittoBroker(work / "broker")
    broker.start()
    try:
        base = free_port_range(devices)
        async with load_sim(work, f"--devices={devices}", f"--base-port={base}") as sim:
            config = write_config(
                work / "gateway.yaml",
                broker_port=broker.port,
                devices=sim.devices,
                signals=signal_map(LoadDevice("x", 1)),
                poll=1.0,
            )
            async with (
                subscriber(broker.port) as arrivals,
                gateway(config, work / "gateway.log") as gw,
            ):
                async with asyncio.timeout(30):
                    while arrivals.first_event_at is None:
                        arrivals.changed.clear()
                        await arrivals.changed.wait()
                assert arrivals.first_status_at is not None
                return arrivals.first_status_at - gw.started, arrivals.first_event_at - gw.started
    finally:
        broker.stop()


def import_seconds() -> float:
    """Wall time of a fresh interpreter importing the daemon's modules (minus a bare start)."""

    def run(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        return time.perf_counter() - t

    return run(IMPORTS) - run("pass")


def heaviest_imports(top: int = 8) -> list[tuple[str, float]]:
    """Top-level packages by their modules' own import time (ms), from ``-X importtime``."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    per: Counter[str] = Counter()
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, raw = line[len("import time:") :].split("|")
        if not own.strip().isdigit():
            continue
        # Each module's own time, summed per top-level package: who the second goes to.
        per[raw.strip().split(".")[0]] += int(own)
    return [(k, round(v / 1000, 1)) for k, v in per.most_common(top)]


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    raise_fd_limit()
    starts: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            starts.append(asyncio.run(first_event(args.devices, work)))
    imports = min(import_seconds() for _ in range(args.runs))
    rows: list[tuple[str, Any, str]] = [
        ("spawn -> online status s (best)", round(min(s for s, _ in starts), 3), ""),
        ("spawn -> first event s (best)", round(min(e for _, e in starts), 3), "<= 5"),
        ("spawn -> first event s (worst)", round(max(e for _, e in starts), 3), "<= 5"),
        ("import time s (best)", round(imports, 3), ""),
    ]
    rows += [(f"  import {name} ms", ms, "") for name, ms in heaviest_imports()]
    report("startup", {"devices": args.devices, "runs": args.runs}, rows)


if __name__ == "__main__":
    main()
