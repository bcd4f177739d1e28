"""History at full change: N Modbus devices x 30 telemetry tags, every value new every second.

The load that once froze the gateway: one profile of free telemetry registers (no state,
no counters), polled every second, all of them changing on every poll, the history sink on
(a private VictoriaMetrics through the InfluxDB v2 write API) with the ``influxdb:``
section's default batching. Measured per size over the window, from outside the gateway:

* gateway CPU (share of one core) and RSS, from ``/proc/<pid>``;
* polls and missed poll deadlines, from the requests the devices themselves recorded;
* points the database stored per second (``vm_rows_inserted_total{type="influx"}``), against
  the points the polls produced (devices x tags / interval): the sink keeps up when equal;
* telemetry the gateway dropped (``shopfloor_destination_dropped_total``), the event loop's
  stalls over a second and its lag in the last second, from its /metrics, read before and
  after the window only (rendering /metrics for hundreds of machines is not free).

    python -m bench.history --devices 500,1000 --window 20
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    cpu_seconds,
    free_port_range,
    gateway,
    load_sim,
    memory_kib,
    poll_figures,
    raise_fd_limit,
    report,
    subscriber,
    wait_connected,
    write_config,
)
from shopfloor_gateway.simulators.load import ADDR_TELEMETRY, FIXED_SIGNALS
from shopfloor_gateway.simulators.modbus_server import free_port
from tests.brokers import MosquittoBroker, VictoriaMetrics

TAGS = 30


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def _value(text: str, pattern: str) -> float:
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


async def stored_points(vm: VictoriaMetrics) -> float:
    """Rows the database stored through its InfluxDB endpoint so far."""
    text = await asyncio.to_thread(_get, vm.url + "/metrics")
    return _value(text, r'^vm_rows_inserted_total\{type="influx"\} (\S+)$')


async def gateway_figures(port: int) -> dict[str, float]:
    """Dropped telemetry and the loop's worst lag, from the gateway's /metrics.

    NaN when the gateway does not answer: a frozen event loop answers nothing.
    """
    try:
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return {"dropped": math.nan, "lag": math.nan, "stalls": math.nan}
    return {
        "dropped": _value(
            text,
            r'^shopfloor_destination_dropped_total\{destination="influxdb.telemetry"\} (\S+)$',
        ),
        "lag": _value(text, r"^shopfloor_event_loop_lag_seconds (\S+)$"),
        "stalls": _value(text, r"^shopfloor_event_loop_stalls_total (\S+)$"),
    }


async def run_one(devices: int, poll: float, window: float, work: Path) -> dict[str, Any]:
    """One size; returns its figures."""
    broker = MosquittoBroker(work / "broker")
    broker.start()
    vm = VictoriaMetrics(work / "history")
    vm.start()
    try:
        base = free_port_range(devices)
        health = free_port()
        args = [f"--devices={devices}", f"--signals={FIXED_SIGNALS + TAGS}", f"--base-port={base}"]
        async with load_sim(work, *args) as sim:
            # The reported config: free telemetry registers only, the history's own batching.
            config = write_config(
                work / "gateway.yaml",
                broker_port=broker.port,
                devices=sim.devices,
                signals={
                    f"t{i:02d}": {"address": ADDR_TELEMETRY + i, "type": "uint16"}
                    for i in range(TAGS)
                },
                poll=poll,
                history_url=vm.url,
                health_port=health,
                history_batch=None,
            )
            names = {d["name"] for d in sim.devices}
            async with subscriber(broker.port) as arrivals, gateway(config, work / "gw.log") as gw:
                if not await wait_connected(arrivals, names, timeout=30 + devices * 0.05):
                    raise RuntimeError(f"machines never connected; see {gw.log}")
                await asyncio.sleep(2 * poll + 3)
                t0, c0, p0 = time.time(), cpu_seconds(gw.pid), await stored_points(vm)
                g0 = await gateway_figures(health)
                # No scrape inside the window: rendering /metrics for 500 machines costs the
                # gateway CPU that is not the history's. Stalls are counted by the gateway.
                await asyncio.sleep(window)
                t1, c1, p1 = time.time(), cpu_seconds(gw.pid), await stored_points(vm)
                g1 = await gateway_figures(health)
                mem = memory_kib(gw.pid)
        polls = poll_figures(sim.requests("ok"), poll, t0, t1)
    finally:
        broker.stop()
        vm.stop()
    span = t1 - t0
    produced = polls["polls"] * TAGS / span
    return {
        "cpu_fraction": round((c1 - c0) / span, 4),
        "rss_mib": round(mem["VmRSS"] / 1024, 1),
        "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
        "polls_per_s": round(polls["polls"] / span, 1),
        "missed_deadlines": polls["missed_deadlines"],
        "points_produced_per_s": round(produced),
        "points_stored_per_s": round((p1 - p0) / span),
        "telemetry_dropped": _count(g1["dropped"] - g0["dropped"]),
        "loop_lag_last_s_ms": round(g1["lag"] * 1000, 1),
        "loop_stalls": _count(g1["stalls"] - g0["stalls"]),
        "metrics_answered": not math.isnan(g1["lag"]),
    }


def _count(value: float) -> int | str:
    return "no answer" if math.isnan(value) else int(value)


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="500,1000", help="comma-separated machine counts")
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--window", type=float, default=20.0, help="measured seconds per size")
    p.add_argument("--name", default="history")
    args = p.parse_args()
    raise_fd_limit()
    rows: list[tuple[str, Any, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        for n in [int(x) for x in args.devices.split(",")]:
            work = Path(tmp) / str(n)
            work.mkdir()
            r = asyncio.run(run_one(n, args.poll, args.window, work))
            label = f"{n}x{TAGS} all changing, history on"
            goal = n == 500
            rows += [
                (
                    f"{label}: gateway CPU (1 core = 1)",
                    r["cpu_fraction"],
                    "<= 0.10" if goal else "",
                ),
                (f"{label}: RSS MiB", r["rss_mib"], "<= 120" if goal else ""),
                (f"{label}: polls/s", r["polls_per_s"], f"{n / args.poll:g}"),
                (f"{label}: missed deadlines", r["missed_deadlines"], "0"),
                (f"{label}: points produced/s", r["points_produced_per_s"], ""),
                (
                    f"{label}: points stored/s",
                    r["points_stored_per_s"],
                    "= produced (15,000 at 500)" if goal else "= produced",
                ),
                (f"{label}: telemetry dropped", r["telemetry_dropped"], "0"),
                (f"{label}: event-loop lag, last second, ms", r["loop_lag_last_s_ms"], ""),
                (f"{label}: loop stalls > 1 s", r["loop_stalls"], "0"),
                (f"{label}: /metrics answered", r["metrics_answered"], "True"),
            ]
    report(args.name, vars(args), rows)


if __name__ == "__main__":
    main()
