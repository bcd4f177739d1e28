"""Delivery split off the polling loop: a second process fed at emission, measured.

``python -m bench.handover OUT.json run -c FILE`` runs the gateway as
``python -m gateway run -c FILE`` does, except that it no longer delivers events itself:
every event (with its tracker state) and every retained state message goes, the moment the
gateway produces it, over a Unix socket to a second process, the *delivery process*. That
process is built from the product's own parts: an :class:`~gateway.delivery.outbox.Outbox` next to
the gateway's (same disk, fsync on), an :class:`~gateway.delivery.outbox.OutboxQueue` and an
:class:`~gateway.delivery.mqtt.publisher.MqttPublisher` to the same broker and topics
(its own client id,
and its own status topic, ``<gateway id>-delivery``). It times every event from its emission
(``Entry.created``, the clock the gateway's own figure starts from) to its PUBACK, samples
its own CPU once a second, and writes both to OUT.json when the gateway closes the socket.

What the gateway process keeps is polling, mapping, tracking and encoding, plus a ``pickle``
and a ``send`` per emission; its own outbox and publisher stay idle (the publisher still
keeps the online status). The gateway's CPU plus the delivery process's is what the split
would cost; the delivery process's emission → PUBACK is what it would give. It is an
experiment, not a product mode: commands, restarts and reloads are not carried over.

``bench.scale_modbus --handover`` starts the gateway this way and prints :func:`summarise`
over its measuring window.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("!I")


# ------------------------------------------------------------------ gateway side


def _config_path(args: Sequence[str]) -> str:
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    raise SystemExit("bench.handover needs the gateway's -c FILE")


def install(sock: socket.socket) -> Callable[[], None]:
    """Hand every appended event and every retained state to ``sock`` instead of delivering."""
    from gateway.delivery.mqtt.publisher import MqttPublisher
    from gateway.delivery.outbox import Outbox

    submit = MqttPublisher.submit
    dumps = pickle.dumps
    pack = _HEADER.pack
    send = sock.sendall

    def frame(obj: Any) -> None:
        body = dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        send(pack(len(body)) + body)

    def forwarding_append(self: Outbox, entries: Any, trackers: Any = None) -> list[int]:
        events = [
            (e.machine, e.topic, e.payload, e.event_type, e.order_id, e.created, e.record)
            for e in entries
        ]
        if events or trackers:
            frame(("append", events, trackers))
        return []

    def forwarding_submit(self: MqttPublisher, msg: Any) -> None:
        if msg.retain and msg.topic.endswith("/state"):
            frame(("state", msg.topic, msg.payload))
        else:
            # The gateway's own status (online, backlog) stays with its own publisher.
            submit(self, msg)

    original = Outbox.append
    # The product's own methods, for a delivery process running in this same process (tests).
    forwarding_append.__wrapped__ = original  # type: ignore[attr-defined]
    forwarding_submit.__wrapped__ = submit  # type: ignore[attr-defined]
    Outbox.append = forwarding_append  # type: ignore[method-assign]
    MqttPublisher.submit = forwarding_submit  # type: ignore[method-assign]

    def undo() -> None:
        Outbox.append = original  # type: ignore[method-assign]
        MqttPublisher.submit = submit  # type: ignore[method-assign]

    return undo


def main(argv: Sequence[str] | None = None) -> int:
    """``OUT.json`` then the gateway's own arguments; ``--deliver`` runs the delivery process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--deliver":
        _, fd, out, config = args
        import uvloop

        # The gateway's end of the socket closing is what stops it, not a signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _write_results(uvloop.run(deliver(int(fd), Path(config))), Path(out))
        return 0
    if not args:
        raise SystemExit("usage: python -m bench.handover OUT.json run -c FILE")
    out = args.pop(0)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    delivery = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.handover",
            "--deliver",
            str(theirs.fileno()),
            out,
            _config_path(args),
        ],
        pass_fds=[theirs.fileno()],
        # Its own session: the benchmark's SIGTERM to the gateway does not reach it; the
        # closed socket ends it once the gateway has stopped producing.
        start_new_session=True,
    )
    theirs.close()

    def finish() -> None:
        ours.close()
        try:
            delivery.wait(timeout=20)
        except subprocess.TimeoutExpired:
            delivery.kill()

    atexit.register(finish)
    install(ours)
    from gateway.cli.main import main as gateway_main

    return gateway_main(args)


# ------------------------------------------------------------------ the delivery process


async def deliver(fd: int, config: Path) -> dict[str, Any]:
    """Deliver what arrives on socket ``fd`` as the gateway of ``config`` would, until EOF.

    Returns every event's ``(emitted, acknowledged)`` wall-clock times and the process's
    CPU seconds sampled once a second.
    """
    from gateway.config.loader import load_config
    from gateway.contract.envelope import Topics
    from gateway.delivery.mqtt.publisher import Message, MqttPublisher
    from gateway.delivery.outbox import Entry, Outbox
    from gateway.runtime.gateway import broker_settings, destinations, outbox_plan

    plan = load_config(config)
    dest = destinations(plan)[0]
    ob = outbox_plan(plan)
    topics = Topics(
        prefix=plan.topic_prefix, site=plan.site, gateway_id=f"{plan.gateway_id}-delivery"
    )
    settings = dataclasses.replace(
        broker_settings(plan, topics, time.time(), dest),
        client_id=f"{dest.broker.client_id}-delivery",
    )
    path = ob.path.with_name("delivery-outbox.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(path, [dest.name], max_events=ob.max_events)
    await outbox.open()
    queue = outbox.queue(dest.route, clock=time.time, delayed_after=ob.delayed_after)
    publisher = MqttPublisher(settings, name=dest.name, queue=queue)
    queue.waker = publisher.notify
    delivered: list[tuple[float, float]] = []  # (emitted, acknowledged)

    def observe(age: float) -> None:
        now = time.time()
        delivered.append((now - age, now))

    queue.on_delivered = observe
    append = getattr(Outbox.append, "__wrapped__", Outbox.append)
    submit = getattr(MqttPublisher.submit, "__wrapped__", MqttPublisher.submit)
    cpu: list[tuple[float, float]] = []
    names = frozenset([dest.name])

    async def sample_cpu() -> None:
        while True:
            r = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append((time.time(), r.ru_utime + r.ru_stime))
            await asyncio.sleep(1.0)

    async def read() -> None:
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
        try:
            while True:
                try:
                    head = await reader.readexactly(_HEADER.size)
                    body = await reader.readexactly(_HEADER.unpack(head)[0])
                except asyncio.IncompleteReadError:
                    return
                msg = pickle.loads(body)
                if msg[0] == "append":
                    _, events, trackers = msg
                    entries = [
                        Entry(
                            machine=m,
                            topic=t,
                            payload=p,
                            destinations=names,
                            event_type=et,
                            order_id=oid,
                            created=c,
                            record=r,
                        )
                        for m, t, p, et, oid, c, r in events
                    ]
                    append(outbox, entries, trackers)
                else:
                    submit(publisher, Message(msg[1], msg[2], 1, True))
        finally:
            writer.close()

    async with asyncio.TaskGroup() as tg:
        queue.start()
        background = [
            tg.create_task(outbox.run(), name="delivery-outbox"),
            tg.create_task(publisher.run(), name="delivery-publisher"),
            tg.create_task(sample_cpu(), name="delivery-cpu"),
        ]
        await read()
        # The gateway has stopped: what is in flight gets a moment to be acknowledged.
        await asyncio.sleep(0.5)
        for t in background:
            t.cancel()
    with contextlib.suppress(Exception):
        await publisher.close(timeout=2.0)
    await outbox.close()
    return {"delivered": delivered, "cpu": cpu, "path": str(path)}


def _write_results(results: dict[str, Any], out: Path) -> None:
    """The delivery process's figures (with its peak RSS) into ``out``; its outbox removed."""
    rss_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss_kib = int(line.split()[1])
    path = results.pop("path")
    out.write_text(json.dumps({**results, "rss_kib": rss_kib}))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(path + suffix)


# ------------------------------------------------------------------ figures


def summarise(path: Path, start: float, end: float) -> dict[str, Any]:
    """Delivery process: emission → PUBACK (ms) of events emitted in ``[start, end]``, CPU."""
    from bench.common import percentile  # not at import: this module runs in the gateway

    data = json.loads(path.read_text())
    times = [
        (ack - emitted) * 1000 for emitted, ack in data["delivered"] if start <= emitted <= end
    ]
    out: dict[str, Any] = {"events": len(times), "rss_mib": round(data["rss_kib"] / 1024, 1)}
    if times:
        out.update(
            p50_ms=round(percentile(times, 50), 2),
            p99_ms=round(percentile(times, 99), 2),
            max_ms=round(max(times), 2),
            within_5ms=round(sum(t <= 5 for t in times) / len(times), 4),
        )
    inside = [(t, c) for t, c in data["cpu"] if start <= t <= end]
    if len(inside) >= 2:
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        out["cpu_fraction"] = round((c1 - c0) / (t1 - t0), 4)
    return out


def table(summary: dict[str, Any], label: str) -> list[tuple[str, Any, str]]:
    """Rows for the benchmark's printed table."""
    rows: list[tuple[str, Any, str]] = []
    if "p99_ms" in summary:
        rows.append(
            (
                f"{label} delivery process, emitted->PUBACK p50/p99 ms",
                f"{summary['p50_ms']}/{summary['p99_ms']}",
                f"within 5 ms: {summary['within_5ms']:.2f}",
            )
        )
    if "cpu_fraction" in summary:
        rows.append(
            (
                f"{label} delivery process CPU / RSS MiB",
                f"{summary['cpu_fraction']}/{summary['rss_mib']}",
                "",
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
