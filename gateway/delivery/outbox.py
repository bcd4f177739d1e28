"""Durable outbox: events and tracker state committed together in SQLite (WAL).

Guarantees (see ``docs/delivery.md``):

* An event counts as emitted once its row is committed, in the same transaction as the
  tracker state that produced it. After a crash the gateway restores the trackers from the
  outbox and resumes exactly there: no event is emitted twice, none is lost, sequence numbers
  continue. Nothing reaches a broker before it is committed.
* An event is stored as a typed record (:class:`~gateway.delivery.records.Record`: type,
  location, sequence, epoch, time, payload, routing bits), not as the bytes of one wire
  format; each destination encodes it as it reads it (:meth:`Outbox.queue` for MQTT
  destinations, :meth:`Outbox.record_queue` for sinks that take records). Files of schema 1
  (CloudEvents bytes per row) are migrated at :meth:`Outbox.open` in one transaction; a
  file of a newer schema is refused (:class:`OutboxSchemaError`).
* Every row carries a bit mask of the destinations it is routed to. Each destination reads
  the outbox in ``seq`` order from its own position and clears its bit when the broker
  acknowledged the row (QoS 1 PUBACK); a row is deleted once no bit is left.
* Durability: a commit that carries an event (``order.progress`` included) or a tracker
  state is fsynced (``PRAGMA synchronous=FULL`` for that transaction); commits of broker
  acknowledgements alone run with ``synchronous=NORMAL`` (WAL: durable at the next fsynced
  commit or checkpoint, never corrupt; lost only with the operating system, never with the
  process). Files are created with mode 0600.
* All SQLite work runs on the outbox's own thread, fed through a ``queue.SimpleQueue``:
  the event loop only appends to a list and wakes the writer, which commits whatever has
  gathered since its last commit (group commit), so a slow disk never blocks the loop.
  Events are committed at once; a commit of acknowledgements alone waits up to
  ``commit_window`` seconds (or ``commit_rows`` acknowledgements, a batch of rows counting as
  one, as its PUBACK does) for more to share it. Acknowledged rows are released by ranges of
  consecutive seqs, so a drain costs a few statements per commit, not two per row.
* Bounded by ``max_events``: beyond it ``order.progress`` rows a newer progress row of
  the same order supersedes are dropped, oldest first. Lifecycle, state and alarm events
  are never dropped while the disk takes them; the outbox then grows beyond the bound and
  says so. A full disk (SQLITE_FULL, from any statement or COMMIT) never ends
  :meth:`Outbox.run`: the WAL is checkpointed and truncated, acknowledgements are
  committed on their own, rows are dropped by the same policy in small slices, and events
  that still do not fit stay in memory and are retried. A preallocated reserve file next
  to the outbox is released so that checkpoints and deletions can always proceed
  (``docs/delivery.md``, "A full disk").

Errors other than a full disk end :meth:`Outbox.run` with :class:`OutboxError` (a read
that fails for a destination's queue too): the outbox is not supervised, the process exits
non-zero and systemd restarts it. A file left by a crash or a bad disk is checked at
:meth:`Outbox.open`: rows that cannot be sent (wrong types, a sequence number no real run
reaches), routing bits of no known destination, unreadable destination entries, sequence
counters and tracker states are logged and left out. A file SQLite reports as damaged (not
a database, malformed pages) or one found empty is moved aside under a timestamped name
(``…db.damaged-20261206T101500Z``, its WAL next to it) with an ``outbox.damaged`` error,
and what can still be read, row by row, goes into a new file: messages, tracker states,
destinations, the seq counter. Whenever the sequence space may have been reset (a new or
replaced file, an unreadable tracker state) the outbox takes a new :attr:`Outbox.epoch`,
which every event carries; a machine whose tracker state was unreadable continues after
the highest ``sequence`` of its stored events (:attr:`Outbox.recovered_sequences`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import structlog

from gateway.contract.envelope import read_event
from gateway.contract.wire import batch_payload
from gateway.core.model import Location
from gateway.core.routing import Route, redact
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.records import Record, WireEncodings, wire_payload

log = structlog.get_logger(__name__)

#: Row classes: ``order.progress`` (dropped on overflow once superseded) and every other
#: event (never dropped). Every row is an event: telemetry never enters the outbox (it waits
#: in memory, :meth:`OutboxQueue.push_telemetry`). A row of class 0 in an old file (a class
#: no gateway wrote) is kept and sent as stored, like any other row.
PROGRESS = 1
KEEP = 2

#: At most this many destinations (one bit each in a 63-bit SQLite integer).
MAX_DESTINATIONS = 62
#: Schema 2 stores events as typed records (:class:`~gateway.delivery.records.Record`);
#: schema 1 stored their CloudEvents bytes and is migrated at :meth:`Outbox.open`.
SCHEMA_VERSION = 2
_SQLITE_FULL = 13
#: SQLITE_CORRUPT and SQLITE_NOTADB: the file is damaged (set aside and salvaged).
_SQLITE_DAMAGE = frozenset({11, 26})
#: Beyond any real run (a million events a second for 146,000 years), and far enough below
#: SQLite's 2**63 limit that a new row can always be numbered: a larger seq is damage.
MAX_SEQ = 2**62

#: Rows a destination could not send: checked at open, dropped with a log line.
_UNUSABLE = f"""
typeof(pending) != 'integer' OR typeof(cls) != 'integer' OR typeof(machine) != 'text'
OR typeof(topic) != 'text' OR topic = '' OR typeof(payload) != 'blob'
OR typeof(qos) != 'integer' OR qos NOT IN (0, 1, 2)
OR typeof(created) NOT IN ('integer', 'real') OR seq < 1 OR seq > {MAX_SEQ}
OR (order_id IS NOT NULL AND typeof(order_id) != 'text')
OR (type IS NOT NULL AND (
    typeof(type) != 'text' OR type = '' OR typeof(location) != 'text'
    OR length(location) - length(replace(location, '/', '')) != 3
    OR typeof(sequence) != 'integer' OR typeof(time) NOT IN ('integer', 'real')
    OR typeof(event_id) != 'text' OR typeof(gateway_id) != 'text'
    OR (epoch IS NOT NULL AND typeof(epoch) != 'integer')
    OR (customer IS NOT NULL AND typeof(customer) != 'text')
    OR typeof(data) != 'text' OR (data_wire IS NOT NULL AND typeof(data_wire) != 'text')
    OR CASE WHEN json_valid(data) THEN json_type(data) != 'object' ELSE 1 END))
"""

#: The columns of a typed record (schema 2), added to schema 1's in this order; a row whose
#: ``type`` is NULL is an opaque message (a schema-1 row that did not parse as an event this
#: gateway wrote), sent as its ``payload`` is stored.
_RECORD_COLUMNS = (
    ("type", "TEXT"),
    ("location", "TEXT"),
    ("sequence", "INTEGER"),
    ("epoch", "INTEGER"),
    ("time", "REAL"),
    ("event_id", "TEXT"),
    ("gateway_id", "TEXT"),
    ("customer", "TEXT"),
    ("data", "TEXT"),
    ("data_wire", "TEXT"),
)
_V1_COLUMNS = 9
_COLUMNS = _V1_COLUMNS + len(_RECORD_COLUMNS)
_INSERT = f"INSERT INTO messages VALUES ({','.join('?' * _COLUMNS)})"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trackers (machine TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS destinations (name TEXT PRIMARY KEY, bit INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    pending INTEGER NOT NULL,
    cls INTEGER NOT NULL,
    machine TEXT NOT NULL,
    order_id TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    type TEXT,
    location TEXT,
    sequence INTEGER,
    epoch INTEGER,
    time REAL,
    event_id TEXT,
    gateway_id TEXT,
    customer TEXT,
    data TEXT,
    -- The payload as the CloudEvents encoding writes it (times as text), made when the event
    -- was emitted: a backlog is not converted again on every read. The typed data is what
    -- redaction and the other sinks use.
    data_wire TEXT
);
-- No index serves the overflow policy: it runs only when the outbox overflows, and finds
-- superseded progress in one pass over the table. Files of older versions have an index
-- over every row (cls, machine, order_id, seq), which cost more than the rest of a row's
-- life (each acknowledgement deleted an entry far from its neighbours), or one over the
-- rows of class 0, which no gateway wrote: both go.
DROP INDEX IF EXISTS messages_drop;
DROP INDEX IF EXISTS messages_telemetry;
"""


def seq_runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive numbers as ``(first, last)`` pairs, ascending, duplicates merged."""
    runs: list[tuple[int, int]] = []
    lo = hi = None
    for s in sorted(set(seqs)):
        if hi is not None and s == hi + 1:
            hi = s
            continue
        if lo is not None and hi is not None:
            runs.append((lo, hi))
        lo = hi = s
    if lo is not None and hi is not None:
        runs.append((lo, hi))
    return runs


class OutboxError(Exception):
    """The outbox cannot store events (not a full disk): the gateway must stop."""


class OutboxSchemaError(OutboxError):
    """The file was written by a newer gateway (a schema this version does not know)."""


def record_columns(record: Record) -> tuple[Any, ...]:
    """The schema-2 record columns of ``record``, in :data:`_RECORD_COLUMNS` order."""
    loc = record.location
    return (
        record.type,
        f"{loc.site}/{loc.area}/{loc.line}/{loc.machine}",
        record.sequence,
        record.epoch,
        record.time,
        record.event_id,
        record.gateway_id,
        record.customer,
        record.data_json(),
        record.data_wire(),
    )


def _record_from_v1(machine: str, order_id: str | None, payload: bytes) -> Record | None:
    """The typed record of a schema-1 row (its CloudEvents bytes); ``None`` if not one."""
    try:
        got = read_event(bytes(payload), machine)
    except (ValueError, TypeError, RecursionError):
        return None
    e = got.event
    record = Record(
        machine,
        e.type,
        got.location,
        e.sequence,
        e.time,
        e.data,
        got.event_id,
        got.gateway_id,
        got.epoch,
        order_id,
    )
    try:
        record.data_json()  # NaN or Infinity parse as JSON here, but cannot be stored
        record.data_wire()
    except ValueError:
        return None
    return record


def _v2_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A schema-1 message row (9 columns) as a schema-2 row: an event becomes a record.

    A row that is not an event this gateway wrote (bytes that do not parse) stays opaque:
    it is sent as it is stored.
    """
    seq, pending, cls, machine, order_id, topic, payload, qos, created = row
    record = None
    if isinstance(machine, str) and isinstance(payload, bytes):
        record = _record_from_v1(machine, order_id if isinstance(order_id, str) else None, payload)
    if record is None:
        return (*row, *([None] * len(_RECORD_COLUMNS)))
    return (seq, pending, cls, machine, order_id, topic, b"", qos, created, *record_columns(record))


def row_class(event_type: str) -> int:
    """Overflow class of an event's row: progress, or never dropped."""
    return PROGRESS if event_type == "order.progress" else KEEP


def needs_fsync(batch: Sequence[_Pending], trackers: Mapping[str, Any] | None = None) -> bool:
    """Whether a commit must be fsynced: it carries an event or a tracker state.

    Every event, ``order.progress`` included, has a sequence number that must never be
    handed out twice, and a tracker state may hold a platform's accepted order: a power
    loss must not take either back. Only commits of broker acknowledgements alone (a lost
    one costs a duplicate, deduplicated by ``id``) skip the fsync.
    """
    return bool(trackers) or bool(batch)


@dataclass(frozen=True, slots=True)
class Entry:
    """One event to store, with the destinations it is routed to.

    An event carries its typed ``record``, which each destination encodes as it reads
    it (``payload`` is then empty); an entry without a record is an opaque message, sent
    to MQTT destinations as ``payload`` is, and skipped by record sinks.
    """

    machine: str
    topic: str
    payload: bytes
    destinations: frozenset[str]
    event_type: str
    order_id: str | None = None
    qos: int = 1
    created: float = 0.0
    record: Record | None = None


class Row(NamedTuple):
    """A stored message as a destination reads it back.

    A named tuple, not a dataclass: a drain makes one per row, straight from SQLite's tuple.
    """

    seq: int
    topic: str
    payload: bytes
    qos: int
    created: float
    pending: int
    record: Record | None = None


@dataclass(slots=True)
class Stats:
    """Counters for logs, metrics and the status message."""

    appended: int = 0
    committed: int = 0
    commits: int = 0
    fsyncs: int = 0
    dropped_progress: int = 0
    acked: int = 0
    stored: int = 0
    disk_full_episodes: int = 0


@dataclass(slots=True)
class _Pending:
    seq: int
    bits: int
    cls: int
    entry: Entry
    #: While a full disk holds events: the tracker states as of this row (a step's end),
    #: so the held rows can be stored a part at a time, each part with its states.
    trackers: dict[str, dict[str, Any]] | None = None


@dataclass(slots=True)
class _WriteResult:
    committed_upto: int
    deleted_by_bit: dict[int, int] = field(default_factory=dict)
    dropped_progress: int = 0
    fsynced: bool = False
    stored: int = 0
    #: SQLite reported a full disk during this write (even if freeing room then let it pass).
    disk_full: bool = False
    #: The full-disk episode goes on after this write (no room yet for the reserve).
    full_episode: bool = False

    def save(self) -> tuple[dict[int, int], int]:
        """The drop and deletion counts, to put back when a transaction is rolled back."""
        return dict(self.deleted_by_bit), self.dropped_progress

    def restore(self, saved: tuple[dict[int, int], int]) -> None:
        """Counts as :meth:`save` took them."""
        self.deleted_by_bit, self.dropped_progress = saved


class DiskFullError(Exception):
    """SQLite said the disk (or its page limit) is full and nothing was left to drop.

    ``result`` holds what did get committed on the way (acknowledgements, dropped rows), so
    the counts stay right while the events wait.
    """

    def __init__(self, message: str, result: _WriteResult, acks_done: bool, done: int = 0) -> None:
        """The error with the partial ``result``; ``acks_done``: acknowledgements committed;
        ``done``: rows of the batch committed (a prefix, each part with its states)."""
        super().__init__(message)
        self.result = result
        self.acks_done = acks_done
        self.done = done


class _Damaged(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` found the file's structure broken."""


def _is_damage(exc: BaseException) -> bool:
    """SQLite says the file is not a database or its content is malformed."""
    if isinstance(exc, _Damaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and code is not None
        and (code & 0xFF in _SQLITE_DAMAGE)
    )


@dataclass(slots=True)
class _Salvage:
    """A damaged file set aside, and what could be read from it, row by row."""

    aside: Path
    why: str
    meta: dict[str, str] = field(default_factory=dict)
    destinations: list[tuple[Any, Any]] = field(default_factory=list)
    trackers: list[tuple[Any, Any]] = field(default_factory=list)
    messages: int = 0
    unreadable: list[str] = field(default_factory=list)


def _salvage(out: _Salvage, sink: Callable[[list[tuple[Any, ...]]], None]) -> None:
    """Read what is readable of a damaged outbox file (read-only; nothing raises).

    Small tables are kept in ``out``; messages go to ``sink`` a chunk at a time (a large
    backlog is never held in memory as a whole).
    """
    try:
        db = sqlite3.connect(f"file:{out.aside}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        out.unreadable.append(f"file: {exc}")
        return
    try:

        def rows(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            return db.execute(sql, args).fetchall()

        for table, into in (
            ("meta", None),
            ("destinations", out.destinations),
            ("trackers", out.trackers),
        ):
            try:
                got = rows(f"SELECT * FROM {table}")
            except sqlite3.Error:
                # Row by row, skipping what a damaged page hides.
                got = []
                try:
                    top = rows(f"SELECT max(rowid) FROM {table}")[0][0] or 0
                except sqlite3.Error as exc:
                    out.unreadable.append(f"{table}: {exc}")
                    continue
                for rowid in range(1, min(int(top), 100_000) + 1):
                    with contextlib.suppress(sqlite3.Error):
                        got += rows(f"SELECT * FROM {table} WHERE rowid = ?", (rowid,))
            if into is None:
                out.meta = {str(r[0]): str(r[1]) for r in got if len(r) == 2}
            else:
                into.extend((r[0], r[1]) for r in got if len(r) == 2)
        # Messages in seq order, a chunk at a time; at a damaged page, one row at a time up
        # to it, then skip ahead in growing steps until rows read again.
        after, step, limit = 0, 1, 500
        for _ in range(1_000_000):
            try:
                chunk = rows(
                    "SELECT * FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
                )
            except sqlite3.Error as exc:
                if limit > 1:
                    limit = 1
                    continue
                if step == 1:
                    out.unreadable.append(f"messages after seq {after}: {exc}")
                after += step
                step *= 2
                if after > MAX_SEQ:
                    break
                continue
            step, limit = 1, 500
            if not chunk:
                break
            usable = [
                r if len(r) == _COLUMNS else _v2_row(r)
                for r in chunk
                if len(r) in (_V1_COLUMNS, _COLUMNS)
            ]
            sink(usable)
            out.messages += len(usable)
            # A damaged tree can hand rows back out of order: go on after the largest seq
            # seen, never behind it (reading the same rows again would never end).
            last = max((r[0] for r in chunk if type(r[0]) is int), default=after)
            if last <= after:
                out.unreadable.append(f"messages after seq {after}: rows out of order")
                break
            after = last
    finally:
        db.close()


def _is_full(exc: BaseException) -> bool:
    """SQLITE_FULL (a full disk or the page limit), from any statement, COMMIT included."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == _SQLITE_FULL


#: The reserve file (next to the outbox) is released on a full disk so that a checkpoint and
#: the deletions of the overflow policy, which need room in the WAL too, can proceed.
RESERVE_SUFFIX = "-reserve"
_RESERVE_MAX = 4 << 20
#: Rows dropped per transaction on a full disk (a handful of pages in the WAL).
_FULL_SLICE = 16


#: Tracker states as compact JSON (one encoder: ``json.dumps`` with options makes one a call).
_STATE_ENCODER = json.JSONEncoder(separators=(",", ":"))

_T = TypeVar("_T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """Hand a job's outcome to its waiter (on the loop; the waiter may be gone)."""
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _Writer:
    """The outbox's own thread: runs SQLite jobs in order, hands each result back to the loop.

    Cheaper than ``run_in_executor`` per commit (no executor future and wrapper per call)
    and one thread for the life of the outbox, as SQLite's ``check_same_thread`` wants.
    """

    def __init__(self, name: str) -> None:
        """Prepare the thread; it starts with the first job."""
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``fn(*args)`` on the writer thread; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        if not self._thread.is_alive():
            self._thread.start()
        self._jobs.put((fn, args, loop, fut))
        return fut

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread (it is gone when this returns)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, loop, fut = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, fut, result, error)


class Outbox:
    """The durable outbox; use :meth:`open`, run :meth:`run` as a task, :meth:`close` at exit."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        destinations: Sequence[str],
        *,
        max_events: int = 1_000_000,
        retry_delay: float = 1.0,
        max_page_count: int | None = None,
        commit_window: float = 0.05,
        commit_rows: int = 200,
        full_quiet: float = 10.0,
    ) -> None:
        """Prepare an outbox at ``path`` for the named destinations; nothing opens yet.

        ``commit_window`` (seconds) and ``commit_rows`` bound how long acknowledgements wait
        for each other before their commit; events never wait. ``commit_rows`` counts
        acknowledgements (calls of :meth:`ack`, one per PUBACK), not rows: a batch message
        of a hundred rows is one. A full-disk episode ends once the disk has room again,
        the rows stored are down to half of what filled it, and ``full_quiet`` seconds went
        by without SQLite finding the disk full.
        """
        if not destinations:
            raise ValueError("an outbox needs at least one destination")
        if len(set(destinations)) != len(destinations):
            raise ValueError("destination names must be unique")
        if len(destinations) > MAX_DESTINATIONS:
            raise ValueError(f"at most {MAX_DESTINATIONS} destinations")
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        if not 0 <= commit_window <= 1:
            raise ValueError("commit_window must be 0..1 seconds")
        if commit_rows < 1:
            raise ValueError("commit_rows must be >= 1")
        self._commit_window = commit_window
        self._commit_rows = commit_rows
        self.path = Path(path)
        self.destinations = tuple(destinations)
        self.max_events = max_events
        self._retry_delay = retry_delay
        self._full_quiet = full_quiet
        # Test hook: SQLite's page limit stands in for a full disk.
        self._max_page_count = max_page_count
        self._writer = _Writer("outbox-writer")
        self._db: sqlite3.Connection | None = None
        self.bits: dict[str, int] = {}
        self.trackers: dict[str, dict[str, Any]] = {}
        self.stats = Stats()
        # Loop-side state.
        self._next_seq = 1
        self.boot_seq = 0
        self.committed_upto = 0
        self._pending: list[_Pending] = []
        self._pending_trackers: dict[str, dict[str, Any]] = {}
        self._acks: dict[int, list[int]] = {}
        self._work = asyncio.Event()
        # Set when the pending work must not wait for the commit window (rows, states).
        self._urgent = asyncio.Event()
        self._ack_count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._backlog: dict[str, int] = {}
        self._queues: list[OutboxQueue] = []
        #: CloudEvents bytes of stored records, shared by the destinations that encode a
        #: row the same way.
        self.encodings = WireEncodings()
        self._closed = False
        # A queue's read failed: run() ends with it (a destination would stall silently).
        self._failure: OutboxError | None = None
        self._overflowing = False
        self._disk_full = False
        # Set while the writer holds a batch it cannot store (a full disk): flush() returns.
        self._held = asyncio.Event()
        #: Events lost at close because the disk stayed full (never sent: not committed).
        self.lost_at_close = 0
        #: Sequence space id (``epoch`` of the contract): changes when the outbox was found
        #: damaged, empty or missing a tracker state, so sequences may have been reset.
        self.epoch = 0
        #: Machines whose tracker state was unreadable: the last sequence their stored
        #: events show (0 when none is stored).
        self.recovered_sequences: dict[str, int] = {}
        # Thread-side state (only touched on the worker thread).
        self._t_committed = 0
        self._t_count = 0
        #: The connection's ``synchronous`` mode: FULL (True) since :meth:`_t_open`.
        self._t_fsync = True
        self.reserve_path = self.path.with_name(self.path.name + RESERVE_SUFFIX)
        self._t_reserve_size = 0
        self._t_reserve_ok = False
        self._t_reserve_tried = 0.0
        #: The reserve cannot be made for another reason than room: run without it.
        self._t_reserve_off = False
        self._wal_pages = 0
        self._t_full_episode = False
        #: Rows stored when the episode began: it ends at half of that (and room on disk).
        self._t_full_level = 0
        self._t_last_full = 0.0

    # ------------------------------------------------------------------ open / close

    async def open(self) -> None:
        """Create or open the file, check it, load tracker states and per-destination counts."""
        try:
            info = await self._writer.call(self._t_open)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc
        self.bits, self.trackers, backlog, last_seq, count = info
        self._backlog = {name: backlog.get(self.bits[name], 0) for name in self.destinations}
        self._next_seq = last_seq + 1
        self.boot_seq = last_seq
        self.committed_upto = last_seq
        self.stats.stored = count
        log.info(
            "outbox.opened",
            path=str(self.path),
            stored=count,
            backlog=self._backlog,
            trackers=len(self.trackers),
        )

    def _t_open(
        self,
    ) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[int, int], int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        salvage: _Salvage | None = None
        try:
            empty = self.path.stat().st_size == 0
        except FileNotFoundError:
            empty = False
        if empty:
            # The gateway never leaves an empty file: something emptied it (a restore, a
            # disk). Starting afresh silently would lose the backlog and restart sequences.
            salvage = self._t_set_aside("the file is empty (0 bytes)")
        self._t_create()
        self._t_size_for_disk()
        try:
            return self._t_open_full(salvage)
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None
            salvage = self._t_set_aside(str(exc))
            self._t_create()
            return self._t_open_full(salvage)

    def _t_create(self) -> None:
        # Create the file ourselves so it is 0600 from the first byte; SQLite gives the
        # -wal and -shm files the same mode as the database file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def _t_set_aside(self, why: str) -> _Salvage:
        """Move a damaged file (with its WAL) aside under a timestamped name."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                if suffix == "-wal":
                    os.replace(side, aside.with_name(aside.name + suffix))
                else:
                    side.unlink()
        return _Salvage(aside, why)

    def _t_open_full(
        self, salvage: _Salvage | None
    ) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[int, int], int, int]:
        try:
            return self._t_open_db(salvage)
        except sqlite3.Error as exc:
            if not _is_full(exc) or not self._t_release_reserve():
                raise
            # A full disk at start: the reserve is there for this.
            return self._t_open_db(salvage)

    def _t_open_db(
        self, salvage: _Salvage | None = None
    ) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[int, int], int, int]:
        db = self._t_connect()
        if self._max_page_count is not None:
            db.execute(f"PRAGMA max_page_count={int(self._max_page_count)}")
        version = self._t_schema(db)
        db.executescript(_SCHEMA)
        fresh = version is None
        if version is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif version == 1:
            self._t_migrate_1(db)
        if salvage is not None:
            self._t_restore_salvage(db, salvage)
        elif not fresh:
            # Every page once (0.6 s for a million rows, far less than the open's own
            # reads): a broken index would otherwise fail only at the first overflow, and
            # the gateway would then restart into the same failure.
            verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if verdict != "ok":
                raise _Damaged(f"quick_check: {verdict}")
        db.execute("BEGIN IMMEDIATE")
        try:
            bits = self._t_destinations(db)
            # Destinations no longer configured: release their rows.
            for name, bit in list(bits.items()):
                if name not in self.destinations:
                    db.execute(
                        "UPDATE messages SET pending = pending & ~? WHERE pending & ?",
                        (1 << bit, 1 << bit),
                    )
                    db.execute("DELETE FROM destinations WHERE name = ?", (name,))
                    del bits[name]
            # Bits no configured destination owns (damage): cleared before a new destination
            # takes a free bit, so it never receives rows routed elsewhere.
            known = sum(1 << bit for bit in bits.values())
            db.execute(
                "UPDATE messages SET pending = pending & ? WHERE typeof(pending) = 'integer'"
                " AND pending & ~? != 0",
                (known, known),
            )
            bad = db.execute(f"SELECT seq FROM messages WHERE {_UNUSABLE} ORDER BY seq").fetchall()
            if bad:
                log.error(
                    "outbox.rows_unreadable",
                    path=str(self.path),
                    dropped=len(bad),
                    seqs=[r[0] for r in bad[:20]],
                    detail="stored rows with values no destination can send",
                )
                db.execute(f"DELETE FROM messages WHERE {_UNUSABLE}")
            db.execute("DELETE FROM messages WHERE pending = 0")
            free = sorted(set(range(MAX_DESTINATIONS)) - set(bits.values()))
            for name in self.destinations:
                if name not in bits:
                    bits[name] = free.pop(0)
                    db.execute("INSERT INTO destinations VALUES (?, ?)", (name, bits[name]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        trackers: dict[str, dict[str, Any]] = {}
        lost: list[str] = []
        for machine, text in db.execute("SELECT machine, state FROM trackers"):
            try:
                if not isinstance(machine, str) or not isinstance(text, str | bytes):
                    raise ValueError("not a text column")
                # RecursionError: deeply nested JSON (not ValueError in json.loads).
                state = json.loads(text)
            except (ValueError, RecursionError):
                state = None
            if isinstance(state, dict):
                trackers[machine] = state
            else:
                log.error(
                    "outbox.tracker_state_unreadable",
                    machine=repr(machine)[:80],
                    detail="its sequence continues after the last stored event; new epoch",
                )
                lost.append(machine if isinstance(machine, str) else "")
        self.recovered_sequences = self._t_last_sequences(db, [m for m in lost if m])
        stored_epoch = self._t_meta_int(db, "epoch")
        if fresh or salvage is not None or lost or stored_epoch is None:
            # A sequence space that cannot be proven to continue the previous one (a new
            # or replaced file, a lost tracker state) gets a new epoch, larger than before.
            epoch = max(int(time.time() * 1000), (stored_epoch or 0) + 1)
            if salvage is not None:
                epoch = max(epoch, (self._t_int(salvage.meta.get("epoch")) or 0) + 1)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
            self.epoch = epoch
        else:
            self.epoch = stored_epoch
        backlog = {
            bit: db.execute(
                "SELECT COUNT(*) FROM messages WHERE pending & ?", (1 << bit,)
            ).fetchone()[0]
            for bit in bits.values()
        }
        last = db.execute("SELECT MAX(seq) FROM messages").fetchone()[0]
        meta_last = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        last_seq = max(int(last or 0), self._t_meta_seq(meta_last))
        count = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self._t_committed = last_seq
        self._t_count = count
        return {n: bits[n] for n in self.destinations}, trackers, backlog, last_seq, count

    def _t_schema(self, db: sqlite3.Connection) -> int | None:
        """The file's schema version (``None``: a new file); a newer one is refused."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            return None
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            return None
        version = self._t_int(row[0])
        if version is None or version < 1:
            raise sqlite3.DatabaseError(
                f"outbox schema {row[0]!r} is not a version this gateway knows"
            )
        if version > SCHEMA_VERSION:
            raise OutboxSchemaError(
                f"outbox {self.path} has schema {version}, written by a newer gateway; this"
                f" one reads schemas 1 to {SCHEMA_VERSION}. Run the newer gateway again to"
                " deliver its backlog, or move the file aside to start with an empty outbox"
            )
        return version

    def _t_migrate_1(self, db: sqlite3.Connection) -> None:
        """Schema 1 (CloudEvents bytes per row) to 2 (typed records), in one transaction.

        A crash half-way leaves the file as it was (schema 1, opened and migrated again at
        the next start). Events become records whose CloudEvents encoding is the stored
        bytes; a row that does not parse as an event stays opaque and is sent as stored.
        """
        db.execute("BEGIN IMMEDIATE")
        try:
            for name, decl in _RECORD_COLUMNS:
                db.execute(f"ALTER TABLE messages ADD COLUMN {name} {decl}")
            converted = opaque = differ = 0
            after = 0
            while True:
                chunk = db.execute(
                    "SELECT seq, machine, order_id, payload FROM messages"
                    " WHERE seq > ? ORDER BY seq LIMIT 1000",
                    (after,),
                ).fetchall()
                if not chunk:
                    break
                # Progress is the largest seq seen (a damaged tree may return rows out of
                # order; the file is checked after the migration).
                last = max((r[0] for r in chunk if type(r[0]) is int), default=after)
                if last <= after:
                    break
                after = last
                updates = []
                for seq, machine, order_id, payload in chunk:
                    record = None
                    if isinstance(machine, str) and isinstance(payload, bytes):
                        oid = order_id if isinstance(order_id, str) else None
                        record = _record_from_v1(machine, oid, payload)
                    if record is None:
                        opaque += 1
                        continue
                    with contextlib.suppress(ValueError):
                        if wire_payload(record) != payload:
                            differ += 1
                    updates.append((*record_columns(record), seq))
                    converted += 1
                db.executemany(
                    "UPDATE messages SET payload = X'', "
                    + ", ".join(f"{name} = ?" for name, _ in _RECORD_COLUMNS)
                    + " WHERE seq = ?",
                    updates,
                )
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            self._t_rollback(db)
            raise
        log.info(
            "outbox.migrated",
            path=str(self.path),
            schema=f"1 -> {SCHEMA_VERSION}",
            records=converted,
            opaque=opaque,
        )
        if opaque or differ:
            log.warning(
                "outbox.migration_inexact",
                path=str(self.path),
                opaque=opaque,
                reencoded_differently=differ,
                detail="rows that are not events this gateway wrote are sent as stored",
            )

    def _t_connect(self) -> sqlite3.Connection:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        self._t_fsync = True
        if self._wal_pages:
            db.execute(f"PRAGMA wal_autocheckpoint={self._wal_pages}")
            # And the WAL file shrinks back to that after a checkpoint (it keeps its largest
            # size otherwise), so a burst does not keep the disk full.
            db.execute(f"PRAGMA journal_size_limit={self._wal_pages * 4096}")
        return db

    def _t_size_for_disk(self) -> None:
        """Size the reserve file and the WAL to the filesystem the outbox lives on.

        The reserve is 4 MiB, or an eighth of a small filesystem, or half of what is free
        when the gateway starts on a nearly full disk: enough for a checkpoint to write what
        the WAL holds (SQLite checkpoints it every 1,000 pages, 4 MiB; with a smaller reserve
        every half reserve's worth), then for the deletions of the overflow policy.
        """
        self._wal_pages = 0
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            self._t_reserve_size = _RESERVE_MAX
        else:
            total = st.f_blocks * st.f_frsize
            try:
                held = self.reserve_path.stat().st_size
            except OSError:
                held = 0
            free = st.f_bavail * st.f_frsize + held
            size = min(_RESERVE_MAX, total // 8, free // 2)
            self._t_reserve_size = max(4096, size // 4096 * 4096)
            if self._t_reserve_size < _RESERVE_MAX:
                self._wal_pages = max(4, self._t_reserve_size // 4096 // 2)
        self._t_ensure_reserve(force=True, factor=1)

    def _t_ensure_reserve(self, *, force: bool = False, factor: int = 2) -> bool:
        """Put the reserve file back when the disk has room for it and as much again.

        (``factor`` times its size; at start, room for itself is enough.)
        """
        if self._t_reserve_ok:
            return True
        now = time.monotonic()
        if not force and now - self._t_reserve_tried < 1.0:
            return False
        self._t_reserve_tried = now
        size = self._t_reserve_size
        try:
            if self.reserve_path.stat().st_size >= size:
                self._t_reserve_ok = True
                return True
        except OSError:
            pass
        tmp = self.reserve_path.with_name(self.reserve_path.name + ".tmp")
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < factor * size:
                return False
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # A filesystem without fallocate: zeros take the room as well.
                    for _ in range(size // 65536 + 1):
                        os.write(fd, bytes(65536))
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and not self._t_reserve_off:
                # Not a matter of room (permissions, a read-only mount): no reserve at all,
                # and no holding back of events for its sake.
                self._t_reserve_off = True
                log.warning("outbox.reserve_unavailable", path=str(tmp), error=str(exc))
            return False
        self._t_reserve_ok = True
        return True

    def _t_release_reserve(self) -> bool:
        """Delete the reserve file to make room; True if there was one."""
        self._t_reserve_ok = False
        try:
            os.unlink(self.reserve_path)
        except OSError:
            return False
        log.warning("outbox.reserve_released", path=str(self.reserve_path))
        return True

    def _t_checkpoint(self, db: sqlite3.Connection) -> bool:
        """Move the WAL into the database file and truncate it; False if there was no room.

        The WAL holds every page written since the last checkpoint, most of them superseded
        or freed; the database file needs only the live ones.
        """
        try:
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            if not _is_full(exc):
                raise
            return False
        return not busy

    @staticmethod
    def _t_int(value: Any) -> int | None:
        try:
            n = int(value)
        except (TypeError, ValueError):
            return None
        return n if 0 <= n <= MAX_SEQ else None

    def _t_meta_int(self, db: sqlite3.Connection, key: str) -> int | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._t_int(row[0])

    def _t_last_sequences(self, db: sqlite3.Connection, machines: list[str]) -> dict[str, int]:
        """The highest ``sequence`` among each machine's stored events (0 when none)."""
        out: dict[str, int] = {}
        for machine in machines:
            row = db.execute(
                "SELECT MAX(sequence) FROM messages WHERE machine = ?"
                " AND type IS NOT NULL AND typeof(sequence) = 'integer' AND sequence <= ?",
                (machine, MAX_SEQ),
            ).fetchone()
            out[machine] = max(int(row[0] or 0), 0)
        return out

    def _t_restore_salvage(self, db: sqlite3.Connection, salvage: _Salvage) -> None:
        """Put the rows readable in a damaged file into the new one (checked like any file).

        Messages go in a chunk per transaction, as they are read; the rest after them.
        """

        def sink(chunk: list[tuple[Any, ...]]) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for msg in chunk:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("INSERT OR IGNORE" + _INSERT.removeprefix("INSERT"), msg)
                db.execute("COMMIT")
            except BaseException:
                self._t_rollback(db)
                raise

        _salvage(salvage, sink)
        with contextlib.suppress(FileNotFoundError):
            salvage.aside.with_name(salvage.aside.name + "-shm").unlink()
        db.execute("BEGIN IMMEDIATE")
        try:
            last = self._t_int(salvage.meta.get("last_seq"))
            if last is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(last),))
            if (epoch := self._t_int(salvage.meta.get("epoch"))) is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
            for row in salvage.destinations:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("INSERT INTO destinations VALUES (?, ?)", row)
            for row in salvage.trackers:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("INSERT OR REPLACE INTO trackers VALUES (?, ?)", row)
            db.execute("COMMIT")
        except BaseException:
            self._t_rollback(db)
            raise
        log.error(
            "outbox.damaged",
            path=str(self.path),
            moved_to=str(salvage.aside),
            error=salvage.why[:200],
            salvaged_messages=salvage.messages,
            salvaged_trackers=len(salvage.trackers),
            unreadable=salvage.unreadable[:5],
            detail=(
                "the damaged file is kept for inspection; a new outbox holds what could be"
                " read, and events carry a new epoch: sequences may have been reset"
            ),
        )

    def _t_destinations(self, db: sqlite3.Connection) -> dict[str, int]:
        """The stored name-to-bit table; entries that are not a name and a usable bit go."""
        bits: dict[str, int] = {}
        for rowid, name, bit in db.execute("SELECT rowid, name, bit FROM destinations"):
            if (
                isinstance(name, str)
                and type(bit) is int
                and 0 <= bit < MAX_DESTINATIONS
                and bit not in bits.values()
            ):
                bits[name] = bit
                continue
            log.error(
                "outbox.destination_unreadable",
                path=str(self.path),
                name=repr(name)[:80],
                bit=repr(bit)[:40],
                detail="its rows are released",
            )
            db.execute("DELETE FROM destinations WHERE rowid = ?", (rowid,))
        return bits

    def _t_meta_seq(self, row: tuple[Any, ...] | None) -> int:
        """The stored seq counter; 0 (the rows' own maximum counts) when unreadable."""
        if row is None:
            return 0
        try:
            value = int(row[0])
        except (TypeError, ValueError):
            value = -1
        if 0 <= value <= MAX_SEQ:
            return value
        log.error("outbox.seq_unreadable", path=str(self.path), value=repr(row[0])[:40])
        return 0

    async def close(self) -> None:
        """Commit what is pending, then close the file (idempotent)."""
        if self._closed:
            return
        if self._db is not None and (self._pending or self._acks or self._pending_trackers):
            # run() may be gone already (cancelled): write the rest here.
            with contextlib.suppress(Exception):
                await self._write_once(retry=False)
        self._closed = True
        await self._writer.call(self._t_close)
        self._writer.stop()

    def _t_close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    # ------------------------------------------------------------------ producer side

    def append(
        self, entries: Iterable[Entry], trackers: Mapping[str, dict[str, Any]] | None = None
    ) -> list[int]:
        """Queue entries (and tracker states) for the next commit; returns their seqs.

        Never blocks: the rows are written by :meth:`run` on the worker thread. An entry
        routed to no destination is not stored (its tracker state still is).
        """
        seqs: list[int] = []
        for e in entries:
            bits = 0
            for name in e.destinations:
                bit = self.bits.get(name)
                if bit is not None:
                    bits |= 1 << bit
            if not bits:
                continue
            seq = self._next_seq
            self._next_seq += 1
            self._pending.append(_Pending(seq, bits, row_class(e.event_type), e))
            for name in e.destinations:
                if name in self._backlog:
                    self._backlog[name] += 1
            seqs.append(seq)
            self.stats.appended += 1
        if trackers:
            self._pending_trackers.update(trackers)
        if seqs or trackers:
            self._idle.clear()
            self._urgent.set()
            self._work.set()
        return seqs

    @property
    def assigned_upto(self) -> int:
        """Highest seq handed out by :meth:`append` (committed or not)."""
        return self._next_seq - 1

    def backlog(self, destination: str) -> int:
        """Rows stored for ``destination`` and not yet acknowledged by its broker."""
        return self._backlog.get(destination, 0)

    def total_backlog(self) -> int:
        """Rows stored and not yet acknowledged by every destination they go to."""
        return self.stats.stored + len(self._pending)

    def ack(self, destination: str, seqs: Sequence[int]) -> None:
        """Record that ``destination``'s broker acknowledged rows (written in the next commit)."""
        bit = self.bits[destination]
        self._acks.setdefault(bit, []).extend(seqs)
        # Counted per acknowledgement, not per row: releasing a batch of rows costs about as
        # much as one row (a range), and a drain in batch mode would otherwise commit every
        # other PUBACK.
        self._ack_count += 1
        if self._ack_count >= self._commit_rows:
            self._urgent.set()
        self._idle.clear()
        self._work.set()

    async def flush(self) -> None:
        """Wait until everything appended or acknowledged so far is written.

        Returns early while a full disk holds events back (they are retried, not waited for).
        """
        while not self._idle.is_set() and not self._held.is_set():
            idle = asyncio.ensure_future(self._idle.wait())
            held = asyncio.ensure_future(self._held.wait())
            try:
                await asyncio.wait([idle, held], return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()
                held.cancel()

    # ------------------------------------------------------------------ writer

    async def run(self) -> None:
        """Commit batches until cancelled; raises :class:`OutboxError` when SQLite fails."""
        while True:
            await self._work.wait()
            if self._failure is not None:
                raise self._failure
            if self._commit_window and not self._urgent.is_set():
                # Only acknowledgements so far: nobody waits for their commit, so let a few
                # more share it (one commit per PUBACK would cost more than the sending).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._commit_window):
                        await self._urgent.wait()
            self._work.clear()
            await self._write_once()

    async def _write_once(self, *, retry: bool = True) -> None:
        batch, self._pending = self._pending, []
        # Every seq handed out so far is committed or in this batch: readers may go up to
        # here once it is written.
        upto = self.assigned_upto
        trackers, self._pending_trackers = self._pending_trackers, {}
        acks, self._acks = self._acks, {}
        self._urgent.clear()
        self._ack_count = 0
        if not (batch or trackers or acks):
            self._idle.set()
            return
        while True:
            try:
                result = await self._writer.call(self._t_write, batch, trackers, acks, upto)
                break
            except DiskFullError as exc:
                self._account(exc.result, [], acks if exc.acks_done else {})
                if exc.acks_done:
                    acks = {}
                if exc.done:
                    batch = self._committed_part(batch, exc.done)
                elif batch and batch[-1].trackers is None:
                    # The states as of the end of these rows, for a part-by-part store.
                    batch[-1].trackers = dict(trackers)
                self._disk_full_began(len(batch), exc.result)
                if not retry:
                    self.lost_at_close += len(batch)
                    log.error(
                        "outbox.lost_at_close",
                        path=str(self.path),
                        events=len(batch),
                        detail="the disk stayed full; these events were never sent",
                    )
                    self._idle.set()
                    return
                self._held.set()
                await asyncio.sleep(self._retry_delay)
                # Whatever arrived meanwhile joins the retry, in order.
                if self._pending and self._pending_trackers:
                    last = self._pending[-1]
                    last.trackers = {**(last.trackers or {}), **self._pending_trackers}
                batch = batch + self._pending
                self._pending = []
                upto = self.assigned_upto
                trackers.update(self._pending_trackers)
                self._pending_trackers = {}
                for bit, seqs in self._acks.items():
                    acks.setdefault(bit, []).extend(seqs)
                self._acks = {}
                self._ack_count = 0
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc
        self._held.clear()
        if result.disk_full:
            self._disk_full_began(0, result)
        elif self._disk_full and not result.full_episode:
            # Over once the disk has room for the reserve again (and as much to spare).
            self._disk_full = False
            log.info(
                "outbox.disk_writable",
                path=str(self.path),
                dropped_progress=self.stats.dropped_progress,
            )
        previous = self.committed_upto
        self.committed_upto = max(previous, result.committed_upto)
        self.stats.commits += 1
        self.stats.committed += len(batch)
        self.stats.fsyncs += int(result.fsynced)
        self._account(result, batch, acks)
        for q in self._queues:
            q._on_commit(batch, previous, self.committed_upto)
        if not (self._pending or self._acks or self._pending_trackers):
            self._idle.set()

    def _committed_part(self, batch: list[_Pending], done: int) -> list[_Pending]:
        """The first ``done`` held rows were stored: hand them to the readers; the rest."""
        part, rest = batch[:done], batch[done:]
        previous = self.committed_upto
        self.committed_upto = max(previous, part[-1].seq)
        self.stats.commits += 1
        self.stats.committed += len(part)
        for q in self._queues:
            q._on_commit(part, previous, self.committed_upto)
        return rest

    def _account(
        self, result: _WriteResult, batch: list[_Pending], acks: dict[int, list[int]]
    ) -> None:
        """Counts, backlogs and overflow logs after a write (or what part of it went in)."""
        self.stats.stored = result.stored
        for name, bit in self.bits.items():
            gone = result.deleted_by_bit.get(bit, 0)
            if gone:
                self._backlog[name] = max(0, self._backlog[name] - gone)
        self.stats.acked += sum(len(v) for v in acks.values())
        self._note_drops(result)

    def _disk_full_began(self, waiting: int, result: _WriteResult) -> None:
        """Log the start of a full-disk episode once; the episode ends in ``_write_once``."""
        if self._disk_full:
            return
        self._disk_full = True
        self.stats.disk_full_episodes += 1
        log.error(
            "outbox.disk_full",
            path=str(self.path),
            waiting=waiting,
            stored=result.stored,
            detail=(
                "dropping superseded order.progress; other events are held"
                " in memory and retried every"
                f" {self._retry_delay:g} s until the disk has room"
            ),
        )

    @property
    def disk_full(self) -> bool:
        """In a full-disk episode: SQLite found the disk full and it has not recovered yet."""
        return self._disk_full

    def _note_drops(self, result: _WriteResult) -> None:
        dropped = result.dropped_progress
        self.stats.dropped_progress += result.dropped_progress
        over = result.stored > self.max_events
        if dropped and not self._overflowing and not self._disk_full:
            self._overflowing = True
            log.warning(
                "outbox.overflow",
                max_events=self.max_events,
                stored=result.stored,
                dropped_progress=result.dropped_progress,
                policy="superseded order.progress only; lifecycle, state and alarms kept",
            )
        elif over and not self._overflowing and not self._disk_full:
            self._overflowing = True
            log.warning(
                "outbox.over_bound",
                max_events=self.max_events,
                stored=result.stored,
                detail="only lifecycle, state and alarm events left; keeping them",
            )
        elif self._overflowing and result.stored <= self.max_events // 2:
            self._overflowing = False
            log.info(
                "outbox.overflow_ended",
                stored=result.stored,
                dropped_progress=self.stats.dropped_progress,
            )

    def _t_write(
        self,
        batch: list[_Pending],
        trackers: dict[str, dict[str, Any]],
        acks: dict[int, list[int]],
        upto: int = 0,
    ) -> _WriteResult:
        db = self._db
        assert db is not None
        result = _WriteResult(self._t_committed)
        fsync = needs_fsync(batch, trackers)
        if fsync != self._t_fsync:
            # One statement less per commit while the mode stays (it does at steady load).
            db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._t_fsync = fsync
        try:
            if not self._t_fits(db, batch):
                self._t_when_full(db, batch, trackers, acks, result)
            else:
                self._t_transaction(db, batch, trackers, acks, result)
        except sqlite3.Error as exc:
            if not _is_full(exc):
                raise
            self._t_when_full(db, batch, trackers, acks, result)
        result.fsynced = fsync
        self._t_committed = max(self._t_committed, upto, batch[-1].seq if batch else 0)
        result.committed_upto = self._t_committed
        result.stored = self._t_count
        if (
            self._t_full_episode
            and self._t_count <= self._t_full_level // 2
            and time.monotonic() - self._t_last_full >= self._full_quiet
            and self._t_has_room()
        ):
            self._t_full_episode = False
        result.full_episode = self._t_full_episode
        return result

    def _t_fits(self, db: sqlite3.Connection, batch: list[_Pending]) -> bool:
        """Whether events may be stored now: yes, unless a full disk took the reserve.

        Without the reserve, new rows may only fill free pages inside the file: a row that
        grows the file puts a page in the WAL that a checkpoint cannot write without room,
        and then not even deletions could proceed.
        """
        if not batch or self._t_reserve_ok or self._t_reserve_off:
            return True
        page, free = (
            db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "freelist_count")
        )
        need = sum(len(p.entry.payload) + len(p.entry.topic) + 64 for p in batch)
        return int(free) * int(page) >= 2 * need + 8 * int(page)

    def _t_has_room(self) -> bool:
        """The disk has room again: free space plus free pages inside the file.

        A reserve's worth beyond the reserve file; twice that while the reserve cannot be
        put back (the database file does not shrink, its free pages take new rows).
        """
        reserve = self._t_ensure_reserve()
        db = self._db
        assert db is not None
        try:
            st = os.statvfs(self.path.parent)
            free_pages = db.execute("PRAGMA freelist_count").fetchone()[0]
            page = db.execute("PRAGMA page_size").fetchone()[0]
        except (OSError, sqlite3.Error):
            return False
        room = st.f_bavail * st.f_frsize + int(free_pages) * int(page)
        return room >= (1 if reserve else 2) * self._t_reserve_size

    def _t_when_full(
        self,
        db: sqlite3.Connection,
        batch: list[_Pending],
        trackers: dict[str, dict[str, Any]],
        acks: dict[int, list[int]],
        result: _WriteResult,
    ) -> None:
        """SQLITE_FULL: free room and store what fits, or raise :class:`DiskFullError`.

        In this order: truncate the WAL; commit the acknowledgements alone (deleting rows,
        in slices if need be); drop rows by the overflow policy, in slices; store the events
        (with the reserve released, only into free pages); what does not fit at once, part
        by part. When a checkpoint or a deletion itself finds no room, the reserve file is
        released for it. Whatever was committed on the way is in the error's ``result``.
        """
        result.disk_full = True
        self._t_last_full = time.monotonic()
        if not self._t_full_episode:
            self._t_full_episode = True
            self._t_full_level = self._t_count
        self._t_rollback(db)

        def attempt(step: Callable[[], Any]) -> bool:
            """Run ``step``; on SQLITE_FULL roll back, release the reserve and try once more."""
            for tries in range(2):
                try:
                    step()
                    return True
                except sqlite3.Error as exc:
                    if not _is_full(exc):
                        raise
                    self._t_rollback(db)
                if tries or not self._t_release_reserve():
                    return False
                self._t_checkpoint(db)
            return False

        if not self._t_checkpoint(db) and self._t_release_reserve():
            self._t_checkpoint(db)
        acks_done = False
        if acks:
            # Acknowledged rows free room, and must not wait for events that find none.
            acks_done = attempt(
                lambda: self._t_transaction(db, [], {}, acks, result)
            ) or self._t_ack_in_slices(db, acks, result)
        rest = {} if acks_done else acks
        # Drop by policy now, while there is room to delete: the rows stored next reuse the
        # freed pages instead of growing the file, and the reserve goes back at once.
        self._t_drop_in_slices(db, result, len(batch), attempt)
        self._t_ensure_reserve(force=True)
        error = "no room for new pages while the reserve is released"
        if self._t_fits(db, batch):
            try:
                self._t_transaction(db, batch, trackers, rest, result)
                return
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise
                self._t_rollback(db)
                error = str(exc)
        # Not all at once: part by part, each part with the tracker states as of its end.
        done = self._t_store_parts(db, batch, result)
        if done == len(batch):
            try:
                self._t_transaction(db, [], trackers, rest, result)
                return
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise
                self._t_rollback(db)
        result.stored = self._t_count
        result.full_episode = True
        raise DiskFullError(error, result, acks_done, done)

    def _t_ack_in_slices(
        self, db: sqlite3.Connection, acks: dict[int, list[int]], result: _WriteResult
    ) -> bool:
        """Acknowledgements a few rows per transaction, checkpointing between; True if all.

        Releasing hundreds of rows at once needs more room in the WAL than a full disk has.
        A row released twice (some slices went, the rest is retried) is released once.
        """
        for bit, seqs in acks.items():
            ordered = sorted(set(seqs))
            for i in range(0, len(ordered), _FULL_SLICE):
                try:
                    self._t_transaction(db, [], {}, {bit: ordered[i : i + _FULL_SLICE]}, result)
                except sqlite3.Error as exc:
                    if not _is_full(exc):
                        raise
                    self._t_rollback(db)
                    return False
                self._t_checkpoint(db)
        return True

    def _t_store_parts(
        self, db: sqlite3.Connection, batch: list[_Pending], result: _WriteResult
    ) -> int:
        """Store the longest prefix of held rows that fits, a part (up to a row with tracker
        states) per transaction; the number of rows stored."""
        done = 0
        states: dict[str, dict[str, Any]] = {}
        for i, p in enumerate(batch):
            if p.trackers is None:
                continue
            states.update(p.trackers)
            part = batch[done : i + 1]
            if not self._t_fits(db, part):
                break
            try:
                self._t_transaction(db, part, states, {}, result)
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise
                self._t_rollback(db)
                break
            self._t_committed = max(self._t_committed, part[-1].seq)
            done, states = i + 1, {}
        return done

    @staticmethod
    def _t_rollback(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            db.execute("ROLLBACK")

    def _t_transaction(
        self,
        db: sqlite3.Connection,
        batch: list[_Pending],
        trackers: dict[str, dict[str, Any]],
        acks: dict[int, list[int]],
        result: _WriteResult,
    ) -> None:
        count = self._t_count
        deleted: dict[int, int] = {}
        saved = result.save()
        db.execute("BEGIN IMMEDIATE")
        try:
            if batch:
                db.executemany(
                    _INSERT,
                    [
                        (
                            p.seq,
                            p.bits,
                            p.cls,
                            p.entry.machine,
                            p.entry.order_id,
                            p.entry.topic,
                            p.entry.payload,
                            p.entry.qos,
                            p.entry.created,
                            *(
                                _NO_RECORD
                                if p.entry.record is None
                                else record_columns(p.entry.record)
                            ),
                        )
                        for p in batch
                    ],
                )
                count += len(batch)
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(batch[-1].seq),)
                )
            if trackers:
                db.executemany(
                    "INSERT OR REPLACE INTO trackers VALUES (?, ?)",
                    [(m, _STATE_ENCODER.encode(s)) for m, s in trackers.items()],
                )
            for bit, seqs in acks.items():
                mask = 1 << bit
                runs = [(lo, hi, mask) for lo, hi in seq_runs(seqs)]
                if not runs:
                    continue
                # A row this destination was the last to wait for goes at once; a row others
                # still wait for loses this bit. A drain acknowledges consecutive rows, so
                # one statement covers a whole run of them.
                gone = db.executemany(
                    "DELETE FROM messages WHERE seq BETWEEN ? AND ? AND pending = ?", runs
                ).rowcount
                kept = db.executemany(
                    "UPDATE messages SET pending = pending & ~?3"
                    " WHERE seq BETWEEN ?1 AND ?2 AND pending & ?3",
                    runs,
                ).rowcount
                deleted[bit] = gone + kept
                count -= gone
            self._t_count = count
            if count > self.max_events:
                self._t_make_room(db, result, count - self.max_events, force=False)
            db.execute("COMMIT")
        except BaseException:
            self._t_rollback(db)
            # The transaction is undone: recount from what is committed.
            self._t_count = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            result.restore(saved)
            raise
        for bit, n in deleted.items():
            result.deleted_by_bit[bit] = result.deleted_by_bit.get(bit, 0) + n

    def _t_drop_in_slices(
        self,
        db: sqlite3.Connection,
        result: _WriteResult,
        need: int,
        attempt: Callable[[Callable[[], Any]], bool],
    ) -> None:
        """Drop a good share of rows by policy, a few per transaction, checkpointing between.

        On a full disk a deletion needs room in the WAL as well: one of a thousand rows
        writes hundreds of pages, one of a few rows a handful, and the truncated WAL after
        each slice gives the room back.
        """
        target = max(need, 1000, self._t_count // 10)
        dropped = 0
        while dropped < target:
            before = self._t_count
            freed: list[bool] = []

            def slice_(freed: list[bool] = freed) -> None:
                freed.append(self._t_make_room(db, result, _FULL_SLICE, force=False))

            if not attempt(slice_) or not any(freed):
                break
            dropped += before - self._t_count
            self._t_checkpoint(db)

    def _t_make_room(
        self, db: sqlite3.Connection, result: _WriteResult, need: int, *, force: bool
    ) -> bool:
        """Drop rows by policy (inside or outside a transaction); True if any went."""
        own_tx = not db.in_transaction
        saved = result.save()
        if own_tx:
            db.execute("BEGIN IMMEDIATE")
        try:
            if force:
                # A full disk: free a good slice at once, not one row at a time.
                need = max(need, 1000, self._t_count // 10)
            # Superseded: not the newest progress row of its order (GROUP BY groups a NULL
            # order id like ``IS`` does). One pass over the table, no index to keep.
            victims = db.execute(
                "SELECT seq, pending FROM messages WHERE cls = ?1 AND seq NOT IN ("
                " SELECT MAX(seq) FROM messages WHERE cls = ?1 GROUP BY machine, order_id)"
                " ORDER BY seq LIMIT ?2",
                (PROGRESS, need),
            ).fetchall()
            freed = self._t_drop(db, victims, result)
            result.dropped_progress += len(victims)
            if own_tx:
                db.execute("COMMIT")
        except BaseException:
            if own_tx:
                self._t_rollback(db)
                self._t_count = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
                result.restore(saved)
            raise
        return freed > 0

    def _t_drop(
        self, db: sqlite3.Connection, victims: list[tuple[int, int]], result: _WriteResult
    ) -> int:
        if not victims:
            return 0
        db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s, _ in victims])
        for _, pending in victims:
            bit = 0
            while pending:
                if pending & 1:
                    result.deleted_by_bit[bit] = result.deleted_by_bit.get(bit, 0) + 1
                pending >>= 1
                bit += 1
        self._t_count -= len(victims)
        return len(victims)

    # ------------------------------------------------------------------ readers

    async def fetch(self, destination: str, after: int, limit: int) -> tuple[list[Row], int]:
        """Rows for ``destination`` with ``seq > after`` in order, and the seq read up to."""
        mask = 1 << self.bits[destination]
        return await self._writer.call(self._t_fetch, mask, after, limit)

    def _t_fetch(self, mask: int, after: int, limit: int) -> tuple[list[Row], int]:
        db = self._db
        assert db is not None
        rows = list(
            map(
                _read_row,
                db.execute(
                    "SELECT seq, topic, payload, qos, created, pending, machine, order_id,"
                    " type, location, sequence, epoch, time, event_id, gateway_id, customer,"
                    " data, data_wire FROM messages"
                    " WHERE seq > ? AND pending & ? ORDER BY seq LIMIT ?",
                    (after, mask, limit),
                ),
            )
        )
        upto = rows[-1].seq if len(rows) == limit else max(self._t_committed, after)
        return rows, upto

    def _read_failed(self, destination: str, exc: Exception) -> None:
        """A queue could not read its rows: :meth:`run` ends with :class:`OutboxError`."""
        if self._failure is None:
            self._failure = OutboxError(
                f"outbox {self.path}: reading rows for {destination} failed: {exc}"
            )
        self._work.set()

    def queue(self, route: Route, **options: Any) -> OutboxQueue:
        """The :class:`~gateway.delivery.mqtt.publisher.SendQueue` of one destination."""
        q = OutboxQueue(self, route, **options)
        self._queues.append(q)
        return q

    def record_queue(self, route: Route, **options: Any) -> RecordQueue:
        """The queue of a destination that takes typed records (:class:`RecordQueue`)."""
        q = RecordQueue(self, route, **options)
        self._queues.append(q)
        return q


_NO_RECORD = (None,) * len(_RECORD_COLUMNS)


#: One Location per machine for a drain, not one per row.
_location = functools.lru_cache(maxsize=4096)(Location)


def _read_row(r: tuple[Any, ...]) -> Row:
    """A :class:`Row` from :meth:`Outbox._t_fetch`'s columns (checked at open)."""
    if r[8] is None:
        return Row(r[0], r[1], r[2], r[3], r[4], r[5])
    site, area, line, machine = r[9].split("/")
    record = Record(
        r[6],
        r[8],
        _location(site, area, line, machine),
        r[10],
        r[12],
        None,
        r[13],
        r[14],
        r[11],
        r[7],
        r[15],
        data_json=r[16],
        data_wire=r[17],
    )
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], record)


_KEY_SHIFT = 20


class OutboxQueue:
    """One destination's view of the outbox, as a publisher ``SendQueue``.

    Rows are read from the outbox in ``seq`` order (live rows straight after their commit,
    a backlog in chunks of ``prefetch``, kept topped up to ``prefetch`` rows, or to 50
    batches in batch mode so a drain fills the publisher's window). Non-durable messages
    (retained state snapshots, status) are pushed in memory, coalesced per topic, and go out
    after the rows committed before them. A row sent more than ``delayed_after`` seconds
    after it was committed, or left from a previous run, carries ``"delayed": true``.
    """

    def __init__(
        self,
        outbox: Outbox,
        route: Route,
        *,
        clock: Callable[[], float] = time.time,
        delayed_after: float = 5.0,
        prefetch: int = 1000,
        batch_topic: str | None = None,
        batch_max: int = 100,
        secret: bytes | None = None,
        max_memory: int = 10_000,
        max_telemetry_bytes: int | None = None,
    ) -> None:
        """Create the queue; ``batch_topic`` is required when ``route.batch`` is set."""
        if route.batch and not batch_topic:
            raise ValueError("a batch destination needs a batch topic")
        self._o = outbox
        self.route = route
        self.name = route.name
        self._clock = clock
        self._delayed_after = delayed_after
        self._prefetch = prefetch
        # Rows kept ready: one batch message takes up to ``batch_max`` of them, and a
        # publisher window of batches needs more than one chunk to stay full.
        self._hold = max(prefetch, 50 * batch_max) if route.batch else prefetch
        self._batch_topic = batch_topic
        self._batch_max = batch_max
        self._secret = secret
        self._max_memory = max_memory
        #: Payload bytes of unsent telemetry held at most (``None``: only the count bounds);
        #: may change while running (a reload).
        self.max_telemetry_bytes = max_telemetry_bytes
        self._tele_bytes = 0
        self._rows: deque[Row] = deque()
        self._cursor = 0
        self._fetching = False
        self._fetch_task: asyncio.Task[None] | None = None
        self._mem: dict[int, Message] = {}
        self._retained: dict[str, int] = {}
        self._mem_base = -1
        self._mem_n = 0
        self._last_mem_key = 0
        self._inflight: dict[int, Message | list[Row]] = {}
        self._inflight_msgs: dict[int, Message] = {}
        #: Keys of the unsent telemetry in ``_mem``, oldest first; and of telemetry in flight.
        self._tele: dict[int, None] = {}
        self._tele_sent: set[int] = set()
        #: Telemetry messages dropped because memory was full (``max_memory``).
        self.dropped_telemetry = 0
        #: Called when something becomes sendable (the publisher's wake-up).
        self.waker: Callable[[], None] | None = None
        #: Called with each acknowledged row's delivery time (emitted -> acknowledged, s).
        self.on_delivered: Callable[[float], None] | None = None
        self.sent_rows = 0

    # -- outbox side --

    def start(self) -> None:
        """Begin reading the stored backlog (call once the loop runs and the outbox is open)."""
        self._cursor = 0
        self._maybe_fetch()

    def _wake(self) -> None:
        if self.waker is not None:
            self.waker()

    def _on_commit(self, batch: list[_Pending], previous: int, upto: int) -> None:
        if not self._fetching and self._cursor == previous and len(self._rows) < self._hold:
            mask = 1 << self._o.bits[self.name]
            for p in batch:
                if p.bits & mask:
                    e = p.entry
                    self._rows.append(
                        Row(p.seq, e.topic, e.payload, e.qos, e.created, p.bits, e.record)
                    )
            self._cursor = upto
        else:
            self._maybe_fetch()
        self._wake()

    def _maybe_fetch(self) -> None:
        if self._fetching or self._cursor >= self._o.committed_upto:
            return
        if len(self._rows) >= self._hold:
            return
        self._fetching = True
        self._fetch_task = asyncio.get_running_loop().create_task(
            self._fetch(), name=f"outbox-fetch[{self.name}]"
        )

    async def _fetch(self) -> None:
        try:
            rows, upto = await self._o.fetch(self.name, self._cursor, self._prefetch)
        except Exception as exc:
            log.exception("outbox.fetch_failed", destination=self.name)
            self._fetching = False
            self._o._read_failed(self.name, exc)
            return
        # Rows handed out meanwhile (none: fetching blocks live appends) keep order.
        self._rows.extend(r for r in rows if r.seq > self._cursor)
        self._cursor = max(self._cursor, upto)
        self._fetching = False
        self._wake()
        self._maybe_fetch()

    # -- SendQueue --

    def push(self, msg: Message) -> int:
        """Add a non-durable message; a retained one replaces an unsent one for its topic."""
        return self._push(msg, False)

    def push_telemetry(self, msg: Message) -> int:
        """Add a telemetry message: memory only, and the first to go when memory is full.

        Returns how many messages were dropped to stay within ``max_memory``
        (``dropped_telemetry`` counts the telemetry among them). Events are rows of the
        outbox and never count against this bound.
        """
        return self._push(msg, True)

    def _push(self, msg: Message, telemetry: bool) -> int:
        base = self._o.assigned_upto
        if base != self._mem_base:
            self._mem_base, self._mem_n = base, 0
        self._mem_n += 1
        key = (base << _KEY_SHIFT) | min(self._mem_n, (1 << _KEY_SHIFT) - 1)
        key = max(key, self._last_mem_key + 1)
        self._last_mem_key = key
        if msg.retain and (old := self._retained.get(msg.topic)) is not None:
            # Moves to the new position: it must follow the events committed before it.
            replaced = self._mem.pop(old, None)
            if self._tele.pop(old, 0) is None and replaced is not None:
                self._tele_bytes -= len(replaced.payload)
        self._mem[key] = msg
        if msg.retain:
            self._retained[msg.topic] = key
        if telemetry:
            self._tele[key] = None
            self._tele_bytes += len(msg.payload)
        dropped = 0
        limit = self.max_telemetry_bytes
        while len(self._mem) > self._max_memory or (
            limit is not None and self._tele_bytes > limit and self._tele
        ):
            # The oldest telemetry goes first: a state snapshot or a status is one per
            # topic (coalesced) and says more than one more reading of a value.
            if self._tele:
                victim = next(iter(self._tele))
                del self._tele[victim]
                self.dropped_telemetry += 1
                self._tele_bytes -= len(self._mem[victim].payload)
            else:
                victim = next(iter(self._mem))
            old_msg = self._mem.pop(victim)
            if old_msg.retain and self._retained.get(old_msg.topic) == victim:
                del self._retained[old_msg.topic]
            dropped += 1
        self._wake()
        return dropped

    def take(self) -> tuple[int, Message] | None:
        """The next message in key order: a committed row, or a memory message it precedes."""
        row_key = self._rows[0].seq << _KEY_SHIFT if self._rows else None
        if self._mem:
            mkey = next(iter(self._mem))
            ready = (mkey >> _KEY_SHIFT) <= self._cursor
            if ready and (row_key is None or mkey < row_key):
                msg = self._mem.pop(mkey)
                if msg.retain and self._retained.get(msg.topic) == mkey:
                    del self._retained[msg.topic]
                if self._tele and self._tele.pop(mkey, 0) is None:
                    self._tele_sent.add(mkey)
                    self._tele_bytes -= len(msg.payload)
                self._inflight[mkey] = msg
                return mkey, msg
        now = self._clock()
        while self._rows:
            rows, msg = self._next_item(now)
            if not rows:
                continue  # rows that cannot be encoded were released
            key = rows[-1].seq << _KEY_SHIFT
            self._inflight[key] = rows
            self._maybe_fetch()
            return key, msg
        self._maybe_fetch()
        return None

    def _next_item(self, now: float) -> tuple[list[Row], Any]:
        """The next rows to send (at least one taken from the front) and their message."""
        if self.route.batch and len(self._rows) > 1:
            taken = [self._rows.popleft() for _ in range(min(self._batch_max, len(self._rows)))]
            shaped = [(r, p) for r in taken if (p := self._shape(r, now)) is not None]
            assert self._batch_topic is not None
            body = batch_payload([p for _, p in shaped])
            return [r for r, _ in shaped], Message(self._batch_topic, body, 1, False)
        row = self._rows.popleft()
        payload = self._shape(row, now)
        if payload is None:
            return [], None
        return [row], Message(row.topic, payload, row.qos, False)

    def _delayed(self, row: Row, now: float) -> bool:
        """Sent late: left from a previous run, or more than ``delayed_after`` after commit."""
        return row.seq <= self._o.boot_seq or now - row.created > self._delayed_after

    def _shape(self, row: Row, now: float) -> bytes | None:
        """The row's bytes for this destination; ``None`` (row released) if unencodable."""
        record = row.record
        if record is None:
            return row.payload
        try:
            return self._o.encodings.encode(
                row.seq, record, self.route.operator, self._secret, delayed=self._delayed(row, now)
            )
        except ValueError as exc:
            self._unusable(row, exc)
            return None

    def _unusable(self, row: Row, exc: Exception) -> None:
        """A stored record no sink can encode (damage): released, with an error line."""
        log.error(
            "outbox.record_unencodable",
            destination=self.name,
            seq=row.seq,
            error=str(exc)[:200],
            detail="the row is released for this destination",
        )
        self._o.ack(self.name, [row.seq])

    def ack(self, key: int) -> None:
        """The broker acknowledged ``key``: rows are released in the outbox."""
        item = self._inflight.pop(key, None)
        if self._tele_sent:
            self._tele_sent.discard(key)
        if isinstance(item, list):
            self.sent_rows += len(item)
            self._o.ack(self.name, [r.seq for r in item])
            observe = self.on_delivered
            if observe is not None:
                now = self._clock()
                for row in item:
                    observe(now - row.created)

    def requeue(self) -> None:
        """Everything in flight goes back in front, in order (superseded states dropped)."""
        rows: list[Row] = []
        mem: list[tuple[int, Message]] = []
        for key, item in self._inflight.items():
            if isinstance(item, list):
                rows.extend(item)
            elif not (item.retain and item.topic in self._retained):
                mem.append((key, item))
        self._inflight.clear()
        rows.sort(key=lambda r: r.seq)
        self._rows.extendleft(reversed(rows))
        if mem:
            merged = sorted([*mem, *self._mem.items()])
            self._mem = dict(merged)
            for key, msg in mem:
                if msg.retain:
                    self._retained[msg.topic] = key
            if self._tele_sent:
                back = [(k, m) for k, m in mem if k in self._tele_sent]
                self._tele = dict.fromkeys(sorted([*self._tele, *(k for k, _ in back)]))
                self._tele_bytes += sum(len(m.payload) for _, m in back)
        self._tele_sent.clear()

    def oldest_key(self) -> int | None:
        """Smallest key still held or still to be read from the outbox."""
        candidates: list[int] = []
        if self._mem:
            candidates.append(next(iter(self._mem)))
        if self._rows:
            candidates.append(self._rows[0].seq << _KEY_SHIFT)
        if self._inflight:
            candidates.append(min(self._inflight))
        if self._cursor < self._o.assigned_upto:
            candidates.append((self._cursor + 1) << _KEY_SHIFT)
        return min(candidates) if candidates else None

    def oldest_created(self) -> float | None:
        """When the oldest row not yet acknowledged was committed; ``None`` when none is read.

        Rows are read in ``seq`` order, so the oldest unacknowledged row is in flight or
        first in line; rows not read yet (a fetch under way) are younger than those.
        """
        oldest: float | None = self._rows[0].created if self._rows else None
        for item in self._inflight.values():
            if isinstance(item, list) and item:
                created = item[0].created
                if oldest is None or created < oldest:
                    oldest = created
        return oldest

    @property
    def last_key(self) -> int:
        """Key of the newest message pushed or row appended."""
        return max(self._o.assigned_upto << _KEY_SHIFT, self._last_mem_key)

    @property
    def in_flight(self) -> int:
        """Messages handed to the publisher and not yet acknowledged."""
        return len(self._inflight)

    def __len__(self) -> int:
        """Memory messages plus rows stored for this destination and not yet acknowledged."""
        mem = len(self._mem) + sum(1 for v in self._inflight.values() if isinstance(v, Message))
        return mem + self._o.backlog(self.name)


class RecordQueue(OutboxQueue):
    """A destination that encodes typed records itself (the history sink).

    :meth:`take` hands out, one row at a time, each event's
    :class:`~gateway.delivery.records.Record` with the destination's operator policy
    applied to its payload, or the stored :class:`Message` of an opaque row (a sink that
    only takes records skips it, which acknowledges it).
    """

    def __init__(self, outbox: Outbox, route: Route, **options: Any) -> None:
        """Create the queue; a record destination takes rows one by one (no batch)."""
        if route.batch:
            raise ValueError("a record destination does not batch: its sink does")
        super().__init__(outbox, route, **options)

    def _next_item(self, now: float) -> tuple[list[Row], Any]:
        row = self._rows.popleft()
        record = row.record
        if record is None:
            return [row], Message(row.topic, row.payload, row.qos, False)
        if self.route.operator != "pass":
            record = record.with_data(redact(record.data, self.route.operator, self._secret))
        return [row], record
