"""One broker, many gateways: a plant split over gateway processes, read by a shared group.

The rehearsal of a plant that outgrew one gateway (``docs/scaling.md``): ``--gateways``
gateway processes (default 4) of ``--machines`` simulated Modbus stations each (default 125,
served over real TCP by one ``simulators.load`` process), all publishing into one Mosquitto,
and ``--consumers`` platform consumers (default 2, each its own process) sharing one MQTT 5
subscription ``$share/<group>/{prefix}/{site}/+/+/+/event/+`` with QoS 1 and a persistent
session. Every gateway has its own id, client id, area (its cells), state directory and
outbox, as ``docs/scaling.md`` says to split a plant; the machines change orders every few
seconds, so events flow fast.

After the window the gateways stop (SIGTERM: they flush what the broker has not
acknowledged), a plain subscriber reads every machine's retained ``.../state`` snapshot, and
the consumers' records are checked against the contract (``docs/contract.md``):

* **nothing lost**: for each machine and ``epoch`` the union of both consumers' sequences,
  deduplicated by event ``id``, is contiguous from 1 (consumers subscribe before the gateways
  start with empty state) up to the ``sequence`` of the machine's final retained snapshot;
* **per-machine order** within each consumer: each machine's sequences strictly increase
  in arrival order. MQTT promises order only per topic (and every event type has its own
  topic), and a shared subscription splits a machine's events between members, so order
  *across* consumers is never kept; within one member Mosquitto forwards in the order it
  received, which is what this measures;
* how often a machine's event reached one member before its predecessor reached the other
  (the order a shared group does not keep);
* each consumer's share, events/s through the group and per gateway, everything the
  gateways published per second, and the CPU (share of one core) and RSS of every gateway,
  the broker and the consumers over the window, from ``/proc``.

With ``--depart S`` the last consumer is killed halfway (no DISCONNECT) and resumes its
session S seconds later; the checks then also cover what the broker kept for it.

    python -m bench.scaling --gateways 4 --machines 125 --window 60 --depart 10

``python -m bench.scaling consume ...`` is the consumer process (paho-mqtt, MQTT 5, manual
acknowledgements: a message is written to its record file before its PUBACK goes out, so
whatever the broker counts as delivered is on disk, and what is not is the broker's to
redeliver).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import (
    PREFIX,
    ROOT,
    SITE,
    cpu_seconds,
    free_port_range,
    gateway,
    load_sim,
    memory_kib,
    parse_time,
    raise_fd_limit,
    report,
    subscriber,
)
from gateway.contract.envelope import SOURCE_PREFIX
from shopfloor_gateway.simulators.load import LoadDevice, signal_map
from tests.brokers import MosquittoBroker
from tests.gatewayproc import stop

GROUP = "platform"
#: What the platform's group subscribes to: every event of every machine of the site.
EVENTS = f"{PREFIX}/{SITE}/+/+/+/event/+"
STATES = f"{PREFIX}/{SITE}/+/+/+/state"
#: Session expiry of the consumers (s): long enough to outlive any pause in a run.
SESSION_EXPIRY = 3600


# ------------------------------------------------------------------ the consumer process


def consume(args: argparse.Namespace) -> int:
    """Run one shared-subscription consumer until SIGTERM; one JSON record per event."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    out = Path(args.out).open("a", encoding="utf-8")  # noqa: SIM115 - closed at exit
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    connect.SessionExpiryInterval = args.expiry
    # The broker sends at most this many unacknowledged messages: the in-flight window.
    connect.ReceiveMaximum = args.receive_max
    announced = False
    handled = 0

    def ready(session_present: bool) -> None:
        nonlocal announced
        if not announced:
            announced = True
            sys.stdout.write(json.dumps({"ready": True, "session_present": session_present}))
            sys.stdout.write("\n")
            sys.stdout.flush()

    def on_connect(c: mqtt.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        if reason.is_failure:
            sys.stderr.write(f"consumer {args.client_id}: connect refused: {reason}\n")
            return
        if flags.session_present:
            # The broker kept the subscription; subscribing again is not needed.
            ready(True)
        else:
            c.subscribe(args.topic, qos=1)

    def on_subscribe(_c: mqtt.Client, _u: object, _mid: int, codes: Any, _p: object) -> None:
        if any(code.is_failure for code in codes):
            sys.stderr.write(f"consumer {args.client_id}: subscription refused: {codes}\n")
            return
        ready(False)

    def on_message(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        now = time.time()
        try:
            e = json.loads(m.payload)
            record = {
                "t": now,
                "id": e["id"],
                "src": e["source"],
                "seq": e["sequence"],
                "ep": e.get("epoch"),
                "gw": e["gatewayid"],
                "et": e["time"],
                "dup": bool(m.dup),
            }
        except (ValueError, KeyError, TypeError) as exc:
            record = {"t": now, "bad": f"{m.topic}: {exc}"}
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        # On disk (the OS's buffers survive a killed process) before the PUBACK.
        out.flush()
        nonlocal handled
        handled += 1
        if args.delay:
            # A slow consumer on purpose: its share queues up at the broker.
            time.sleep(args.delay)
        if 0 <= args.hold_after < handled:
            # A consumer that hangs: recorded, never acknowledged, so its in-flight window
            # fills up and stays full (the broker sends nothing more until it is acknowledged).
            return
        c.ack(m.mid, m.qos)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    def leave(_sig: int, _frame: object) -> None:
        # A clean DISCONNECT: the session (and its queue) stays for SessionExpiryInterval.
        client.disconnect()

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    client.connect(
        "127.0.0.1",
        args.port,
        keepalive=30,
        clean_start=not args.resume,
        properties=connect,
    )
    client.loop_forever(retry_first_connection=False)
    out.close()
    return 0


@dataclass(slots=True)
class ConsumerProc:
    """A consumer process and the file it records into."""

    name: str
    proc: asyncio.subprocess.Process
    out: Path
    session_present: bool


async def start_consumer(
    name: str,
    port: int,
    out: Path,
    *,
    resume: bool = False,
    delay: float = 0.0,
    hold_after: int = -1,
    receive_max: int = 100,
    topic: str | None = None,
    expiry: int = SESSION_EXPIRY,
) -> ConsumerProc:
    """Start ``python -m bench.scaling consume`` and wait (bounded) until it is subscribed.

    ``resume``: reconnect to the session of an earlier process of the same ``name``.
    ``expiry``: the session expiry interval (s); 0 ends the session with the connection.
    ``hold_after``: acknowledge that many messages, then none (-1: all): a hung consumer.
    """
    cmd = [
        sys.executable,
        "-m",
        "bench.scaling",
        "consume",
        f"--port={port}",
        f"--client-id={name}",
        f"--topic={topic or f'$share/{GROUP}/{EVENTS}'}",
        f"--out={out}",
        f"--expiry={expiry}",
        f"--receive-max={receive_max}",
        f"--delay={delay}",
        f"--hold-after={hold_after}",
    ]
    if resume:
        cmd.append("--resume")
    err = out.with_suffix(".log")
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=err.open("ab"),
    )
    assert proc.stdout is not None
    started = time.monotonic()
    try:
        # Generous: a 2-core machine busy with a plant's gateways starts Python slowly.
        async with asyncio.timeout(60):
            line = await proc.stdout.readline()
    except TimeoutError:
        line = b""
    if not line:
        await stop(proc, 2)
        raise RuntimeError(
            f"consumer {name} did not subscribe within {time.monotonic() - started:.1f} s "
            f"(exit code {proc.returncode}): {err.read_text()}"
        )
    return ConsumerProc(name, proc, out, bool(json.loads(line)["session_present"]))


async def stop_consumer(consumer: ConsumerProc) -> None:
    """SIGTERM (a clean DISCONNECT), killed if it lingers."""
    await stop(consumer.proc, 5)


def read_records(path: Path) -> list[dict[str, Any]]:
    """A consumer's records in arrival order (a line cut short by a kill is skipped)."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


# ------------------------------------------------------------------ the checks


Key = tuple[str, Any, str]  # (gateway id, epoch, source)


@dataclass(slots=True)
class Verdict:
    """What the consumers' records say against the contract."""

    machines: int = 0
    events: int = 0
    duplicates: int = 0
    redelivered: int = 0
    bad: int = 0
    #: Missing sequences per machine (``source``): holes and a tail short of its snapshot.
    missing: dict[str, list[int]] = field(default_factory=dict)
    #: Machines whose first sequence (first epoch) was not 1.
    late_start: list[str] = field(default_factory=list)
    #: Per consumer: arrivals whose sequence was not above the one before (same machine).
    out_of_order: dict[str, int] = field(default_factory=dict)
    #: Per consumer: distinct events received.
    share: dict[str, int] = field(default_factory=dict)
    #: Machines with a retained snapshot and no event of its sequence.
    snapshot_ahead: list[str] = field(default_factory=list)
    #: Events that reached their member before the machine's previous event reached the
    #: other member (arrival times on one host): the order a shared group does not keep.
    across_members: int = 0

    @property
    def lost(self) -> int:
        """Sequences that never reached any consumer."""
        return sum(len(v) for v in self.missing.values())


def check(
    consumers: Mapping[str, Sequence[dict[str, Any]]],
    snapshots: Mapping[str, int] | None = None,
    *,
    from_start: bool = True,
) -> Verdict:
    """Check the records of a shared group: nothing lost, each member's per-machine order.

    ``consumers``: each member's records in arrival order. ``snapshots``: the ``sequence`` of
    each machine's final retained snapshot by ``source``, the end every machine's sequence
    must reach. ``from_start``: the group subscribed before the gateways started with empty
    state, so each machine's first epoch starts at sequence 1.

    Per the contract, sequences are compared within one ``(gatewayid, epoch)``: a new epoch
    starts afresh (its first sequence may continue the numbers or not).
    """
    v = Verdict()
    seen_ids: set[str] = set()
    union: dict[Key, set[int]] = defaultdict(set)
    #: First arrival of each (machine, sequence), and at which member.
    arrived: dict[tuple[Key, int], tuple[float, str]] = {}
    for name, records in consumers.items():
        mine: set[str] = set()
        last: dict[Key, int] = {}
        disorder = 0
        for r in records:
            if "bad" in r:
                v.bad += 1
                continue
            if r["id"] in mine:
                # A redelivery to the same member (after a reconnect): at least once.
                v.redelivered += 1
                continue
            mine.add(r["id"])
            if r["id"] in seen_ids:
                v.duplicates += 1
            seen_ids.add(r["id"])
            key = (r["gw"], r["ep"], r["src"])
            union[key].add(r["seq"])
            if (key, r["seq"]) not in arrived:
                arrived[key, r["seq"]] = (r["t"], name)
            if key in last and r["seq"] <= last[key]:
                disorder += 1
            last[key] = r["seq"]
        v.out_of_order[name] = disorder
        v.share[name] = len(mine)
    v.events = len(seen_ids)
    for (key, seq), (t, name) in arrived.items():
        before = arrived.get((key, seq - 1))
        if before is not None and before[1] != name and before[0] > t:
            v.across_members += 1
    by_machine: dict[str, list[Key]] = defaultdict(list)
    for key in union:
        by_machine[key[2]].append(key)
    v.machines = len(by_machine)
    for source, keys in by_machine.items():
        # Epochs only grow (Unix milliseconds); gateways older than epoch send none.
        keys.sort(key=lambda k: (k[1] is not None, k[1] or 0))
        missing: list[int] = []
        for i, key in enumerate(keys):
            seqs = union[key]
            first = 1 if (from_start and i == 0) else min(seqs)
            end = max(seqs)
            if i == len(keys) - 1 and snapshots is not None and source in snapshots:
                end = max(end, snapshots[source])
            missing += [s for s in range(first, end + 1) if s not in seqs]
        if from_start and min(union[keys[0]]) != 1:
            v.late_start.append(source)
        if missing:
            v.missing[source] = missing
    if snapshots is not None:
        v.snapshot_ahead = sorted(s for s in snapshots if s not in by_machine and snapshots[s])
    return v


async def retained_snapshots(port: int, machines: int, timeout: float = 20.0) -> dict[str, int]:  # noqa: ASYNC109
    """``source -> sequence`` of every machine's retained ``.../state`` snapshot.

    A plain (not shared) subscription: retained messages are never sent to a shared one.
    """
    found: dict[str, int] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-snap-{time.time_ns()}") as c:
        await c.subscribe(STATES, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for m in c.messages:
                    if not m.retain or not isinstance(m.payload, bytes) or not m.payload:
                        continue
                    s = json.loads(m.payload)
                    loc = s["location"]
                    source = "/".join(
                        [SOURCE_PREFIX, loc["site"], loc["area"], loc["line"], loc["machine"]]
                    )
                    found[source] = int(s["sequence"])
                    if len(found) >= machines:
                        break
    return found


def gateway_config(
    path: Path,
    *,
    gateway_id: str,
    area: str,
    broker_port: int,
    devices: Iterable[dict[str, Any]],
    poll: float,
    state_dir: Path,
    lines_of: int = 25,
) -> Path:
    """One gateway of the split plant: its own id, cells (``area``), state dir and outbox.

    The client id defaults to ``shopfloor-<gateway id>``; the prefix and site are the
    plant's, shared by every gateway.
    """
    signals = signal_map(LoadDevice("x", 1, signals=3))
    lines = [
        f"gateway: {{id: {gateway_id}, site: {SITE}, topic_prefix: {PREFIX}}}",
        f"state_dir: '{state_dir}'",
        f"broker: {{host: 127.0.0.1, port: {broker_port}, keepalive: 30}}",
        "logging: {level: info, format: json}",
        "tracker: {counter_mode: lifetime}",
        "health: {listen: null}",
        "profiles:",
        "  station:",
        "    protocol: modbus",
        f"    poll_interval: {poll}",
        "    signals:",
    ]
    lines += [f"      {name}: {json.dumps(sig)}" for name, sig in signals.items()]
    lines.append("machines:")
    for i, d in enumerate(devices):
        lines += [
            f"  - id: {d['name']}",
            f"    area: {area}",
            f"    line: line-{i // lines_of:02d}",
            "    profile: station",
            "    connection: {protocol: modbus, host: 127.0.0.1, "
            f"port: {d['port']}, unit_id: {d['unit_id']}, timeout: 1.0}}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ the rehearsal


def broker_pid(broker: MosquittoBroker) -> int:
    """The running broker's process id, for /proc (the test helper keeps it private)."""
    proc = broker._proc
    if proc is None:
        raise RuntimeError("the broker is not running")
    return proc.pid


@dataclass(slots=True)
class Plant:
    """The split plant: a broker, its gateways' configs and the load floor."""

    broker: MosquittoBroker
    configs: list[Path]
    machines: int


@contextlib.asynccontextmanager
async def floor(
    work: Path, gateways: int, machines: int, change_period: float, poll: float
) -> AsyncIterator[Plant]:
    """Broker and simulated stations for ``gateways`` x ``machines``; configs written."""
    broker = MosquittoBroker(work / "broker")
    broker.start()
    try:
        total = gateways * machines
        base = free_port_range(total)
        args = ["--devices", str(total), "--signals", "3", "--base-port", str(base)]
        args += ["--change-period", str(change_period)]
        async with load_sim(work, *args) as sim:
            configs = []
            for g in range(gateways):
                gid = f"gw-hall-{chr(ord('a') + g)}"
                mine = sim.devices[g * machines : (g + 1) * machines]
                d = work / gid
                d.mkdir()
                configs.append(
                    gateway_config(
                        d / "gateway.yaml",
                        gateway_id=gid,
                        area=f"hall-{chr(ord('a') + g)}",
                        broker_port=broker.port,
                        devices=mine,
                        poll=poll,
                        state_dir=d / "state",
                    )
                )
            yield Plant(broker, configs, total)
    finally:
        broker.stop()


async def wait_drained(
    consumers: Sequence[ConsumerProc],
    snapshots: Mapping[str, int],
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Wait (bounded) until the group holds every machine's events up to its snapshot."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                v = check({c.name: read_records(c.out) for c in consumers}, snapshots)
                if not v.missing and not v.snapshot_ahead:
                    return
                # Polling files another process appends to; nothing to wait on.
                await asyncio.sleep(0.2)


async def depart(
    consumers: list[ConsumerProc], port: int, seconds: float
) -> tuple[float, float, float]:
    """The last member departs without a word (SIGKILL) and returns to its session later.

    Returns when it left, when its new process was started and when that was subscribed;
    ``consumers`` then holds the new process.
    """
    leaver = consumers[-1]
    os.kill(leaver.proc.pid, signal.SIGKILL)
    await leaver.proc.wait()
    away = time.time()
    await asyncio.sleep(seconds)
    returning = time.time()
    back_again = await start_consumer(leaver.name, port, leaver.out, resume=True)
    consumers[-1] = back_again
    if not back_again.session_present:
        raise RuntimeError(f"{leaver.name}: the broker did not keep its session")
    return away, returning, time.time()


async def rehearse(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the plant for the window; return the figures."""
    async with floor(work, args.gateways, args.machines, args.change_period, args.poll) as plant:
        consumers = [
            await start_consumer(f"platform-{i + 1}", plant.broker.port, work / f"c{i + 1}.jsonl")
            for i in range(args.consumers)
        ]
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Everything the gateways publish (events, retained states, status), counted
                # by a plain subscriber in this process: the broker's inbound rate.
                everything = await stack.enter_async_context(subscriber(plant.broker.port))
                procs = [
                    await stack.enter_async_context(gateway(cfg, cfg.parent / "gateway.log"))
                    for cfg in plant.configs
                ]
                # Settle: every gateway connected its machines and saw first orders.
                await asyncio.sleep(args.settle)
                # The gateways, then the broker and the consumers.
                # (A member that departs is replaced by a new process: not measured.)
                staying = consumers[:-1] if args.depart else consumers
                pids = [p.pid for p in procs] + [broker_pid(plant.broker)]
                pids += [c.proc.pid for c in staying]
                t0, n0 = time.time(), everything.messages
                c0 = [cpu_seconds(pid) for pid in pids]
                if args.depart:
                    await asyncio.sleep((args.window - args.depart) / 2)
                    away, returning, back = await depart(consumers, plant.broker.port, args.depart)
                    await asyncio.sleep(max(0.0, t0 + args.window - time.time()))
                else:
                    await asyncio.sleep(args.window)
                t1, n1 = time.time(), everything.messages
                c1 = [cpu_seconds(pid) for pid in pids]
                mem = [memory_kib(pid) for pid in pids]
                # Leaving the stack: SIGTERM, each gateway flushes and says offline.
            unflushed = [
                cfg.parent.name
                for cfg in plant.configs
                if "mqtt.close_unflushed" in (cfg.parent / "gateway.log").read_text()
            ]
            snapshots = await retained_snapshots(plant.broker.port, plant.machines)
            await wait_drained(consumers, snapshots, timeout=30)
        finally:
            for c in consumers:
                await stop_consumer(c)
    records = {c.name: read_records(c.out) for c in consumers}
    verdict = check(records, snapshots)
    span = t1 - t0
    in_window = sum(
        1 for rs in records.values() for r in rs if "t" in r and t0 <= r["t"] <= t1 and "id" in r
    )
    names = [cfg.parent.name for cfg in plant.configs] + ["mosquitto"]
    names += [c.name for c in staying]
    processes = {
        name: {
            "cpu_fraction": round((b - a) / span, 4),
            "rss_mib": round(m["VmRSS"] / 1024, 1),
            "peak_rss_mib": round(m["VmHWM"] / 1024, 1),
        }
        for name, a, b, m in zip(names, c0, c1, mem, strict=True)
    }
    published: Counter[str] = Counter(
        r["gw"] for rs in records.values() for r in rs if "gw" in r and t0 <= r["t"] <= t1
    )
    for cfg in plant.configs:
        gid = cfg.parent.name
        processes[gid]["events_per_s"] = round(published[gid] / span, 1)
    total = max(verdict.events, 1)
    figures: dict[str, Any] = {
        "window_s": round(span, 2),
        "machines_with_events": verdict.machines,
        "snapshots": len(snapshots),
        "events": verdict.events,
        "events_per_s": round(in_window / span, 1),
        "messages_per_s": round((n1 - n0) / span, 1),
        "lost": verdict.lost,
        "lost_machines": sorted(verdict.missing)[:10],
        "late_start": len(verdict.late_start),
        "snapshot_without_events": len(verdict.snapshot_ahead),
        "duplicates_across_consumers": verdict.duplicates,
        "redelivered": verdict.redelivered,
        "overtaken_across_members": verdict.across_members,
        "unreadable": verdict.bad,
        "out_of_order": verdict.out_of_order,
        "share": {n: round(k / total, 4) for n, k in verdict.share.items()},
        "received": verdict.share,
        "processes": processes,
        "unflushed_at_stop": unflushed,
    }
    if args.depart:
        leaver = consumers[-1].name
        figures["departed"] = {
            "member": leaver,
            "away_s": round(back - away, 2),
            # Events that happened while no process of it ran, and reached it all the
            # same: what the broker kept in its session.
            "kept_for_it": sum(
                1 for r in records[leaver] if "et" in r and away < parse_time(r["et"]) < returning
            ),
            "redelivered_to_it": verdict.redelivered,
        }
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: the rehearsal, or ``consume`` (one consumer process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["consume"]:
        c = argparse.ArgumentParser(prog="bench.scaling consume")
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--client-id", required=True)
        c.add_argument("--topic", required=True)
        c.add_argument("--out", required=True)
        c.add_argument("--expiry", type=int, default=SESSION_EXPIRY)
        c.add_argument("--receive-max", type=int, default=100)
        c.add_argument("--delay", type=float, default=0.0)
        c.add_argument("--hold-after", type=int, default=-1)
        c.add_argument("--resume", action="store_true")
        return consume(c.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="bench.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--gateways", type=int, default=4)
    p.add_argument("--machines", type=int, default=125, help="machines per gateway")
    p.add_argument("--consumers", type=int, default=2, help="members of the shared group")
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--change-period", type=float, default=4.0, help="s between order changes")
    p.add_argument("--settle", type=float, default=15.0, help="s before the window starts")
    p.add_argument("--window", type=float, default=60.0, help="measured seconds")
    p.add_argument(
        "--depart",
        type=float,
        default=0.0,
        help="the last consumer is killed mid-window and returns to its session after this "
        "many seconds (0: nobody leaves)",
    )
    p.add_argument("--name", default="scaling")
    args = p.parse_args(argv)
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        r = asyncio.run(rehearse(args, Path(tmp)))
    label = f"{args.gateways}x{args.machines}"
    rows: list[tuple[str, Any, str]] = [
        (f"{label} machines with events", r["machines_with_events"], str(r["snapshots"])),
        (f"{label} events received (distinct)", r["events"], ""),
        (f"{label} events lost", r["lost"], "0"),
        (f"{label} machines not starting at sequence 1", r["late_start"], "0"),
        (f"{label} duplicates across consumers", r["duplicates_across_consumers"], ""),
        (f"{label} events/s through the group", r["events_per_s"], ""),
        (f"{label} messages/s from the gateways (all topics)", r["messages_per_s"], ""),
        (f"{label} gateways unflushed at stop", len(r["unflushed_at_stop"]), "0"),
    ]
    rows.append(
        (
            f"{label} events ahead of their predecessor at the other member",
            r["overtaken_across_members"],
            "not kept by MQTT",
        )
    )
    if "departed" in r:
        d = r["departed"]
        rows += [
            (f"{label} {d['member']} away (killed), s", d["away_s"], ""),
            (f"{label} events kept for it while away", d["kept_for_it"], "> 0"),
            (f"{label} in-flight events sent to it again", d["redelivered_to_it"], ""),
        ]
    for name, n in r["out_of_order"].items():
        rows.append((f"{label} {name} out-of-order arrivals", n, "0"))
    even = f"~{100 / args.consumers:.0f}"
    for name, share in r["share"].items():
        rows.append((f"{label} {name} share %", round(100 * share, 2), even))
    for name, g in r["processes"].items():
        rows.append((f"{label} {name} CPU % of one core", round(100 * g["cpu_fraction"], 2), ""))
        rows.append((f"{label} {name} RSS MiB", g["rss_mib"], ""))
        if "events_per_s" in g:
            rows.append((f"{label} {name} events/s", g["events_per_s"], ""))
    out = report(args.name, vars(args), rows)
    data = json.loads(out.read_text())
    data["run"] = r
    out.write_text(json.dumps(data, indent=2))
    return 0 if r["lost"] == 0 and not any(r["out_of_order"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
