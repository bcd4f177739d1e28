"""Remake ``outbox-v1.db`` and ``outbox-v1.expected.json``: an outbox file of schema 1.

Schema 1 stored every event as its wire bytes (MQTT topic plus CloudEvents JSON). The file
and what that code sent from it are kept so the migration to typed records can be tested
against them (tests/unit/test_outbox_migration.py): every pending event must still go out
byte for byte as below, sequences and epoch kept, acknowledged rows not resent.

This script only works with the code of schema 1 (commit 84a4c48 and before); run it from
such a checkout::

    git worktree add /tmp/v1 84a4c48 && cd /tmp/v1 && python -m tests.data.make_outbox_v1 OUT_DIR

It writes four destinations: ``a`` (operator ``pass``), ``b`` (``pseudonymise`` with the
secret below), ``c`` (``drop``, batched) and the history sink ``influxdb``, two machines, a
few events each, some acknowledged by every destination (deleted), some by one or two
(pending for the others), and the machines' tracker states.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway.contract.envelope import Topics, encode_event, new_event_id
from gateway.core.model import Event, Location
from gateway.core.routing import Route
from gateway.delivery.influx.sink import envelope_point, to_line
from gateway.delivery.outbox import Entry, Outbox, OutboxQueue

DESTS = ["a", "b", "c", "influxdb"]
ROUTES = {
    "a": Route("a", operator="pass"),
    "b": Route("b", operator="pseudonymise"),
    "c": Route("c", operator="drop", batch=True),
}
SECRET = b"fixture-secret"
TOPICS = Topics(prefix="shopfloor", site="plant-a", gateway_id="gw-fixture")
BATCH_TOPIC = "shopfloor/plant-a/gateway/gw-fixture/batch"
LOCS = {
    "press-1": Location("plant-a", "assembly", "line-1", "press-1"),
    "robot-7": Location("plant-a", "welding", "line-2", "robot-7"),
}
T0 = 1_796_000_000.0  # 2026-11-30

#: (machine, type, seconds after T0, data); sequences count per machine from 1.
EVENTS: list[tuple[str, str, float, dict[str, Any]]] = [
    ("press-1", "machine.state.changed", 0.0, {"state": "idle", "previous": "offline"}),
    (
        "press-1",
        "order.started",
        1.2345,
        {
            "order_id": "PO-1",
            "operator": "anna",
            "started_at": T0 + 1.2345,
            "due": T0 + 3600,
            "quantity": 40,
        },
    ),
    ("robot-7", "machine.state.changed", 2.5, {"state": "running", "previous": "idle"}),
    ("press-1", "order.progress", 10.0, {"order_id": "PO-1", "good": 10, "percent": 25.0}),
    (
        "robot-7",
        "order.started",
        11.0,
        {"order_id": "PO-9", "operator": "bo", "started_at": T0 + 11.0, "note": "rush"},
    ),
    ("press-1", "order.progress", 20.5, {"order_id": "PO-1", "good": 20, "percent": 50.0}),
    (
        "robot-7",
        "machine.alarm.raised",
        21.0,
        {"code": "E42", "text": "gripper", "since": "x", "raised_at": T0 + 21.0},
    ),
    (
        "press-1",
        "order.completed",
        30.125,
        {
            "order_id": "PO-1",
            "good": 40,
            "scrap": 1,
            "started_at": T0 + 1.2345,
            "completed_at": T0 + 30.125,
            "operators": ["anna", "carl"],
            "shifts": [{"operator": "anna", "from_at": T0 + 1.0}],
        },
    ),
    ("robot-7", "machine.connection.changed", 31.0, {"connected": False, "reason": "timeout"}),
]

#: Seqs acknowledged per destination (a seq acknowledged by all four is deleted).
ACKED = {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3], "c": [1, 2], "influxdb": [1, 2, 3, 4]}


def entries() -> tuple[list[Entry], dict[str, dict[str, Any]]]:
    """The events as today's emit path makes them, and a tracker state per machine."""
    out: list[Entry] = []
    seqs: dict[str, int] = {}
    for i, (machine, type_, dt, data) in enumerate(EVENTS):
        seqs[machine] = seqs.get(machine, 0) + 1
        event = Event(machine, type_, T0 + dt, seqs[machine], data)
        loc = LOCS[machine]
        payload = encode_event(
            event,
            loc,
            gateway_id=TOPICS.gateway_id,
            event_id=new_event_id(event.time, 0x1234_5678_9ABC + i),
            epoch=EPOCH,
        )
        order_id = data.get("order_id")
        out.append(
            Entry(
                machine=machine,
                topic=TOPICS.event(loc, type_),
                payload=payload,
                destinations=frozenset(DESTS),
                event_type=type_,
                order_id=order_id if isinstance(order_id, str) else None,
                created=T0 + dt + 0.001,
            )
        )
    trackers = {m: {"sequence": n, "state": "running", "order": None} for m, n in seqs.items()}
    return out, trackers


EPOCH = 0  # set from the outbox once it is open


@contextlib.asynccontextmanager
async def running(path: Path) -> Any:
    ob = Outbox(path, DESTS, commit_window=0.0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        yield ob
    finally:
        await ob.flush()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


async def take_all(q: OutboxQueue, n: int) -> list[tuple[int, Any]]:
    ready = asyncio.Event()
    q.waker = ready.set
    got: list[tuple[int, Any]] = []
    async with asyncio.timeout(5):
        while len(got) < n:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            got.append(item)
    return got


async def write(path: Path) -> None:
    global EPOCH
    async with running(path) as ob:
        EPOCH = ob.epoch
        batch, trackers = entries()
        ob.append(batch, trackers)
        await ob.flush()
        for name, seqs in ACKED.items():
            ob.ack(name, seqs)
        await ob.flush()


async def expected(path: Path) -> dict[str, Any]:
    """What the code of schema 1 sends from ``path`` (read from a copy, nothing acked)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copy(path, copy)
        out: dict[str, Any] = {"wire": {}}
        async with running(copy) as ob:
            out["epoch"] = ob.epoch
            out["last_seq"] = ob.committed_upto
            out["trackers"] = ob.trackers
            for name in DESTS:
                route = ROUTES.get(name, Route(name))
                q = ob.queue(
                    route,
                    secret=SECRET,
                    batch_topic=BATCH_TOPIC if route.batch else None,
                    clock=lambda: T0 + 100,
                )
                q.start()
                pending = ob.backlog(name)
                msgs: list[Any] = []
                rows = 0
                async with asyncio.timeout(5):
                    while rows < pending:
                        (_key, msg), *_ = await take_all(q, 1)
                        msgs.append(msg)
                        rows += msg.payload.count(b'"specversion"')
                if name == "influxdb":
                    lines = [to_line(p) for m in msgs if (p := envelope_point(m.payload))]
                    out["history"] = lines
                else:
                    out["wire"][name] = [[m.topic, m.payload.decode(), m.qos] for m in msgs]
        return out


async def main(out_dir: Path) -> None:
    db = out_dir / "outbox-v1.db"
    for suffix in ("", "-wal", "-shm", "-reserve"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    await write(db)
    db.with_name(db.name + "-reserve").unlink(missing_ok=True)
    doc = await expected(db)
    doc["acked"] = ACKED
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    (out_dir / "outbox-v1.expected.json").write_text(text)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent))
