"""Scale, Modbus: N simulated machines x M mapped signals at a poll interval, gateway measured.

The load simulator (one process, one port per device) serves the machines; the gateway runs
as its own process with a generated config and publishes to a private Mosquitto; this
process subscribes and counts. Gateway CPU and memory come from ``/proc/<gateway pid>``;
polls and missed deadlines from the request times the simulator recorded; latency from the
simulator's stamped order ids (``simulators/load.py``) against the subscriber's clock; the
gateway-added part (sample in hand -> PUBACK) from the gateway's own
``shopfloor_event_delivery_seconds`` histogram in /metrics, read before and after the window.

    python -m bench.scale_modbus --devices 200,500 --signals 20 --poll 1 --window 20
    python -m bench.scale_modbus --devices 500 --signals 30 --faulty 0.1   # with dead/stalling
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    check_profiler,
    cpu_seconds,
    delivery_buckets,
    delivery_times,
    free_port_range,
    gateway,
    load_sim,
    memory_kib,
    parse_time,
    poll_figures,
    raise_fd_limit,
    report,
    start_profiler,
    subscriber,
    summary_ms,
    wait_connected,
    write_config,
)
from bench.handover import summarise as summarise_handover
from bench.handover import table as handover_rows
from bench.stages import summarise as summarise_stages
from bench.stages import table as stage_rows
from shopfloor_gateway.simulators.load import LoadDevice, signal_map
from shopfloor_gateway.simulators.modbus_server import free_port
from tests.brokers import MosquittoBroker, VictoriaMetrics


async def run_one(
    devices: int,
    signals: int,
    poll: float,
    window: float,
    change_period: float,
    dead: float,
    stall: float,
    work: Path,
    profile: bool = False,
    settle: float | None = None,
    history: bool = False,
    stages: bool = False,
    handover: bool = False,
) -> dict[str, Any]:
    """One scenario; returns its figures."""
    stage_file = work / "stages.json" if stages else None
    handover_file = work / "handover.json" if handover else None
    broker = MosquittoBroker(work / "broker")
    broker.start()
    vm = VictoriaMetrics(work / "history") if history else None
    if vm is not None:
        vm.start()
    try:
        base = free_port_range(devices)
        health_port = free_port()
        args = [f"--devices={devices}", f"--signals={signals}", f"--base-port={base}"]
        args += [f"--change-period={change_period}", f"--dead={dead}", f"--stall={stall}"]
        latencies: list[float] = []
        added: list[float] = []
        measuring = [float("inf")]

        def on_event(arrived: float, event: dict[str, Any]) -> None:
            if event["short_type"] != "order.started":
                return
            order_id = str(event["data"]["order_id"])
            if not order_id.startswith("L"):
                return
            changed = int(order_id[1:]) / 1000
            if changed < measuring[0]:
                return  # a change from before the window (e.g. found at start-up)
            latencies.append(arrived - changed)
            added.append(arrived - parse_time(event["time"]))

        async with load_sim(work, *args) as sim:
            sample = LoadDevice("x", 1, signals=signals)
            config = write_config(
                work / "gateway.yaml",
                broker_port=broker.port,
                devices=sim.devices,
                signals=signal_map(sample),
                poll=poll,
                # Dead and stalled devices: a short timeout, like a commissioned site.
                timeout=0.5,
                history_url=vm.url if vm is not None else None,
                health_port=health_port,
            )
            ok = {d["name"] for d in sim.devices if d["mode"] == "ok"}
            async with (
                subscriber(broker.port, on_event) as arrivals,
                gateway(
                    config, work / "gateway.log", stages=stage_file, handover=handover_file
                ) as gw,
            ):
                up = await wait_connected(arrivals, ok, timeout=30 + devices * 0.05)
                if not up:
                    missing = sorted(ok - arrivals.connected)
                    raise RuntimeError(
                        f"{len(missing)} machines never connected ({missing[:5]}...); see {gw.log}"
                    )
                connected_after = time.time() - gw.started
                # Settle: every device past its first polls (unreachable ones: their reconnect
                # backoff grown to its cap, the steady state of a long outage).
                await asyncio.sleep(2 * poll + 1 if settle is None else settle)
                t0, c0, e0, m0 = (
                    time.time(),
                    cpu_seconds(gw.pid),
                    arrivals.events,
                    arrivals.messages,
                )
                s0 = cpu_seconds(sim.proc.pid)
                d0 = await delivery_buckets(health_port)
                measuring[0] = t0
                spy = await start_profiler(gw.pid, window, profile, work.name)
                await asyncio.sleep(window)
                t1, c1, e1, m1 = (
                    time.time(),
                    cpu_seconds(gw.pid),
                    arrivals.events,
                    arrivals.messages,
                )
                s1 = cpu_seconds(sim.proc.pid)
                d1 = await delivery_buckets(health_port)
                mem = memory_kib(gw.pid)
                if spy is not None:
                    await spy.wait()
        polls = poll_figures(sim.requests("ok"), poll, t0, t1)
    finally:
        broker.stop()
        if vm is not None:
            vm.stop()
    span = t1 - t0
    figures: dict[str, Any] = {
        "all_connected": up,
        "connected_after_s": round(connected_after, 2),
        "window_s": round(span, 2),
        "samples_per_s": round(polls["polls"] * signals / span, 1),
        "polls_per_s": round(polls["polls"] / span, 1),
        "cpu_fraction": round((c1 - c0) / span, 4),
        "rss_mib": round(mem["VmRSS"] / 1024, 1),
        "simulator_cpu_fraction": round((s1 - s0) / span, 4),
        "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
        "missed_deadlines": polls["missed_deadlines"],
        "poll_interval_ms": polls["interval"],
        "events_per_s": round((e1 - e0) / span, 1),
        "messages_per_s": round((m1 - m0) / span, 1),
        "latency_change_to_arrival": summary_ms(latencies),
        "latency_gateway_added": summary_ms(added),
        "latency_sample_to_puback": delivery_times(d0, d1),
        "tags_per_cpu_s": round(polls["polls"] * signals / max(c1 - c0, 1e-9)),
    }
    if stage_file is not None and stage_file.exists():
        figures["stages"] = summarise_stages(stage_file, t0, t1)
    if handover_file is not None and handover_file.exists():
        figures["handover"] = summarise_handover(handover_file, t0, t1)
    return figures


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="200,500", help="comma-separated machine counts")
    p.add_argument("--signals", type=int, default=20)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--window", type=float, default=20.0, help="measured seconds per scenario")
    p.add_argument("--change-period", type=float, default=20.0, help="order id change period")
    p.add_argument("--faulty", type=float, default=0.0, help="also run with this fraction faulty")
    p.add_argument(
        "--all-down",
        action="store_true",
        help="also run the largest size with every device dead or stalled (reconnect CPU)",
    )
    p.add_argument(
        "--history",
        action="store_true",
        help="also run the largest size with InfluxDB history on (victoria-metrics): "
        "every poll's telemetry written out",
    )
    p.add_argument(
        "--tmpfs",
        action="store_true",
        help="keep the outbox and every scenario file on /dev/shm, where fsync costs nothing: "
        "separates the disk's share of the gateway-added latency from the gateway's",
    )
    p.add_argument("--name", default="scale_modbus")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the gateway over the window (needs py-spy)"
    )
    p.add_argument(
        "--stages",
        action="store_true",
        help="time every event's stages, emission to PUBACK (bench.stages): where the "
        "gateway-added latency goes",
    )
    p.add_argument(
        "--handover",
        action="store_true",
        help="hand every event over at emission to a separate delivery process "
        "(bench.handover) and time it: what splitting delivery off the polling loop would give",
    )
    args = p.parse_args()
    check_profiler(p, args)
    if args.stages and args.handover:
        p.error("--stages and --handover each wrap the gateway; use one at a time")
    if args.handover and (args.history or args.faulty or args.all_down):
        # The delivery process carries MQTT only: no history sink, nothing to compare there.
        p.error("--handover measures the plain scenarios: no --history, --faulty or --all-down")
    raise_fd_limit()
    results: dict[str, Any] = {}
    rows: list[tuple[str, Any, str]] = []
    sizes = [int(n) for n in args.devices.split(",")]
    where = "/dev/shm" if args.tmpfs else None
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=where) as tmp:
        scenarios = [(n, 0.0, 0.0) for n in sizes]
        if args.faulty:
            scenarios.append((sizes[-1], args.faulty / 2, args.faulty / 2))
        for n, dead, stall in scenarios:
            label = f"{n}x{args.signals}" + (f"+{int(100 * (dead + stall))}%faulty" if dead else "")
            work = Path(tmp) / label
            work.mkdir()
            r = await_run(n, args, dead, stall, work)
            results[label] = r
            rows += [
                (f"{label} samples/s", r["samples_per_s"], ""),
                (f"{label} gateway CPU (1 core = 1)", r["cpu_fraction"], "<= 0.08 at 500x30 @1s"),
                (f"{label} RSS MiB", r["rss_mib"], "<= 100 at 500x30"),
                (f"{label} missed deadlines", r["missed_deadlines"], "0"),
                (f"{label} events/s", r["events_per_s"], ""),
                (f"{label} messages/s", r["messages_per_s"], ""),
                (f"{label} poll interval p99 ms", r["poll_interval_ms"]["p99_ms"], ""),
                (
                    f"{label} change->arrival p50/p99 ms",
                    f"{r['latency_change_to_arrival']['p50_ms']}/"
                    f"{r['latency_change_to_arrival']['p99_ms']}",
                    f"<= {args.poll * 500 + 5:.0f}/{args.poll * 1000 + 15:.0f}",
                ),
                (
                    f"{label} sample->subscriber p50/p99 ms",
                    f"{r['latency_gateway_added']['p50_ms']}/{r['latency_gateway_added']['p99_ms']}",
                    "",
                ),
                (
                    f"{label} gateway-added, sample->PUBACK p50/p99 ms",
                    f"{r['latency_sample_to_puback'].get('p50_ms')}/"
                    f"{r['latency_sample_to_puback'].get('p99_ms')}",
                    "p99 <= 5",
                ),
                (
                    f"{label} events acknowledged within 5 ms",
                    r["latency_sample_to_puback"].get("within_5ms"),
                    ">= 0.99",
                ),
                (f"{label} tags per CPU-second", r["tags_per_cpu_s"], ""),
                (f"{label} load simulator CPU", r["simulator_cpu_fraction"], ""),
            ]
            if "stages" in r:
                rows += stage_rows(r["stages"], label)
            if "handover" in r:
                rows += handover_rows(r["handover"], label)
        if args.history:
            label = f"{sizes[-1]}x{args.signals} with history"
            work = Path(tmp) / "history"
            work.mkdir()
            r = await_run(sizes[-1], args, 0.0, 0.0, work, history=True)
            results[label] = r
            rows += [
                (f"{label}: gateway CPU", r["cpu_fraction"], ""),
                (f"{label}: RSS MiB", r["rss_mib"], ""),
                (f"{label}: missed deadlines", r["missed_deadlines"], "0"),
            ]
        if args.all_down:
            label = f"{sizes[-1]}x{args.signals} all down"
            work = Path(tmp) / "all-down"
            work.mkdir()
            # Half refuse the connection, half accept it and never answer; measured once
            # every device's reconnect backoff has grown to its cap (30 s).
            r = await_run(sizes[-1], args, 0.5, 0.5, work, settle=40.0)
            results[label] = r
            rows += [
                (f"{label}: reconnect loops CPU", r["cpu_fraction"], "<= 0.01"),
                (f"{label}: RSS MiB", r["rss_mib"], ""),
            ]
    if len(sizes) >= 2:
        a, b = (f"{n}x{args.signals}" for n in sizes[-2:])
        per_dev = (results[b]["rss_mib"] - results[a]["rss_mib"]) * 1024 / (sizes[-1] - sizes[-2])
        rows.append(("memory per device KiB", round(per_dev, 1), "<= 50"))
        results["memory_per_device_kib"] = round(per_dev, 1)
    if args.faulty:
        base = results[f"{sizes[-1]}x{args.signals}"]["poll_interval_ms"]["p99_ms"]
        faulty = next(v for k, v in results.items() if "faulty" in k)["poll_interval_ms"]["p99_ms"]
        rise = 100 * (faulty - base) / base
        rows.append(("healthy devices' p99 interval rise %", round(rise, 2), "<= 5"))
    params = {
        "devices": args.devices,
        "signals": args.signals,
        "poll_s": args.poll,
        "window_s": args.window,
        "faulty": args.faulty,
        "outbox": "tmpfs" if args.tmpfs else "disk",
    }
    out = report(args.name, params, rows)
    # The full figures (with n and max of every distribution) next to the table.
    import json

    data = json.loads(out.read_text())
    data["scenarios"] = results
    out.write_text(json.dumps(data, indent=2))


def await_run(
    n: int,
    args: argparse.Namespace,
    dead: float,
    stall: float,
    work: Path,
    settle: float | None = None,
    history: bool = False,
) -> dict[str, Any]:
    """Run one scenario on a fresh event loop."""
    return asyncio.run(
        run_one(
            n,
            args.signals,
            args.poll,
            args.window,
            args.change_period,
            dead,
            stall,
            work,
            args.profile,
            settle,
            history,
            args.stages,
            args.handover,
        )
    )


if __name__ == "__main__":
    main()
