"""Latency, OPC UA: value change on the simulated machine -> event at a subscriber elsewhere.

The CNC simulators run with ``--latency-probe PERIOD``: each machine's order id node changes
on a jittered schedule to ``L<epoch ms of the change>``, with that instant as SourceTimestamp.
The gateway (its own process) subscribes with the given sampling and publishing intervals,
turns each change into ``order.started`` and publishes it to a private Mosquitto; this process
subscribes and takes, per change:

- change -> arrival: receive time minus the ``L`` stamp (the goal: <= S + P + 15 ms);
- gateway-added: receive time minus the event's ``time`` (stamped when the adapter's batch
  reached the core: mapping, tracker, envelope, outbox, publish, broker forwarding).

As a reference, this process also subscribes to the same nodes with a plain asyncua client
(same intervals, the raw service-level callback) and takes change -> notification, split at
the server's PublishTime into the server's part (its sampling and publishing cycles; without
``--plc-sampling`` the asyncua server samples on write, so only the publishing interval
counts) and the transport + decoding part.
The gateway's change -> arrival minus the reference's, percentile by percentile, is what the
gateway adds on top of server and library (the two subscriptions publish on their own cycles,
so single changes cannot be paired, only distributions compared).

    python -m bench.latency_opcua --intervals 0.1:0.1,0.25:0.5,1:1 --window 30

``default`` as the sampling (``default:0.5``) leaves ``sampling_interval`` out of the
gateway's config, so the adapter's default is what is measured. ``--plc-sampling FASTEST``
makes the simulators sample each monitored item on a timer at the requested sampling
interval, as a PLC does (:mod:`simulators.opcua_sampling`), so the sampling interval counts:

    python -m bench.latency_opcua --intervals 0.5:0.5,default:0.5,0:0.5 --plc-sampling 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds

from bench.common import (
    check_profiler,
    cpu_seconds,
    free_port_range,
    gateway,
    parse_time,
    raise_fd_limit,
    report,
    start_profiler,
    subscriber,
    summary_ms,
    wait_connected,
)
from bench.scale_opcua import machine_id, write_config
from bench.scale_opcua import simulators as cnc_simulators
from shopfloor_gateway.adapters.opcua.config import sampling_for
from shopfloor_gateway.simulators import cnc
from tests.brokers import MosquittoBroker

#: Interval pairs (sampling, publishing) of issue #8, seconds.
DEFAULT_INTERVALS = "0.1:0.1,0.25:0.5,1.0:1.0"
#: Goal slack on top of sampling + publishing interval, seconds.
SLACK = 0.015


def stats(values: list[float]) -> dict[str, float]:
    """``summary_ms`` plus the mean: a uniform publishing wait makes percentiles of two
    subscriptions wander apart by several ms, the mean is the steadier comparison."""
    out = summary_ms(values)
    out["mean_ms"] = round(sum(values) / len(values) * 1000, 2) if values else float("nan")
    return out


def stamp_of(order_id: object) -> float | None:
    """Epoch seconds of an ``L<epoch ms>`` probe value; ``None`` for anything else."""
    if not isinstance(order_id, str) or not order_id.startswith("L"):
        return None
    digits = order_id[1:]
    return int(digits) / 1000 if digits.isdigit() else None


@dataclass(slots=True)
class Seen:
    """Probe changes seen by one path, keyed by ``(machine index, stamp)``."""

    #: (machine index, stamp) -> (arrival, a second instant: event time or PublishTime).
    changes: dict[tuple[int, float], tuple[float, float]] = field(default_factory=dict)

    def add(self, machine: int, stamp: float, arrival: float, other: float) -> None:
        """Keep the first arrival of a change (a replay after a reconnect is no new change)."""
        self.changes.setdefault((machine, stamp), (arrival, other))

    def within(self, start: float, end: float) -> dict[tuple[int, float], tuple[float, float]]:
        """Changes made in ``[start, end)``."""
        return {k: v for k, v in self.changes.items() if start <= k[1] < end}


# ------------------------------------------------------------------ processes


# ------------------------------------------------------------------ reference client


@contextlib.asynccontextmanager
async def reference(
    ports: list[int], sampling: float, publishing: float, seen: Seen
) -> AsyncIterator[None]:
    """A plain asyncua subscription to every machine's probe node, recorded into ``seen``.

    Uses the session's raw subscription callback (the PublishResult as decoded off the wire)
    so the server's PublishTime is at hand and no client-side queueing counts.
    """
    clients: list[Client] = []
    try:
        for index, port in enumerate(ports):
            client = await _connect(f"opc.tcp://127.0.0.1:{port}/")
            clients.append(client)
            ns = await client.get_namespace_index(cnc.CNC_NAMESPACE)
            # asyncua types NodeId fields with its own wrapper types; plain values are right.
            node_id = ua.NodeId(f"{cnc.ROOT_ID}/{cnc.K_JOB_ID}", ns)  # type: ignore[arg-type]
            params = ua.CreateSubscriptionParameters(
                RequestedPublishingInterval=publishing * 1000,
                RequestedLifetimeCount=600,
                RequestedMaxKeepAliveCount=max(1, round(5 / publishing)),
                MaxNotificationsPerPublish=0,
                PublishingEnabled=True,
                Priority=0,
            )
            result = await client.uaclient.create_subscription(params, _on_publish(index, seen))
            item = ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=node_id, AttributeId=AttributeIds.Value),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=1, SamplingInterval=sampling * 1000, QueueSize=10
                ),
            )
            created = await client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=result.SubscriptionId,
                    TimestampsToReturn=ua.TimestampsToReturn.Both,
                    ItemsToCreate=[item],
                )
            )
            if not created[0].StatusCode.is_good():
                raise RuntimeError(f"reference: cannot monitor on port {port}: {created[0]}")
        yield
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def _connect(url: str, attempts: int = 5) -> Client:
    """A connected asyncua client; a simulator still building its servers may drop a hello."""
    for attempt in range(1, attempts + 1):
        client = Client(url, timeout=10)
        client.session_timeout = 60_000  # ms; the server caps asyncua's default hour
        try:
            await client.connect()
            return client
        except (ConnectionError, OSError, TimeoutError):
            client.disconnect_socket()
            if attempt == attempts:
                raise
            await asyncio.sleep(0.5)  # retry pause against another process, not a test
    raise AssertionError("unreachable")


def _on_publish(index: int, seen: Seen) -> Callable[[ua.PublishResult], None]:
    """The raw publish callback of machine ``index``'s reference subscription."""

    def on_publish(result: ua.PublishResult) -> None:
        arrived = time.time()
        message = result.NotificationMessage
        published = message.PublishTime.timestamp()
        for data in message.NotificationData or ():
            if not isinstance(data, ua.DataChangeNotification):
                continue
            for item in data.MonitoredItems:
                variant = item.Value.Value if item.Value is not None else None
                stamp = stamp_of(variant.Value if variant is not None else None)
                if stamp is not None:
                    seen.add(index, stamp, arrived, published)

    return on_publish


# ------------------------------------------------------------------ one interval pair


async def run_pair(
    args: argparse.Namespace, configured: float | None, publishing: float, coalesce: float | None
) -> dict[str, Any]:
    """Measure one (sampling, publishing) pair; returns its figures.

    ``configured`` ``None`` leaves the sampling interval to the adapter's default;
    ``coalesce`` sets the adapter's ``coalesce`` (``None``: its default).
    """
    sampling = sampling_for(configured, publishing)
    n = args.processes * args.machines
    # At most one change per publishing cycle and machine: every change is measured alone.
    period = max(args.min_period, args.changes_every * publishing)
    gw_seen, ref_seen = Seen(), Seen()
    with tempfile.TemporaryDirectory(prefix="bench-latency-opcua-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker")
        broker.start()
        try:
            # Away from the other benchmarks' fixed start (21000): they may run alongside.
            base = free_port_range(n, first=random.randrange(30000, 60000))
            ports = list(range(base, base + n))
            index_of = {machine_id(i): i for i in range(n)}

            def on_event(arrived: float, event: dict[str, Any]) -> None:
                if event["short_type"] != "order.started":
                    return
                stamp = stamp_of(event["data"].get("order_id"))
                machine = index_of.get(event.get("subject", ""))
                if stamp is not None and machine is not None:
                    gw_seen.add(machine, stamp, arrived, parse_time(event["time"]))

            probe = [f"--latency-probe={period}"]
            if args.plc_sampling is not None:
                probe.append(f"--plc-sampling={args.plc_sampling}")
            async with cnc_simulators(
                work, args.processes, args.machines, base, args.speed, probe
            ) as sims:
                config = write_config(
                    work / "gateway.yaml",
                    broker_port=broker.port,
                    ports=ports,
                    sampling=configured,
                    publishing=publishing,
                    coalesce=coalesce,
                )
                async with (
                    subscriber(broker.port, on_event) as arrivals,
                    gateway(config, work / "gateway.log") as gw,
                    reference(ports, sampling, publishing, ref_seen),
                ):
                    names = {machine_id(i) for i in range(n)}
                    if not await wait_connected(arrivals, names, timeout=30 + n):
                        missing = sorted(names - arrivals.connected)
                        raise RuntimeError(
                            f"machines never connected: {missing[:5]}; see {gw.log}: "
                            + gw.log.read_text()[-2000:]
                        )
                    await asyncio.sleep(2 * publishing + 1)  # settle past the initial reads
                    t0, c0 = time.time(), cpu_seconds(gw.pid)
                    label = f"opcua-latency-S{sampling}-P{publishing}-C{coalesce}"
                    spy = await start_profiler(gw.pid, args.window, args.profile, label)
                    await asyncio.sleep(args.window)
                    t1, c1 = time.time(), cpu_seconds(gw.pid)
                    # Changes made up to t1 may still be on their way.
                    await asyncio.sleep(sampling + publishing + 2)
                    if spy is not None:
                        await spy.wait()
                    sim_cpu = sum(cpu_seconds(p.pid) for p in sims)
        finally:
            broker.stop()
    gw_changes = gw_seen.within(t0, t1)
    ref_changes = ref_seen.within(t0, t1)
    e2e = [arrival - stamp for (_, stamp), (arrival, _) in gw_changes.items()]
    added = [arrival - event_time for arrival, event_time in gw_changes.values()]
    ref = [arrival - stamp for (_, stamp), (arrival, _) in ref_changes.items()]
    ref_server = [published - stamp for (_, stamp), (_, published) in ref_changes.items()]
    ref_wire = [arrival - published for arrival, published in ref_changes.values()]
    return {
        "sampling_interval_s": sampling,
        "sampling_configured": configured is not None,
        "publishing_interval_s": publishing,
        "coalesce_s": coalesce,
        "plc_sampling_s": args.plc_sampling,
        "machines": n,
        "probe_period_s": period,
        "window_s": round(t1 - t0, 2),
        "changes_reference": len(ref_changes),
        "changes_gateway": len(gw_changes),
        "missed_by_gateway": len(set(ref_changes) - set(gw_changes)),
        "latency_change_to_arrival": stats(e2e),
        "latency_gateway_added": stats(added),
        "reference_change_to_notification": stats(ref),
        "reference_change_to_server_publish": stats(ref_server),
        "reference_publish_to_notification": stats(ref_wire),
        "gateway_cpu_fraction": round((c1 - c0) / (t1 - t0), 4),
        "simulator_cpu_s_total": round(sim_cpu, 1),
        "goal_p99_ms": round((sampling + publishing + SLACK) * 1000, 1),
    }


def parse_intervals(text: str) -> list[tuple[float | None, float]]:
    """``"0.1:0.1,default:0.5"`` -> ``[(0.1, 0.1), (None, 0.5)]``; raises ``ValueError``."""
    pairs: list[tuple[float | None, float]] = []
    for part in text.split(","):
        s, sep, p = part.partition(":")
        if not sep:
            raise ValueError(f"expected SAMPLING:PUBLISHING, got {part!r}")
        sampling = None if s.strip() == "default" else float(s)
        publishing = float(p)
        if not ((sampling is None or 0 <= sampling < 3600) and 0 < publishing < 3600):
            raise ValueError(f"intervals out of range in {part!r}")
        pairs.append((sampling, publishing))
    return pairs


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--intervals",
        default=DEFAULT_INTERVALS,
        help="SAMPLING:PUBLISHING,... (s); SAMPLING 'default' = the adapter's default",
    )
    p.add_argument("--processes", type=int, default=2, help="simulator processes")
    p.add_argument("--machines", type=int, default=5, help="machines per simulator process")
    p.add_argument("--window", type=float, default=30.0, help="measured seconds per pair")
    p.add_argument("--speed", type=float, default=1.0, help="scenario seconds per second")
    p.add_argument(
        "--changes-every", type=float, default=2.0, help="probe period = this x publishing"
    )
    p.add_argument("--min-period", type=float, default=0.5, help="shortest probe period, s")
    p.add_argument(
        "--coalesce",
        default="",
        help="comma-separated values of the adapter's coalesce (s) to run each pair with, "
        "one after the other (default: the adapter's default only)",
    )
    p.add_argument(
        "--plc-sampling",
        type=float,
        default=None,
        metavar="FASTEST",
        help="the simulators sample each monitored item on a timer at the requested sampling "
        "interval (at least FASTEST s), like a PLC; default: changes are reported as written",
    )
    p.add_argument("--name", default="latency_opcua")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway during each pair")
    args = p.parse_args()
    check_profiler(p, args)
    if args.processes < 1 or args.machines < 1 or args.window <= 0:
        p.error("--processes, --machines and --window must be positive")
    try:
        pairs = parse_intervals(args.intervals)
        coalesces = [float(x) for x in args.coalesce.split(",")] if args.coalesce else [None]
    except ValueError as exc:
        p.error(str(exc))
    raise_fd_limit()
    rows: list[tuple[str, Any, str]] = []
    scenarios: dict[str, Any] = {}
    runs = [(s, pub, c) for s, pub in pairs for c in coalesces]
    for sampling, publishing, coalesce in runs:
        r = asyncio.run(run_pair(args, sampling, publishing, coalesce))
        shown = "default" if sampling is None else f"{sampling:g}s"
        key = f"S={shown} P={publishing:g}s"
        if sampling is None:
            key += f" (={r['sampling_interval_s']:g}s)"
        if coalesce is not None:
            key += f" coalesce={coalesce:g}s"
        scenarios[key] = r
        e2e, added = r["latency_change_to_arrival"], r["latency_gateway_added"]
        ref = r["reference_change_to_notification"]
        server, wire = (
            r["reference_change_to_server_publish"],
            r["reference_publish_to_notification"],
        )
        goal = f"<= {r['goal_p99_ms']:g}"

        def trio(s: dict[str, float]) -> str:
            return f"{s['p50_ms']}/{s['p99_ms']}/{s['max_ms']}"

        rows += [
            (
                f"{key} changes (reference/gateway/missed)",
                f"{r['changes_reference']}/{r['changes_gateway']}/{r['missed_by_gateway']}",
                "",
            ),
            (f"{key} change->arrival p50/p99/max ms", trio(e2e), f"p99 {goal}"),
            (f"{key} change->arrival p99 ms", e2e["p99_ms"], goal),
            (f"{key} gateway-added (event time->arrival) ms", trio(added), ""),
            (f"{key} reference change->notification ms", trio(ref), "asyncua server+client"),
            (f"{key}   of which change->server publish ms", trio(server), "server cycle"),
            (f"{key}   of which publish->notification ms", trio(wire), "wire+decode"),
            (
                f"{key} gateway over reference mean/p50/p99 ms",
                f"{round(e2e['mean_ms'] - ref['mean_ms'], 2)}/"
                f"{round(e2e['p50_ms'] - ref['p50_ms'], 2)}/"
                f"{round(e2e['p99_ms'] - ref['p99_ms'], 2)}",
                "",
            ),
            (f"{key} gateway CPU (1 core = 1)", r["gateway_cpu_fraction"], ""),
        ]
    params = {
        "intervals": args.intervals,
        "machines": args.processes * args.machines,
        "processes": args.processes,
        "window_s": args.window,
        "speed": args.speed,
        "changes_every": args.changes_every,
        "coalesce": args.coalesce or "adapter default",
    }
    out = report(args.name, params, rows)
    data = json.loads(out.read_text())
    data["scenarios"] = scenarios
    out.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
