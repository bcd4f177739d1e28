"""A damaged outbox file: set aside with a loud error, salvaged, and the reset is marked.

The files are written by the outbox itself, then damaged the ways disks and people damage
them: truncated, pages zeroed, a garbage header, emptied to 0 bytes, one tracker state row
unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.core.model import Location
from gateway.delivery.outbox import Entry, Outbox
from gateway.delivery.records import Record

MACHINES = ("m1", "m2")
PER_MACHINE = 300


def event(machine: str, sequence: int) -> Entry:
    loc = Location("s", "a", "l", machine)
    data = {"order_id": "PO-1", "pad": "x" * 200}
    record = Record(
        machine, "order.started", loc, sequence, 1000.0, data, f"{machine}-{sequence}", "gw", 1
    )
    return Entry(
        machine=machine,
        topic=f"t/{machine}/event/order.started",
        payload=b"",
        destinations=frozenset({"a"}),
        event_type="order.started",
        order_id="PO-1",
        created=1000.0 + sequence,
        record=record,
    )


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Outbox]:
    ob = Outbox(path, ["a"])
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


async def written(path: Path) -> int:
    """An outbox with events of two machines, nothing acknowledged; returns its epoch."""
    async with opened(path) as ob:
        for n in range(1, PER_MACHINE + 1):
            ob.append(
                [event(m, n) for m in MACHINES],
                {m: {"machine": m, "sequence": n} for m in MACHINES},
            )
        await ob.flush()
        epoch = ob.epoch
    assert epoch > 0
    return epoch


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_pages(path: Path) -> None:
    """Three pages of rows in the middle of the file (about 50 of 600 rows) read as zeros."""
    data = bytearray(path.read_bytes())
    data[30 * 4096 : 33 * 4096] = bytes(3 * 4096)
    path.write_bytes(bytes(data))


def zero_index(path: Path) -> None:
    """The root page of an index (the tracker table's key) read as zeros."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        (page,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_trackers_1'"
        ).fetchone()
    data = bytearray(path.read_bytes())
    data[(page - 1) * 4096 : page * 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = b"this is not SQLite".ljust(100, b"?")
    path.write_bytes(bytes(data))


def set_aside(directory: Path) -> list[Path]:
    """Damaged files moved aside (their WAL, kept next to them, not counted)."""
    return [p for p in directory.iterdir() if ".damaged-" in p.name and not p.name.endswith("-wal")]


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate, zero_pages, zero_index, garbage_header, empty])
async def test_a_damaged_file_is_set_aside_salvaged_and_the_epoch_changes(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "ob.db"
    old_epoch = await written(path)
    damage(path)
    with capture_logs() as logs:
        async with opened(path) as ob:
            assert ob.epoch > old_epoch
            stored = ob.stats.stored
            salvaged_trackers = dict(ob.trackers)
            # Whatever was salvaged is readable and sendable, and new events go in after it.
            ob.append([event("m1", 10_000)], {"m1": {"machine": "m1", "sequence": 10_000}})
            await ob.flush()
            assert ob.stats.stored == stored + 1
    aside = set_aside(tmp_path)
    assert len(aside) == 1, aside
    errors = [e for e in logs if e["event"] == "outbox.damaged"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error", logs
    assert errors[0]["moved_to"] == str(aside[0])
    if damage is zero_pages:
        # Most of it survives: the rows and states on the pages left intact.
        assert PER_MACHINE < stored < 2 * PER_MACHINE
        assert salvaged_trackers
    if damage is zero_index:
        # No row was lost, only the index: everything is salvaged.
        assert stored == 2 * PER_MACHINE
        assert set(salvaged_trackers) == set(MACHINES)
    # The new file opens cleanly next time, with the same epoch.
    with capture_logs() as again:
        async with opened(path) as ob2:
            assert ob2.stats.stored == stored + 1
            assert ob2.epoch == ob.epoch
    assert not [e for e in again if e["log_level"] == "error"]


async def test_an_unreadable_tracker_row_keeps_the_sequence_and_marks_the_epoch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ob.db"
    old_epoch = await written(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE trackers SET state = '{not json' WHERE machine = 'm1'")
    with capture_logs() as logs:
        async with opened(path) as ob:
            assert "m1" not in ob.trackers
            assert ob.trackers["m2"]["sequence"] == PER_MACHINE
            # The stored events tell the last sequence m1 used.
            assert ob.recovered_sequences == {"m1": PER_MACHINE}
            assert ob.epoch > old_epoch
            assert ob.stats.stored == 2 * PER_MACHINE
    assert any(e["event"] == "outbox.tracker_state_unreadable" for e in logs)
    assert not set_aside(tmp_path)
