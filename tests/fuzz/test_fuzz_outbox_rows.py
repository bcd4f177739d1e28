"""Fuzz: outbox rows read back after a crash or a bad disk (``gateway/outbox.py``).

A real outbox is written and its files are copied while it is open (the image a crash
leaves: database plus write-ahead log). The copy is then damaged the ways a crash or a bad
disk could: files truncated or bytes flipped at random offsets, or cells rewritten with plain
``sqlite3`` (wrong types, NULLs through a damaged schema, unknown destination bits, absurd
sequence numbers, tracker states that are not JSON or not a dict). Then the outbox is opened
again and every destination drained through its queue.

Property: opening fails with ``OutboxError`` naming the file, or it works, and then every
stored row for a destination is delivered (a topic string and payload bytes) or was dropped
at open; tracker states restore or fail with ``ValueError``. Never another exception type,
never a hang (every await is bounded).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import event, example, given
from hypothesis import strategies as st

from gateway.core.model import Location, Quality, Sample
from gateway.core.routing import Route
from gateway.core.tracker import MachineTracker, TrackerSettings
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.outbox import Entry, Outbox, OutboxError, OutboxQueue
from gateway.delivery.records import Record
from tests.fuzz import fuzz

DESTS = ("a", "b")
#: Seconds any one step may take: far above what a healthy run needs.
BOUND = 10.0
SETTINGS = TrackerSettings()


def _tracker_state(machine: str) -> dict[str, Any]:
    """A real exported state with an order and counts in it."""
    t = MachineTracker(machine, SETTINGS)
    now = 1000.0
    for sig, val in (("state", "running"), ("order_id", "PO-7"), ("good_count", 3)):
        t.observe([Sample(machine, sig, val, now, Quality.GOOD)], now)
        now += 1
    return t.export_state()


def _entry(n: int) -> Entry:
    kinds = ("order.started", "order.progress", "machine.alarm.raised", "machine.state.changed")
    kind = kinds[n % 4]
    body = {"n": n, "operator": "op-1", "started_at": 1000.0 + n}
    dests = (frozenset(DESTS), frozenset({"a"}), frozenset({"b"}))[n % 3]
    machine = f"m{n % 2}"
    order_id = "PO-7" if n % 2 else None
    record = None
    if n % 4 != 2:
        loc = Location("s", "a", "l", machine)
        record = Record(machine, kind, loc, n + 1, 1000.0 + n, body, f"id-{n}", "gw", 1, order_id)
    return Entry(
        machine=machine,
        topic=f"sf/s/a/l/{machine}/event/{kind}",
        # An opaque row (no record, as a schema-1 row that did not parse): sent as stored.
        payload=b"" if record else json.dumps(body, separators=(",", ":")).encode(),
        destinations=dests,
        event_type=kind,
        order_id=order_id,
        created=1000.0 + n,
        record=record,
    )


async def _write_image(folder: Path) -> None:
    """An outbox with rows and tracker states, copied as a crash would leave it."""
    ob = Outbox(folder / "live" / "outbox.db", DESTS, commit_window=0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        ob.append([_entry(n) for n in range(12)], {"m0": _tracker_state("m0")})
        await ob.flush()
        ob.append([_entry(n) for n in range(12, 20)], {"m1": _tracker_state("m1")})
        ob.ack("a", [1, 2, 3])
        await ob.flush()
        crash = folder / "crash"
        crash.mkdir()
        for f in (folder / "live").iterdir():
            if not f.name.endswith("-shm"):
                shutil.copy(f, crash / f.name)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


_IMAGE = Path(tempfile.mkdtemp(prefix="sf-outbox-fuzz-"))
atexit.register(shutil.rmtree, _IMAGE, ignore_errors=True)
asyncio.run(_write_image(_IMAGE))

# ---------------------------------------------------------------- damage

junk = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 2**62, 2**63 - 1, -(2**63)]),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
#: Tracker states a damaged or foreign file may hold.
state_texts = st.one_of(
    junk,
    st.just("{not json"),
    st.just(b"\xff\xfe{}"),
    st.just("[" * 3000),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=10,
    ).map(lambda v: json.dumps(v)),
)

COLUMNS = ("seq", "pending", "cls", "machine", "order_id", "topic", "payload", "qos", "created")
#: The typed record's columns (schema 2).
RECORD_COLUMNS = (
    "type",
    "location",
    "sequence",
    "epoch",
    "time",
    "event_id",
    "gateway_id",
    "customer",
    "data",
    "data_wire",
)
record_junk = st.one_of(
    junk,
    st.sampled_from(["a/b/c", "a/b/c/d/e", "{}", "[]", '{"started_at": 1e300}', '{"x": NaN}']),
)

sql_damage = st.one_of(
    st.tuples(st.just("cell"), st.sampled_from(COLUMNS), st.integers(1, 20), junk),
    st.tuples(st.just("cell"), st.sampled_from(RECORD_COLUMNS), st.integers(1, 20), record_junk),
    st.tuples(st.just("insert"), st.lists(junk, min_size=9, max_size=9)),
    st.tuples(st.just("tracker"), st.sampled_from(["m0", "m1"]), state_texts),
    st.tuples(st.just("tracker_key"), junk, state_texts),
    st.tuples(st.just("bit"), st.sampled_from(["a", "b", "ghost"]), junk),
    st.tuples(st.just("meta"), st.sampled_from(["last_seq", "schema"]), junk),
    st.tuples(st.just("loose_schema"), st.lists(junk, min_size=9, max_size=9)),
)

file_damage = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(["db", "wal"]), st.floats(0, 1)),
    st.tuples(
        st.just("flip"), st.sampled_from(["db", "wal"]), st.floats(0, 1), st.integers(1, 255)
    ),
)


#: A row of schema 1's columns only (the record columns stay NULL: an opaque row).
_INSERT_V1_COLUMNS = f"INSERT INTO messages ({','.join(COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?)"


def _apply_sql(db: sqlite3.Connection, op: tuple[Any, ...]) -> None:
    """One cell-level change; constraint violations are what SQLite itself prevents."""
    kind = op[0]
    with contextlib.suppress(sqlite3.IntegrityError, OverflowError):
        if kind == "cell":
            _, column, seq, value = op
            db.execute(f"UPDATE messages SET {column} = ? WHERE seq = ?", (value, seq))
        elif kind == "insert":
            db.execute(
                f"INSERT INTO messages ({','.join(COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?)", op[1]
            )
        elif kind == "tracker":
            db.execute("UPDATE trackers SET state = ? WHERE machine = ?", (op[2], op[1]))
        elif kind == "tracker_key":
            db.execute("INSERT OR REPLACE INTO trackers VALUES (?, ?)", (op[1], op[2]))
        elif kind == "bit":
            db.execute("INSERT OR REPLACE INTO destinations VALUES (?, ?)", (op[1], op[2]))
        elif kind == "meta":
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (op[1], op[2]))
        elif kind == "loose_schema":
            # A damaged schema: the same table without its NOT NULL constraints.
            db.executescript(
                "ALTER TABLE messages RENAME TO old;"
                "CREATE TABLE messages (seq INTEGER PRIMARY KEY, pending, cls, machine,"
                " order_id, topic, payload, qos, created, type, location, sequence, epoch,"
                " time, event_id, gateway_id, customer, data, data_wire);"
                "INSERT INTO messages SELECT * FROM old; DROP TABLE old;"
            )
            db.execute(
                f"INSERT INTO messages ({','.join(COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?)", op[1]
            )


def _apply_file(folder: Path, op: tuple[Any, ...]) -> None:
    path = folder / ("outbox.db" if op[1] == "db" else "outbox.db-wal")
    if not path.exists():
        return
    size = path.stat().st_size
    at = int(op[2] * size)
    if op[0] == "truncate":
        with path.open("r+b") as f:
            f.truncate(at)
    elif size:
        at = min(at, size - 1)
        with path.open("r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ op[3]]))


def _damage(folder: Path, sql: list[tuple[Any, ...]], files: list[tuple[Any, ...]]) -> None:
    for name in ("outbox.db", "outbox.db-wal"):
        if (_IMAGE / "crash" / name).exists():
            shutil.copy(_IMAGE / "crash" / name, folder / name)
    if sql:
        # Plain sqlite3 replays the WAL into the file on close: damage after a clean recovery.
        db = sqlite3.connect(folder / "outbox.db", isolation_level=None)
        try:
            for op in sql:
                _apply_sql(db, op)
        finally:
            db.close()
    for op in files:
        _apply_file(folder, op)


# ---------------------------------------------------------------- read back


async def _drain(q: OutboxQueue, ob: Outbox) -> list[Message]:
    """Send and acknowledge everything the queue holds until its backlog is empty."""
    ready = asyncio.Event()
    q.waker = ready.set
    got: list[Message] = []
    q.start()
    while True:
        item = q.take()
        if item is not None:
            key, msg = item
            got.append(msg)
            q.ack(key)
            continue
        await ob.flush()
        if len(q) == 0:
            return got
        await ready.wait()
        ready.clear()


async def _read_back(path: Path, dests: tuple[str, ...]) -> None:
    ob = Outbox(path, dests, commit_window=0)
    try:
        async with asyncio.timeout(BOUND):
            await ob.open()
    except OutboxError as exc:
        event("open: OutboxError")
        assert str(path) in str(exc), exc
        async with asyncio.timeout(BOUND):
            await ob.close()
        return
    run = asyncio.create_task(ob.run())
    failed: OutboxError | None = None
    try:
        for machine, state in ob.trackers.items():
            with contextlib.suppress(ValueError):
                MachineTracker.restore(machine, SETTINGS, state)
        for name in dests:
            q = ob.queue(Route(name), delayed_after=1e9)
            drain = asyncio.create_task(_drain(q, ob))
            async with asyncio.timeout(BOUND):
                await asyncio.wait({drain, run}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                # A damaged page found while reading: the documented way out.
                drain.cancel()
                err = run.exception()
                assert isinstance(err, OutboxError), repr(err)
                assert str(path) in str(err)
                failed = err
                event("read: OutboxError")
                break
            for msg in drain.result():
                assert isinstance(msg.topic, str) and msg.topic
                assert isinstance(msg.payload, bytes)
                assert msg.qos in (0, 1, 2)
    finally:
        if not run.done():
            run.cancel()
        with contextlib.suppress(asyncio.CancelledError, OutboxError):
            await run
        async with asyncio.timeout(BOUND):
            await ob.close()
    if failed is None:
        event("opened and drained")


def _scenario(
    sql: list[tuple[Any, ...]], files: list[tuple[Any, ...]], dests: tuple[str, ...]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _damage(folder, sql, files)
        asyncio.run(_read_back(folder / "outbox.db", dests))


destination_sets = st.sampled_from([DESTS, ("a",), ("b", "c"), ("c",)])


@fuzz(60)
@given(st.lists(sql_damage, max_size=4), st.lists(file_damage, max_size=2), destination_sets)
@example([], [], DESTS)
@example([("cell", "payload", 5, "text, not bytes")], [], DESTS)
@example([("cell", "topic", 6, b"\xff")], [], DESTS)
@example([("cell", "pending", 7, 1 << 40)], [], ("a", "b", "c"))
@example([("cell", "seq", 8, 2**63 - 1)], [], DESTS)
@example([("cell", "seq", 8, -3)], [], DESTS)
@example([("tracker", "m0", "{not json")], [], DESTS)
@example([("tracker", "m0", 5)], [], DESTS)
@example([("tracker_key", b"\x00", "{}")], [], DESTS)
@example([("bit", "a", 100)], [], DESTS)
@example([("bit", "ghost", "x")], [], DESTS)
@example([("meta", "last_seq", "twelve")], [], DESTS)
@example([("meta", "schema", None)], [], DESTS)
@example([("loose_schema", [None] * 9)], [], DESTS)
@example([], [("truncate", "db", 0.5)], DESTS)
@example([], [("truncate", "wal", 0.5)], DESTS)
@example([], [("flip", "db", 0.99, 0xFF)], DESTS)
# A damaged tree that hands rows back out of order: the salvage read them again forever.
@example([("loose_schema", [None] * 9)], [("truncate", "db", 0.9140625)], DESTS)
@example([("meta", "schema", "3")], [], DESTS)  # a newer gateway's file: refused
@example([("meta", "schema", "1")], [], DESTS)  # says schema 1, has records: refused
def test_a_damaged_outbox_opens_and_drains_or_says_why(
    sql: list[tuple[Any, ...]], files: list[tuple[Any, ...]], dests: tuple[str, ...]
) -> None:
    _scenario(sql, files, dests)


#: What a tracker state may hold once the file or a foreign writer damaged it.
json_like = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_GOOD = _tracker_state("m1")


@st.composite
def fuzzed_states(draw: st.DrawFn) -> Any:
    """A real state with some fields replaced, removed or added; or anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_like)
    state = json.loads(json.dumps(_GOOD))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from([*sorted(state), "extra"]))
        action = draw(st.sampled_from(["replace", "drop", "nested"]))
        if action == "drop":
            state.pop(key, None)
        elif action == "replace":
            state[key] = draw(json_like)
        elif isinstance(state.get(key), dict) and state[key]:
            inner = draw(st.sampled_from(sorted(state[key])))
            state[key][inner] = draw(json_like)
        elif isinstance(state.get(key), list) and state[key]:
            state[key][draw(st.integers(0, len(state[key]) - 1))] = draw(json_like)
    return state


@fuzz(300)
@given(fuzzed_states())
@example({**_GOOD, "sequence": float("inf")})
@example({**_GOOD, "counters": []})
@example({**_GOOD, "last_time": {"good_count": 1e400}})
@example({**_GOOD, "commands": [1]})
@example({**_GOOD, "queue": [{"order_id": "x"}]})
def test_tracker_restore_only_raises_value_error(state: Any) -> None:
    try:
        t = MachineTracker.restore("m1", SETTINGS, state)
    except ValueError as exc:
        assert "m1" in str(exc)
        return
    # A restored tracker exports a state that restores again.
    MachineTracker.restore("m1", SETTINGS, json.loads(json.dumps(t.export_state())))
