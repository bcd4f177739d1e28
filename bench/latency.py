"""Latency: value change on the device → event at a subscriber in another process.

The load simulator changes each device's order id on a jittered schedule and writes the
change's own wall-clock time into it (``L<epoch ms>``); the subscriber (this process) takes
its receive time minus that stamp. The gateway-added part is the receive time minus the
event's ``time``, which the gateway stamps when the poll's samples are in: it covers
mapping, tracker, envelope, outbox, publish and the broker's forwarding to the subscriber.

    python -m bench.latency --poll 0.1,1.0 --devices 20 --window 20
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from bench.common import raise_fd_limit, report
from bench.scale_modbus import run_one


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--poll", default="0.1,1.0", help="comma-separated poll intervals, s")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--signals", type=int, default=20)
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--changes-per-poll", type=float, default=0.2, help="change period = poll/x")
    args = p.parse_args()
    raise_fd_limit()
    rows: list[tuple[str, Any, str]] = []
    scenarios: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for poll in (float(x) for x in args.poll.split(",")):
            work = Path(tmp) / f"T{poll}"
            work.mkdir()
            # Several polls between changes, so every change is seen on its own.
            period = max(poll / args.changes_per_poll, 0.5)
            r = asyncio.run(
                run_one(args.devices, args.signals, poll, args.window, period, 0.0, 0.0, work)
            )
            scenarios[f"T={poll}"] = r
            e2e, added = r["latency_change_to_arrival"], r["latency_gateway_added"]
            ms = poll * 1000
            rows += [
                (f"T={poll}s changes measured", e2e["n"], ""),
                (f"T={poll}s change->arrival p50 ms", e2e["p50_ms"], f"<= {ms / 2 + 5:g}"),
                (f"T={poll}s change->arrival p99 ms", e2e["p99_ms"], f"<= {ms + 15:g}"),
                (f"T={poll}s change->arrival max ms", e2e["max_ms"], ""),
                (f"T={poll}s gateway-added p50 ms", added["p50_ms"], ""),
                (f"T={poll}s gateway-added p99 ms", added["p99_ms"], "<= 5 (at 500x30)"),
                (f"T={poll}s gateway CPU", r["cpu_fraction"], ""),
            ]
    out = report(
        "latency",
        {
            "devices": args.devices,
            "signals": args.signals,
            "poll": args.poll,
            "window_s": args.window,
        },
        rows,
    )
    import json

    data = json.loads(out.read_text())
    data["scenarios"] = scenarios
    out.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
