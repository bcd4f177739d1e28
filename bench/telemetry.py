"""Tag telemetry over MQTT and Sparkplug B: N Modbus devices x 30 tags, all new every second.

The load of ``bench.history`` (one profile of free telemetry registers, polled every
second, every value changing on every poll), with the telemetry going to MQTT instead of a
database. Each mode runs side by side in one invocation, the same gateway process on the
same load, and the figures print in one table:

* ``off``: the baseline, polling and tracking only (the destination without ``telemetry``
  in its ``event_types``);
* ``every_poll``, ``on_change``, ``deadband`` (absolute 20: the load's values move 7 a
  second, so a value is due every third second): one destination admitting ``telemetry``,
  QoS 0, one JSON message per machine and poll;
* ``sparkplug``: no JSON telemetry, a ``format: sparkplug`` destination on the same broker
  instead (report by exception: one DDATA per machine and poll with what changed). The
  node alone, without the device reading, is measured by ``bench.sparkplug``.

Measured per size and mode over the window, from outside the gateway: gateway CPU (share of
one core) and RSS from ``/proc/<pid>``, telemetry messages (JSON telemetry, or Sparkplug
DDATA) and bytes per second as a subscriber on the broker received them (payload, and the
MQTT PUBLISH packet on the wire: fixed header, topic, payload), values (metrics) per second,
polls and missed deadlines from the requests the devices recorded, and telemetry dropped
from the gateway's /metrics.

    python -m bench.telemetry --devices 500,2000 --window 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import (
    PREFIX,
    RESULTS,
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
from gateway.delivery.sparkplug import codec
from shopfloor_gateway.simulators.load import ADDR_TELEMETRY, FIXED_SIGNALS
from shopfloor_gateway.simulators.modbus_server import free_port
from tests.brokers import MosquittoBroker

TAGS = 30
MODES = ("off", "every_poll", "on_change", "deadband", "sparkplug")
#: The Sparkplug B ids of the ``sparkplug`` mode.
SPB_GROUP, SPB_NODE = "bench", "gw-bench"
#: Absolute band of the deadband mode: the load's tags move 7 counts a second.
DEADBAND = 20


@dataclass(slots=True)
class Wire:
    """Telemetry as a subscriber received it."""

    messages: int = 0
    payload_bytes: int = 0
    packet_bytes: int = 0
    values: int = 0


def _packet_size(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH: fixed header, topic length and topic, payload."""
    remaining = 2 + len(topic.encode()) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3
    return 1 + length_bytes + remaining


@contextlib.asynccontextmanager
async def telemetry_counter(port: int, sparkplug: bool = False) -> AsyncIterator[Wire]:
    """Count every telemetry message on the broker (QoS 0, as it is published).

    ``sparkplug``: count the edge node's DDATA instead (its births and deaths are not the
    steady load), values as the metrics they carry.
    """
    wire = Wire()
    topic = (
        f"spBv1.0/{SPB_GROUP}/DDATA/{SPB_NODE}/+" if sparkplug else f"{PREFIX}/+/+/+/+/telemetry"
    )
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-tele-{os.getpid()}") as c:
        c.pending_calls_threshold = 1_000_000
        await c.subscribe(topic, qos=0)

        async def read() -> None:
            async for m in c.messages:
                payload = m.payload
                assert isinstance(payload, bytes | bytearray)
                wire.messages += 1
                wire.payload_bytes += len(payload)
                wire.packet_bytes += _packet_size(m.topic.value, bytes(payload))
                # Counting the values costs the reader, not the gateway.
                if sparkplug:
                    wire.values += len(codec.decode(bytes(payload)).metrics)
                else:
                    wire.values += payload.count(b'"quality"')

        task = asyncio.create_task(read(), name="bench-telemetry-counter")
        try:
            yield wire
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _dropped(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return float("nan")
    m = re.search(r"^shopfloor_destination_telemetry_dropped_total\{[^}]*\} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def telemetry_config(path: Path, mode: str) -> None:
    """Turn ``write_config``'s broker into a destination that admits telemetry, in ``mode``."""
    text = path.read_text()
    broker = re.search(r"^broker: \{(.*)\}$", text, re.M)
    assert broker is not None
    json_telemetry = mode not in ("off", "sparkplug")
    types = '["*", telemetry]' if json_telemetry else '["*"]'
    destination = (
        f"destinations:\n  - {{name: plant, {broker.group(1)}, routing: {{event_types: {types}}}}}"
    )
    if mode == "sparkplug":
        destination += (
            f"\n  - {{name: scada, {broker.group(1)}, format: sparkplug,"
            f" group_id: {SPB_GROUP}, edge_node_id: {SPB_NODE}}}"
        )
    rule = mode if json_telemetry else "every_poll"
    band = f", deadband: {DEADBAND}" if mode == "deadband" else ""
    text = text.replace(broker.group(0), destination)
    text = text.replace("profiles:\n", f"telemetry: {{publish: {rule}{band}}}\nprofiles:\n", 1)
    path.write_text(text)


async def run_one(
    devices: int, mode: str, poll: float, window: float, work: Path
) -> dict[str, Any]:
    """One size and mode; returns its figures."""
    broker = MosquittoBroker(work / "broker")
    broker.start()
    try:
        base = free_port_range(devices)
        health = free_port()
        args = [f"--devices={devices}", f"--signals={FIXED_SIGNALS + TAGS}", f"--base-port={base}"]
        async with load_sim(work, *args) as sim:
            config = write_config(
                work / "gateway.yaml",
                broker_port=broker.port,
                devices=sim.devices,
                signals={
                    f"t{i:02d}": {"address": ADDR_TELEMETRY + i, "type": "uint16"}
                    for i in range(TAGS)
                },
                poll=poll,
                health_port=health,
            )
            telemetry_config(config, mode)
            names = {d["name"] for d in sim.devices}
            async with (
                subscriber(broker.port) as arrivals,
                telemetry_counter(broker.port, sparkplug=mode == "sparkplug") as wire,
                gateway(config, work / "gw.log") as gw,
            ):
                if not await wait_connected(arrivals, names, timeout=30 + devices * 0.05):
                    raise RuntimeError(f"machines never connected; see {gw.log}")
                await asyncio.sleep(2 * poll + 3)
                d0 = await asyncio.to_thread(_dropped, health)
                t0, c0 = time.time(), cpu_seconds(gw.pid)
                w0 = Wire(wire.messages, wire.payload_bytes, wire.packet_bytes, wire.values)
                await asyncio.sleep(window)
                t1, c1 = time.time(), cpu_seconds(gw.pid)
                w1 = Wire(wire.messages, wire.payload_bytes, wire.packet_bytes, wire.values)
                mem = memory_kib(gw.pid)
                d1 = await asyncio.to_thread(_dropped, health)
        polls = poll_figures(sim.requests("ok"), poll, t0, t1)
    finally:
        broker.stop()
    span = t1 - t0
    return {
        "cpu_fraction": round((c1 - c0) / span, 4),
        "rss_mib": round(mem["VmRSS"] / 1024, 1),
        "polls_per_s": round(polls["polls"] / span, 1),
        "missed_deadlines": polls["missed_deadlines"],
        "messages_per_s": round((w1.messages - w0.messages) / span, 1),
        "values_per_s": round((w1.values - w0.values) / span),
        "payload_bytes_per_s": round((w1.payload_bytes - w0.payload_bytes) / span),
        "wire_bytes_per_s": round((w1.packet_bytes - w0.packet_bytes) / span),
        "dropped": d1 - d0,
    }


#: The goals of the issue at 500 devices: CPU over the baseline, share of one core.
CPU_GOALS = {"on_change": 0.05, "sparkplug": 0.06}


def side_by_side(n: int, poll: float, results: dict[str, dict[str, Any]]) -> str:
    """One size's modes in one table (Markdown, as docs/performance.md shows it)."""
    base = results.get("off")
    lines = [
        f"{n} devices x {TAGS} tags, every value changing every {poll:g} s:",
        "",
        "| mode | CPU % of a core | over `off` | RSS MiB | messages/s | values/s "
        "| bytes/s on the wire | dropped | missed polls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, r in results.items():
        over = (
            f"{100 * (r['cpu_fraction'] - base['cpu_fraction']):+.1f}"
            if base is not None and mode != "off"
            else ""
        )
        telemetry = mode != "off"
        lines.append(
            f"| {mode} | {100 * r['cpu_fraction']:.1f} | {over} | {r['rss_mib']:.0f} "
            f"| {r['messages_per_s']:,.0f} | {r['values_per_s']:,} "
            f"| {r['wire_bytes_per_s']:,} | {r['dropped']:g} | {r['missed_deadlines']} |"
            if telemetry
            else f"| {mode} | {100 * r['cpu_fraction']:.1f} | | {r['rss_mib']:.0f} | | | | "
            f"| {r['missed_deadlines']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--devices", default="500,2000", help="comma-separated machine counts")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--window", type=float, default=15.0, help="measured seconds per run")
    p.add_argument("--name", default="telemetry")
    args = p.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    raise_fd_limit()
    rows: list[tuple[str, Any, str]] = []
    tables: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        for n in [int(x) for x in args.devices.split(",")]:
            results: dict[str, dict[str, Any]] = {}
            for mode in modes:
                work = Path(tmp) / f"{n}-{mode}"
                work.mkdir()
                results[mode] = r = asyncio.run(run_one(n, mode, args.poll, args.window, work))
                print(json.dumps({"devices": n, "mode": mode, **r}), flush=True)
            tables.append(side_by_side(n, args.poll, results))
            base = results.get("off")
            goal = n == 500
            for mode, r in results.items():
                label = f"{n}x{TAGS} all changing, {mode}"
                rows += [
                    (f"{label}: gateway CPU (1 core = 1)", r["cpu_fraction"], ""),
                    (
                        f"{label}: RSS MiB",
                        r["rss_mib"],
                        "<= 100" if goal and mode == "on_change" else "",
                    ),
                    (f"{label}: polls/s", r["polls_per_s"], f"{n / args.poll:g}"),
                    (f"{label}: missed deadlines", r["missed_deadlines"], "0"),
                ]
                if mode == "off":
                    continue
                if base is not None:
                    rows.append(
                        (
                            f"{label}: CPU over telemetry off",
                            round(r["cpu_fraction"] - base["cpu_fraction"], 4),
                            f"<= {CPU_GOALS[mode]}" if goal and mode in CPU_GOALS else "",
                        )
                    )
                rows += [
                    (f"{label}: messages/s", r["messages_per_s"], ""),
                    (f"{label}: values/s", r["values_per_s"], ""),
                    (f"{label}: payload bytes/s", r["payload_bytes_per_s"], ""),
                    (f"{label}: wire bytes/s (MQTT PUBLISH)", r["wire_bytes_per_s"], ""),
                    (f"{label}: telemetry dropped", r["dropped"], "0"),
                ]
    report(args.name, vars(args), rows)
    table = "\n\n".join(tables)
    print("\n" + table)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
