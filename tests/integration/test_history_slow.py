"""A history database slower than the load: memory bounded, oldest telemetry dropped, no event.

60 telemetry-only Modbus machines (30 changing registers, polled every 0.2 s: 9,000 points/s)
write their history to an endpoint that accepts 5,000 points/s (``tests.slowhistory``).
The gateway must keep polling at its rate, hold its memory, drop the oldest telemetry
first and count it, and still deliver every event to the history.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest

from bench.common import load_sim, memory_kib, poll_figures
from shopfloor_gateway.simulators.load import ADDR_TELEMETRY, FIXED_SIGNALS
from shopfloor_gateway.simulators.modbus_server import free_port
from tests.brokers import MosquittoBroker, Subscriber
from tests.gatewayproc import events, gateway_process
from tests.slowhistory import SlowHistory

pytestmark = pytest.mark.integration

DEVICES = 60
TAGS = 30
POLL = 0.2


def write_config(
    path: Path, broker: int, devices: list[dict[str, object]], url: str, health: int
) -> None:
    lines = [
        "gateway: {id: gw-slow, site: plant, topic_prefix: slow}",
        f"broker: {{host: 127.0.0.1, port: {broker}}}",
        "logging: {level: info, format: json}",
        f"health: {{listen: '127.0.0.1:{health}'}}",
        "profiles:",
        "  box:",
        "    protocol: modbus",
        f"    poll_interval: {POLL}",
        "    signals:",
    ]
    lines += [
        f"      t{i:02d}: {{address: {ADDR_TELEMETRY + i}, type: uint16}}" for i in range(TAGS)
    ]
    lines.append(
        f"influxdb: {{url: '{url}', org: o, bucket: b, batch_size: 200, flush_interval: 0.2,"
        " max_queue_mib: 0.5}"
    )
    lines.append("machines:")
    for i, d in enumerate(devices):
        lines.append(
            f"  - {{id: {d['name']}, area: hall, line: line-{i // 30}, profile: box,"
            f" connection: {{protocol: modbus, host: 127.0.0.1, port: {d['port']},"
            f" unit_id: {d['unit_id']}}}}}"
        )
    path.write_text("\n".join(lines) + "\n")


def metric(text: str, name: str, destination: str) -> float:
    m = re.search(rf'^{name}\{{destination="{re.escape(destination)}"\}} (\S+)$', text, re.M)
    assert m, f"{name}{{destination={destination}}} not in /metrics"
    return float(m.group(1))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


async def test_a_slow_history_drops_the_oldest_telemetry_not_events_nor_polls(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    health = free_port()
    args = [f"--devices={DEVICES}", f"--signals={FIXED_SIGNALS + TAGS}"]
    async with (
        SlowHistory(points_per_s=5000) as history,
        load_sim(tmp_path, *args) as sim,
        Subscriber(mosquitto.host, mosquitto.port, "slow/#") as sub,
    ):
        cfg = tmp_path / "gw.yaml"
        write_config(cfg, mosquitto.port, sim.devices, history.url, health)
        async with gateway_process(cfg, tmp_path / "gw.log") as proc:
            # Start-up, then a window in which the database falls behind for good.
            await sub.wait_for(lambda ms: len(events(ms)) >= DEVICES, timeout=30)
            await asyncio.sleep(3)
            rss_early = memory_kib(proc.pid)["VmRSS"]
            t0 = time.time()
            await asyncio.sleep(6)
            t1 = time.time()
            rss_late = memory_kib(proc.pid)["VmRSS"]
            text = await asyncio.to_thread(scrape, health)
            # Every event the platform got reaches the history too, behind the telemetry.
            wanted = {(e["subject"], e["sequence"]) for e in events(sub.messages)}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                stored = {
                    (s.tags["machine"], int(float(m.group(1))))
                    for s in list(history.lines)
                    if s.measurement in ("shopfloor_machine", "shopfloor_order")
                    and (m := re.search(r"(?:^|,)sequence=([0-9.]+)", s.field_text))
                }
                if wanted <= stored or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            newest = max(s.time_ms for s in history.lines if s.measurement == "shopfloor_telemetry")
    figures = poll_figures(sim.requests("ok"), POLL, t0, t1)
    assert figures["polls"] >= 0.9 * DEVICES * (t1 - t0) / POLL, figures
    assert figures["missed_deadlines"] <= 0.01 * DEVICES * (t1 - t0) / POLL, figures
    # The database took what it could; the rest of the telemetry was dropped and counted.
    assert history.points <= 5000 * (time.time() - t0 + 15)
    assert metric(text, "shopfloor_destination_dropped_total", "influxdb.telemetry") > 100
    assert metric(text, "shopfloor_destination_dropped_total", "influxdb") == 0
    assert wanted <= stored, sorted(wanted - stored)[:5]
    # Oldest first: what the database got last is fresh, not from the start of the backlog.
    assert newest / 1000 >= t1 - 4, (newest / 1000, t1)
    # Memory held: the bounded queue, not a growing one.
    assert rss_late - rss_early < 8 * 1024, (rss_early, rss_late)
