"""Outbox throughput, and draining a backlog into a live broker.

    python -m bench.outbox                       # make bench: live, backlog, drain of 200k
    python -m bench.outbox --drain               # drain 1,000,000 events, one per message
    python -m bench.outbox --drain 1000000 --batch 100   # ... and again in batch mode

*live* and *backlog* measure the outbox alone against an in-process consumer. *drain* is the
outage case of issue #8: an outbox file holding N events (40 machines, written through
:meth:`Outbox.append` exactly as the gateway writes them: real CloudEvents envelopes, tracker
states, group commits) is drained by the gateway's own :class:`MqttPublisher` reading the
destination's :class:`OutboxQueue` (wired as ``gateway/runtime.py`` wires it) into a private
Mosquitto, in a process of its own on uvloop, while a subscriber in a third process counts
every event (inside batches too), checks none is missing and counts duplicates. The drain
time runs from the publisher's start until the subscriber holds every event. Temporary files
go next to the current directory (fsync cost is this disk's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gateway.contract.envelope import Topics, new_event_id
from gateway.core.model import Event, Location
from gateway.core.routing import Route
from gateway.delivery.outbox import Entry, Outbox
from gateway.delivery.records import Record, wire_payload

PAYLOAD_PAD = "x" * 250  # an event envelope is ~350 bytes

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "bench"
SITE = "plant-b"
GATEWAY_ID = "gw-bench"
MACHINES = 40
TOPICS = Topics(prefix=PREFIX, site=SITE, gateway_id=GATEWAY_ID)
BATCH_TOPIC = f"{PREFIX}/{SITE}/gateway/{GATEWAY_ID}/batch"


def entry(n: int, type_: str) -> Entry:
    machine = f"m{n % 40}"
    order_id = f"PO-{n % 40}"
    record = Record(
        machine,
        type_,
        Location("site", "a", "l", machine),
        n,
        time.time(),
        {"order_id": order_id, "pad": PAYLOAD_PAD},
        f"{n:032x}",
        GATEWAY_ID,
        1,
        order_id,
    )
    return Entry(
        machine=machine,
        topic=f"b/site/a/l/{machine}/event/{type_}",
        payload=b"",
        destinations=frozenset({"a"}),
        event_type=type_,
        order_id=order_id,
        created=time.time(),
        record=record,
    )


async def live(path: Path, events: int, burst: int) -> tuple[float, float]:
    """Producer appends bursts of events (one tracker step each) while a consumer acks."""
    ob = Outbox(path, ["a"])
    await ob.open()
    writer = asyncio.create_task(ob.run())
    q = ob.queue(Route("a"))
    q.start()
    ready = asyncio.Event()
    q.waker = ready.set
    got = 0
    t0 = time.perf_counter()

    async def consume() -> None:
        nonlocal got
        while got < events:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            q.ack(item[0])
            got += 1

    consumer = asyncio.create_task(consume())
    for start in range(0, events, burst):
        step = [entry(n, "order.progress") for n in range(start, min(events, start + burst))]
        # As the gateway's emit path: each event encoded once (it must encode), that
        # encoding handed to the destinations' memo.
        encoded = [wire_payload(e.record) for e in step if e.record is not None]
        seqs = ob.append(step, {f"m{start % 40}": {"sequence": start}})
        for seq, payload in zip(seqs, encoded, strict=True):
            ob.encodings.prime(seq, payload)
        await asyncio.sleep(0)  # the loop stays free: the writer commits in its thread
    await ob.flush()
    t_in = time.perf_counter() - t0
    await consumer
    await ob.flush()
    t_out = time.perf_counter() - t0
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await ob.close()
    return events / t_in, events / t_out


async def backlog(path: Path, events: int) -> tuple[float, float]:
    """Fill a backlog with no consumer, then drain it; returns (fill s, drain s)."""
    ob = Outbox(path, ["a"], max_events=events * 2)
    await ob.open()
    writer = asyncio.create_task(ob.run())
    t0 = time.perf_counter()
    for start in range(0, events, 1000):
        ob.append([entry(n, "order.completed") for n in range(start, start + 1000)])
        await ob.flush()
    fill = time.perf_counter() - t0
    q = ob.queue(Route("a"))
    ready = asyncio.Event()
    q.waker = ready.set
    q.start()
    t0 = time.perf_counter()
    got = 0
    while got < events:
        item = q.take()
        if item is None:
            ready.clear()
            await ready.wait()
            continue
        q.ack(item[0])
        got += 1
    await ob.flush()
    drain = time.perf_counter() - t0
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await ob.close()
    return fill, drain


# ------------------------------------------------------------------ drain: fill


class _Machine:
    """A sewing station's event stream as its tracker emits it: an order cycle of events."""

    #: One order: started, state running, progress updates, completed, state idle.
    PROGRESS_PER_ORDER = 24

    def __init__(self, index: int, rng: random.Random) -> None:
        self.id = f"sew-{index:02d}"
        self.loc = Location(SITE, "hall", f"line-{index // 10:02d}", self.id)
        self.rng = rng
        self.seq = 0
        self.orders = 0
        self.good = 0
        self.step_in_order = 0
        self.order_id = ""
        self.started = 0.0

    def step(self, now: float) -> list[Event]:
        """The events of one tracker step (one or two, as a real step emits them)."""
        k = self.step_in_order
        self.step_in_order = (k + 1) % (self.PROGRESS_PER_ORDER + 2)
        if k == 0:
            self.orders += 1
            self.order_id = f"PO-2026-{self.orders:05d}-{self.id}"
            self.good = 0
            self.started = now
            return [
                self._event("order.started", now, order_id=self.order_id, target=500, due=None),
                self._event(
                    "machine.state.changed", now, state="running", previous="idle", reason=None
                ),
            ]
        if k <= self.PROGRESS_PER_ORDER:
            self.good += 20
            return [
                self._event(
                    "order.progress",
                    now,
                    order_id=self.order_id,
                    good=self.good,
                    scrap=self.good // 50,
                    target=500,
                    percent=round(100 * self.good / 500, 1),
                    rate_per_hour=812.5,
                    eta=now + 1800.0,
                    due=None,
                    started_at=self.started,
                )
            ]
        return [
            self._event(
                "order.completed",
                now,
                order_id=self.order_id,
                good=self.good,
                scrap=self.good // 50,
                target=500,
                reason="target_reached",
                started_at=self.started,
                completed_at=now,
                duration_s=round(now - self.started, 3),
            ),
            self._event(
                "machine.state.changed", now, state="idle", previous="running", reason=None
            ),
        ]

    def _event(self, type_: str, now: float, **data: Any) -> Event:
        self.seq += 1
        return Event(self.id, type_, now, self.seq, data)

    def state(self) -> dict[str, Any]:
        """A tracker state of the size the gateway stores with every step."""
        return {
            "version": 1,
            "machine": self.id,
            "sequence": self.seq,
            "state": "running",
            "order": {"order_id": self.order_id, "good": self.good, "scrap": self.good // 50},
            "queue": [],
            "counters": {"good_count": self.good, "scrap_count": self.good // 50},
        }


async def fill(path: Path, events: int, seed: int = 1) -> dict[str, Any]:
    """Write ``events`` events into a fresh outbox through :meth:`Outbox.append`.

    Each tracker step of each machine is one ``append`` with its tracker state, as the gateway
    makes it; the writer group-commits whatever gathered (every commit fsynced, as events
    are). Event times cover a ten-minute outage. Returns the expected sequences per machine.
    """
    rng = random.Random(seed)
    machines = [_Machine(i, rng) for i in range(MACHINES)]
    ob = Outbox(path, ["a"], max_events=max(1_000_000, events))
    await ob.open()
    writer = asyncio.create_task(ob.run(), name="outbox")
    t_event = time.time() - 600.0
    dt = 600.0 / events
    written = 0
    payload_bytes = 0
    i = 0
    try:
        while written < events:
            m = machines[i % MACHINES]
            i += 1
            evs = m.step(t_event)[: events - written]
            t_event += dt * len(evs)
            entries = []
            for ev in evs:
                order_id = ev.data.get("order_id")
                order_id = order_id if isinstance(order_id, str) else None
                # A typed record, as the gateway's emit path stores it (it encodes once too).
                record = Record(
                    m.id,
                    ev.type,
                    m.loc,
                    ev.sequence,
                    ev.time,
                    ev.data,
                    new_event_id(ev.time, rng.getrandbits(74)),
                    GATEWAY_ID,
                    None,
                    order_id,
                )
                payload_bytes += len(wire_payload(record))
                entries.append(
                    Entry(
                        machine=m.id,
                        topic=TOPICS.event(m.loc, ev.type),
                        payload=b"",
                        destinations=frozenset({"a"}),
                        event_type=ev.type,
                        order_id=order_id,
                        created=time.time(),
                        record=record,
                    )
                )
            ob.append(entries, {m.id: m.state()})
            written += len(evs)
            if i % 500 == 0:
                # The writer commits what gathered while we made more: group commit.
                await asyncio.sleep(0)
                if len(ob._pending) > 20_000:
                    await ob.flush()
        await ob.flush()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await ob.close()
    return {
        "expected": {m.id: m.seq for m in machines if m.seq},
        "payload_bytes_avg": round(payload_bytes / max(1, written)),
        "commits": ob.stats.commits,
    }


# ------------------------------------------------------------------ drain: gateway side


async def gateway_worker(db: Path, port: int, batch: int | None) -> dict[str, Any]:
    """Drain the outbox at ``db`` into the broker as the gateway does; return its figures."""
    from gateway.delivery.mqtt.publisher import BrokerSettings, MqttPublisher

    t_proc = time.time()
    ob = Outbox(db, ["a"], max_events=1_000_000)
    route = Route("a", batch=batch is not None)
    await ob.open()
    t_open = time.time()
    q = ob.queue(
        route,
        clock=time.time,
        delayed_after=5.0,
        batch_topic=BATCH_TOPIC if route.batch else None,
        batch_max=batch or 100,
    )
    settings = BrokerSettings(
        host="127.0.0.1",
        port=port,
        client_id=GATEWAY_ID,
        status_topic=TOPICS.status(),
        online_payload=b'{"state":"online"}',
        will_payload=b'{"state":"offline"}',
        offline_payload=b'{"state":"offline"}',
    )
    pub = MqttPublisher(settings, name="a", queue=q)
    q.waker = pub.notify
    cpu0 = os.times()
    backlog0 = ob.backlog("a")
    t0 = time.time()
    writer = asyncio.create_task(ob.run(), name="outbox")
    q.start()
    sender = asyncio.create_task(pub.run(), name="publisher[a]")
    try:
        # A benchmark may poll: nothing in the product waits this way.
        while ob.backlog("a") > 0 or q.in_flight:
            if writer.done() or sender.done():
                raise RuntimeError("the outbox or the publisher stopped")
            await asyncio.sleep(0.02)
        t_acked = time.time()
        await ob.flush()
        t_flushed = time.time()
        cpu1 = os.times()
    finally:
        await pub.close(timeout=5)
        sender.cancel()
        writer.cancel()
        for task in (sender, writer):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await ob.close()
    return {
        "t_process": t_proc,
        "open_s": round(t_open - t_proc, 3),
        "t_start": t0,
        "t_acked": t_acked,
        "t_flushed": t_flushed,
        "backlog": backlog0,
        "sent_rows": q.sent_rows,
        "cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
        "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "commits": ob.stats.commits,
        "stored_after": ob.stats.stored,
    }


# ------------------------------------------------------------------ drain: subscriber


def subscriber_worker(port: int, expected_file: Path) -> None:
    """Count every event on the bench topics (inside batches too) until SIGTERM.

    Prints ``ready`` once subscribed, ``complete`` with the time when every expected event
    arrived, and the final counts as JSON at the end.
    """
    import paho.mqtt.client as paho

    expected: dict[str, int] = json.loads(expected_file.read_text())
    want = sum(expected.values())
    seen = {m: bytearray(n + 1) for m, n in expected.items()}
    last = dict.fromkeys(expected, 0)
    counts = {
        "messages": 0,
        "events": 0,
        "distinct": 0,
        "duplicates": 0,
        "out_of_order": 0,
        "unexpected": 0,
        "delayed": 0,
        "batches": 0,
    }
    done = {"complete_at": None}
    stop = {"now": False}
    loads = json.loads

    def count(ev: dict[str, Any]) -> None:
        counts["events"] += 1
        m = ev.get("subject")
        s = ev.get("sequence")
        flags = seen.get(m) if isinstance(m, str) else None
        if flags is None or not isinstance(s, int) or not 0 < s < len(flags):
            counts["unexpected"] += 1
            return
        if ev.get("delayed") is True:
            counts["delayed"] += 1
        if flags[s]:
            counts["duplicates"] += 1
            return
        flags[s] = 1
        counts["distinct"] += 1
        if s < last[m]:
            counts["out_of_order"] += 1
        last[m] = s
        if counts["distinct"] == want:
            done["complete_at"] = time.time()
            print(json.dumps({"complete": done["complete_at"]}), flush=True)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        counts["messages"] += 1
        topic: str = msg.topic
        if topic.endswith("/status"):
            return
        body = loads(msg.payload)
        if topic == BATCH_TOPIC:
            counts["batches"] += 1
            for ev in body:
                count(ev)
        else:
            count(body)

    def on_subscribe(*_: Any) -> None:
        print(json.dumps({"ready": time.time()}), flush=True)

    def on_connect(client: Any, *_: Any) -> None:
        client.subscribe(f"{PREFIX}/#", qos=1)

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id="bench-drain-sub", clean_session=True
    )
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    client.connect("127.0.0.1", port, keepalive=60)
    while not stop["now"]:
        client.loop(timeout=0.2)
    client.disconnect()
    missing = want - counts["distinct"]
    print(json.dumps({"final": {**counts, "missing": missing, "expected": want}}), flush=True)


# ------------------------------------------------------------------ drain: orchestration


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.outbox", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _line(proc: subprocess.Popen[str], key: str) -> Any:
    """Next JSON line of ``proc`` carrying ``key`` (other lines are skipped)."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        with contextlib.suppress(ValueError):
            doc = json.loads(raw)
            if isinstance(doc, dict) and key in doc:
                return doc[key]
    raise RuntimeError(f"process {proc.args} ended before reporting {key!r}")


def drain_once(
    workdir: Path, db_template: Path, expected: Path, batch: int | None, profile: Path | None
) -> dict[str, Any]:
    """One drain: broker, subscriber, gateway worker on a copy of the filled outbox."""
    from tests.brokers import MosquittoBroker

    db = workdir / "drain.db"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (workdir / f"drain.db{suffix}").unlink()
    shutil.copyfile(db_template, db)
    os.chmod(db, 0o600)
    broker = MosquittoBroker(workdir / f"broker-{'batch' if batch else 'single'}")
    broker.start()
    sub = _spawn("--subscriber-worker", str(broker.port), str(expected))
    gw: subprocess.Popen[str] | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        _line(sub, "ready")
        args = ["--gateway-worker", str(db), str(broker.port)]
        if batch:
            args += ["--batch", str(batch)]
        gw = _spawn(*args)
        if profile is not None:
            from bench.common import PY_SPY_MISSING, py_spy

            exe = py_spy()
            if exe is None:
                raise RuntimeError(PY_SPY_MISSING)
            spy = subprocess.Popen(
                [
                    *(exe, "record", "--pid", str(gw.pid), "--rate", "250", "--format", "raw"),
                    *("--output", str(profile), "--nonblocking"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        result: dict[str, Any] = _line(gw, "result")
        gw.wait(30)
        # The gateway has every PUBACK; the subscriber may still be reading its socket.
        # Its lines are read on a thread: a non-blocking text pipe cannot be read portably.
        lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

        def pump() -> None:
            assert sub.stdout is not None
            for raw in sub.stdout:
                with contextlib.suppress(ValueError):
                    doc = json.loads(raw)
                    if isinstance(doc, dict):
                        lines.put(doc)

        reader = threading.Thread(target=pump, name="drain-subscriber-lines", daemon=True)
        reader.start()
        complete: float | None = None
        final: dict[str, Any] | None = None
        sub_deadline = time.time() + 30
        while complete is None and time.time() < sub_deadline:
            with contextlib.suppress(queue.Empty):
                doc = lines.get(timeout=0.2)
                if "complete" in doc:
                    complete = doc["complete"]
        sub.send_signal(signal.SIGTERM)
        final_deadline = time.time() + 30
        while final is None and time.time() < final_deadline:
            with contextlib.suppress(queue.Empty):
                doc = lines.get(timeout=0.2)
                if "final" in doc:
                    final = doc["final"]
        if final is None:
            raise RuntimeError("the subscriber did not report its final counts")
        sub.wait(10)
    finally:
        for p in (sub, gw):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if spy is not None:
            spy.wait(30)
        broker.stop()
    n = result["backlog"]
    end = complete if complete is not None else result["t_flushed"]
    drain_s = end - result["t_start"]
    return {
        **result,
        **final,
        "drain_s": round(drain_s, 2),
        "acked_s": round(result["t_acked"] - result["t_start"], 2),
        "complete": complete is not None,
        "events_per_s": round(n / drain_s),
        "messages_per_s": round((final["messages"] - 2) / drain_s),
    }


def drain(events: int, batches: list[int | None], profile: bool) -> list[tuple[str, Any, str]]:
    """Fill an outbox with ``events`` events once, drain a copy per mode; the table rows."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, Any, str]] = []
    with tempfile.TemporaryDirectory(dir=".", prefix="bench-drain-") as tmp:
        work = Path(tmp)
        template = work / "filled.db"
        t0 = time.perf_counter()
        filled = asyncio.run(fill(template, events))
        fill_s = time.perf_counter() - t0
        expected = work / "expected.json"
        expected.write_text(json.dumps(filled["expected"]))
        rows.append(("fill: s", round(fill_s, 1), ""))
        rows.append(("fill: events/s", round(events / fill_s), ""))
        rows.append(("fill: envelope bytes (mean)", filled["payload_bytes_avg"], "~350"))
        for batch in batches:
            mode = f"batch {batch}" if batch else "unbatched"
            label = f"drain-{events}-{'batch' if batch else 'single'}"
            spy = results / f"profile-{label}.txt" if profile else None
            r = drain_once(work, template, expected, batch, spy)
            goal = "<= 15" if batch else "<= 120"
            scale = 1_000_000 / events
            rows += [
                (f"{mode}: drain s", r["drain_s"], f"{goal} (at 1 M)"),
                (f"{mode}: drain s scaled to 1 M", round(r["drain_s"] * scale, 1), goal),
                (f"{mode}: all acknowledged after s", r["acked_s"], ""),
                (f"{mode}: events/s", r["events_per_s"], ""),
                (f"{mode}: messages/s", r["messages_per_s"], ""),
                (f"{mode}: outbox open s", r["open_s"], ""),
                (f"{mode}: gateway CPU s", r["cpu_s"], ""),
                (f"{mode}: gateway RSS peak MiB", r["rss_peak_mib"], "<= 100"),
                (f"{mode}: events received", r["events"], ""),
                (f"{mode}: missing", r["missing"], "0"),
                (f"{mode}: duplicates", r["duplicates"], ""),
                (f"{mode}: out of order (per machine)", r["out_of_order"], "0"),
                (f"{mode}: flagged delayed", r["delayed"], ""),
                (f"{mode}: rows left in outbox", r["stored_after"], "0"),
            ]
            if spy is not None:
                print(f"profile: {spy.relative_to(ROOT)}")
    return rows


def main() -> None:
    """Print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--burst", type=int, default=5, help="events per tracker step")
    p.add_argument("--backlog", type=int, default=200_000)
    p.add_argument(
        "--drain",
        type=int,
        nargs="?",
        const=1_000_000,
        default=None,
        help="only the drain scenario, with N events (default 1,000,000)",
    )
    p.add_argument("--batch", type=int, default=None, help="also drain in batch mode, K per batch")
    p.add_argument("--profile", action="store_true", help="py-spy the draining gateway")
    # Internal: the processes of the drain scenario.
    p.add_argument("--gateway-worker", nargs=2, metavar=("DB", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--subscriber-worker", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    from bench.common import check_profiler

    check_profiler(p, args)
    if args.gateway_worker:
        import uvloop

        from gateway.runtime import logs

        logs.configure("warning")
        db, port = args.gateway_worker
        result = uvloop.run(gateway_worker(Path(db), int(port), args.batch))
        print(json.dumps({"result": result}), flush=True)
        return
    if args.subscriber_worker:
        port, expected = args.subscriber_worker
        subscriber_worker(int(port), Path(expected))
        return
    if args.drain is not None:
        batches: list[int | None] = [None] + ([args.batch] if args.batch else [])
        rows = drain(args.drain, batches, args.profile)
        _report(args.drain, batches, rows)
        return
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        rate_in, rate_out = asyncio.run(live(Path(tmp) / "live.db", args.events, args.burst))
        print(f"live: {args.events} events, bursts of {args.burst}, every commit fsynced")
        print(f"  into the outbox (committed): {rate_in:,.0f} events/s")
        print(f"  through it (committed, read, acknowledged): {rate_out:,.0f} events/s")
        fill_s, drain_s = asyncio.run(backlog(Path(tmp) / "backlog.db", args.backlog))
        print(f"backlog: {args.backlog} events")
        print(f"  filled in {fill_s:.1f} s ({args.backlog / fill_s:,.0f} events/s)")
        print(f"  drained in {drain_s:.1f} s ({args.backlog / drain_s:,.0f} events/s)")
    # make bench: the drain at a size that fits a few minutes, both modes.
    batches = [None, args.batch or 100]
    rows = drain(200_000, batches, args.profile)
    _report(200_000, batches, rows)


def _report(events: int, batches: list[int | None], rows: list[tuple[str, Any, str]]) -> None:
    from bench.common import report

    params = {"events": events, "machines": MACHINES, "batch": batches[-1] or "off"}
    report("outbox_drain", params, rows)


if __name__ == "__main__":
    main()
