"""Outbox files of schema 1 (CloudEvents bytes per row) migrate to typed records on open.

The fixture (tests/data/outbox-v1.db) was written by the code of schema 1, and
outbox-v1.expected.json holds what that code sent from it; both are remade by
tests/data/make_outbox_v1.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.core.routing import Route
from gateway.delivery.influx.sink import record_point, to_line
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.outbox import SCHEMA_VERSION, Outbox, OutboxQueue, OutboxSchemaError
from gateway.delivery.records import Record

DATA = Path(__file__).resolve().parents[1] / "data"
EXPECTED: dict[str, Any] = json.loads((DATA / "outbox-v1.expected.json").read_text())
DESTS = ["a", "b", "c", "influxdb"]
ROUTES = {
    "a": Route("a", operator="pass"),
    "b": Route("b", operator="pseudonymise"),
    "c": Route("c", operator="drop", batch=True),
}
SECRET = b"fixture-secret"
BATCH_TOPIC = "shopfloor/plant-a/gateway/gw-fixture/batch"
NOW = 1_796_000_100.0


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    path = tmp_path / "outbox.db"
    shutil.copy(DATA / "outbox-v1.db", path)
    return path


def schema_of(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return str(db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0])


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[Outbox]:
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


async def take(q: OutboxQueue, rows: int) -> list[tuple[int, Any]]:
    """Take items until ``rows`` stored rows came out (a batch counts its rows)."""
    ready = asyncio.Event()
    q.waker = ready.set
    got: list[tuple[int, Any]] = []
    n = 0
    async with asyncio.timeout(5):
        while n < rows:
            item = q.take()
            if item is None:
                ready.clear()
                await ready.wait()
                continue
            got.append(item)
            payload = item[1].payload if isinstance(item[1], Message) else b""
            n += max(payload.count(b'"specversion"'), 1)
    return got


async def sent(ob: Outbox) -> dict[str, list[tuple[int, Any]]]:
    out = {}
    for name in DESTS:
        if name == "influxdb":
            q: OutboxQueue = ob.record_queue(Route(name), clock=lambda: NOW)
        else:
            route = ROUTES[name]
            batch = BATCH_TOPIC if route.batch else None
            q = ob.queue(route, secret=SECRET, batch_topic=batch, clock=lambda: NOW)
        q.start()
        out[name] = await take(q, ob.backlog(name))
        for key, _ in out[name]:
            q.ack(key)
    return out


async def test_pending_events_go_out_byte_identical_after_migration(v1: Path) -> None:
    assert schema_of(v1) == "1"
    with capture_logs() as logs:
        async with running(v1) as ob:
            assert ob.epoch == EXPECTED["epoch"]
            assert ob.committed_upto == EXPECTED["last_seq"]
            assert ob.trackers == EXPECTED["trackers"]
            got = await sent(ob)
    assert schema_of(v1) == str(SCHEMA_VERSION)
    migrated = [e for e in logs if e["event"] == "outbox.migrated"]
    assert migrated and migrated[0]["records"] == 7 and migrated[0]["opaque"] == 0
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    for name, expected in EXPECTED["wire"].items():
        wire = [[m.topic, m.payload.decode(), m.qos] for _, m in got[name]]
        assert wire == expected, name
    records = [r for _, r in got["influxdb"]]
    assert all(isinstance(r, Record) for r in records)
    assert [to_line(record_point(r)) for r in records] == EXPECTED["history"]
    # Everything acknowledged: nothing is sent again, and the sequence space is kept.
    async with running(v1) as ob:
        assert all(ob.backlog(name) == 0 for name in DESTS)
        assert ob.epoch == EXPECTED["epoch"]
        assert ob.committed_upto == EXPECTED["last_seq"]
        assert ob.trackers == EXPECTED["trackers"]


async def test_acknowledged_rows_are_not_resent(v1: Path) -> None:
    async with running(v1) as ob:
        backlog = {name: ob.backlog(name) for name in DESTS}
        got = await sent(ob)
    # Seqs 1..9: a destination gets exactly the rows it had not acknowledged.
    for name, acked in EXPECTED["acked"].items():
        assert backlog[name] == EXPECTED["last_seq"] - len(acked)
        keys = [key >> 20 for key, _ in got[name]]
        assert not set(keys) & set(acked)


async def test_records_carry_the_typed_payload(v1: Path) -> None:
    async with running(v1) as ob:
        (rows, _) = await ob.fetch("influxdb", 0, 100)
    by_seq = {r.seq: r.record for r in rows}
    completed = by_seq[8]
    assert completed is not None
    assert completed.type == "order.completed" and completed.sequence == 5
    assert completed.location.machine == "press-1" and completed.order_id == "PO-1"
    # Times are numbers again, at every depth; other strings stay strings.
    assert completed.data["completed_at"] == 1_796_000_030.125
    assert completed.data["shifts"][0]["from_at"] == 1_796_000_001.0
    alarm = by_seq[7]
    assert alarm is not None and alarm.data["since"] == "x"
    assert alarm.epoch == EXPECTED["epoch"]


def test_a_file_of_a_newer_schema_is_refused(v1: Path) -> None:
    with contextlib.closing(sqlite3.connect(v1)) as db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
        db.commit()
    before = v1.read_bytes()

    async def open_it() -> None:
        ob = Outbox(v1, DESTS)
        try:
            await ob.open()
        finally:
            await ob.close()

    with pytest.raises(OutboxSchemaError, match="schema 3, written by a newer gateway"):
        asyncio.run(open_it())
    assert v1.read_bytes() == before
    assert not list(v1.parent.glob("*.damaged-*"))


def test_a_crash_during_the_migration_leaves_a_file_that_opens(v1: Path) -> None:
    # A real crash: the process dies (no rollback, no close) after converting three rows.
    script = textwrap.dedent(
        f"""
        import asyncio, os
        import gateway.delivery.outbox as outbox
        real = outbox._record_from_v1
        calls = []
        def dying(*args):
            calls.append(1)
            if len(calls) > 3:
                os._exit(17)
            return real(*args)
        outbox._record_from_v1 = dying
        asyncio.run(outbox.Outbox({str(v1)!r}, {DESTS!r}).open())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 17, proc.stderr.decode()
    assert schema_of(v1) == "1"

    async def send_all() -> dict[str, list[tuple[int, Any]]]:
        async with running(v1) as ob:
            return await sent(ob)

    got = asyncio.run(send_all())
    assert schema_of(v1) == str(SCHEMA_VERSION)
    for name, expected in EXPECTED["wire"].items():
        assert [[m.topic, m.payload.decode(), m.qos] for _, m in got[name]] == expected


async def test_a_row_that_is_not_an_event_is_kept_as_stored(v1: Path) -> None:
    # Damage no gateway writes: a NaN (Python's JSON reads it) and bytes that are not JSON.
    with contextlib.closing(sqlite3.connect(v1)) as db:
        (payload,) = db.execute("SELECT payload FROM messages WHERE seq = 9").fetchone()
        nan = payload.replace(b'"connected":false', b'"connected":NaN')
        db.execute("UPDATE messages SET payload = ? WHERE seq = 9", (nan,))
        db.execute("UPDATE messages SET payload = ? WHERE seq = 8", (b"\xff not json",))
        db.commit()
    with capture_logs() as logs:
        async with running(v1) as ob:
            q = ob.queue(Route("a", operator="pass"), clock=lambda: NOW)
            q.start()
            got = [m for _, m in await take(q, 4)]
    assert [m.payload for m in got[-2:]] == [b"\xff not json", nan]
    inexact = [e for e in logs if e["event"] == "outbox.migration_inexact"]
    assert inexact and inexact[0]["opaque"] == 2


async def test_a_row_of_the_former_telemetry_class_is_kept_as_stored(v1: Path) -> None:
    # Schema 1 had a row class 0 for telemetry (no gateway wrote one) and an index over it.
    line = b'{"machine":"robot-7","values":{"temp":21.5}}'
    with contextlib.closing(sqlite3.connect(v1)) as db:
        assert db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'messages_telemetry'"
        ).fetchone()
        db.execute(
            "INSERT INTO messages VALUES (10, 1, 0, 'robot-7', NULL, ?, ?, 0, ?)",
            ("shopfloor/plant-a/welding/line-2/robot-7/telemetry", line, NOW - 50),
        )
        db.commit()
    with capture_logs() as logs:
        async with running(v1) as ob:
            assert ob.backlog("a") == len(EXPECTED["wire"]["a"]) + 1
            q = ob.queue(Route("a", operator="pass"), clock=lambda: NOW)
            q.start()
            got = [m for _, m in await take(q, ob.backlog("a"))]
    wire = [[m.topic, m.payload.decode(), m.qos] for m in got]
    assert wire == [
        *EXPECTED["wire"]["a"],
        ["shopfloor/plant-a/welding/line-2/robot-7/telemetry", line.decode(), 0],
    ]
    migrated = [e for e in logs if e["event"] == "outbox.migrated"]
    assert migrated and migrated[0]["records"] == 7 and migrated[0]["opaque"] == 1
    with contextlib.closing(sqlite3.connect(v1)) as db:
        assert not db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name"
            " IN ('messages_telemetry', 'messages_drop')"
        ).fetchone()
