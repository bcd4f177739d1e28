"""Crashes the fuzz targets found, kept as tests that always run.

Config loader: a self-referencing YAML alias and a control character in the file used to
escape as RecursionError / yaml ReaderError; both are ConfigErrors now.

OPC UA values: a String that is not UTF-8 on the wire (asyncua keeps the bytes as lone
surrogates) could not be encoded into any payload; an int beyond UInt64 could not be
written as JSON. Tracker restore let AttributeError and OverflowError out. Outbox after a
crash or a bad disk: wrong-typed cells, absurd seqs, unknown routing bits, unreadable
bookkeeping and a failed read each escaped as a raw exception, stalled a queue, or (routing
bits) reached a destination the row was not routed to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.cli.watch import FloorView
from gateway.config.loader import ConfigError, load_config
from gateway.contract.models import CommandError, decode_command
from gateway.core.model import Quality
from gateway.core.routing import Route
from gateway.core.tracker import MachineTracker, TrackerSettings
from gateway.delivery.outbox import Entry, Outbox, OutboxError
from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.opcua.values import convert, to_sample

#: Deeply nested JSON well inside the 16 KiB command size limit: ``json.loads`` recurses
#: once per level and raises RecursionError (not ValueError) past about 1000 levels.
DEEP = b"[" * 5000


def test_deeply_nested_command_payload_is_a_command_error() -> None:
    with pytest.raises(CommandError):
        decode_command("assign-order", DEEP)


def test_deeply_nested_payload_is_malformed_not_an_internal_error() -> None:
    view = FloorView("sf")
    view.apply("sf/s/a/l/m/state", DEEP, False)
    assert view.stats.malformed == 1
    assert not any("internal error" in p for p in view.problems), list(view.problems)


def test_a_recursive_yaml_alias_is_a_config_error() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gw.yaml"
        path.write_text("gateway: &a [*a]\n")
        with pytest.raises(ConfigError):
            load_config(path, env={})


def test_a_control_character_in_the_file_is_a_config_error() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gw.yaml"
        path.write_text("gateway:\x1f\n")
        with pytest.raises(ConfigError):
            load_config(path, env={})


# ---------------------------------------------------------------- OPC UA values


def test_an_opcua_string_that_is_not_utf8_maps_to_replacement_characters() -> None:
    """asyncua decodes String with surrogateescape: a CP1252 program name from the device."""
    from asyncua import ua
    from asyncua.common.utils import Buffer
    from asyncua.ua.ua_binary import struct_from_binary

    raw = b"Pr\xfcfung"
    # DataValue encoding mask 0x01 (a value follows), then the Variant: type byte, length, bytes.
    wire = b"\x01" + bytes([ua.VariantType.String.value]) + len(raw).to_bytes(4, "little") + raw
    variant = struct_from_binary(ua.DataValue, Buffer(wire)).Value
    assert variant is not None
    sample, reason = to_sample(
        "m1",
        "program",
        value=variant.Value,
        variant_type=variant.VariantType.name,
        status_code=0,
        status_name=None,
        source_timestamp=None,
        now=1.0,
    )
    assert reason is None and sample.quality is Quality.GOOD
    assert sample.value == "Pr\ufffdfung"
    json.dumps(sample.value, ensure_ascii=False).encode("utf-8")


def test_an_integer_beyond_uint64_is_a_decode_error_not_an_unencodable_value() -> None:
    with pytest.raises(DecodeError):
        convert(10**5000, "UInt64")
    assert convert(2**64 - 1, "UInt64") == 2**64 - 1


# ---------------------------------------------------------------- tracker state


@pytest.mark.parametrize(
    "change",
    [
        {"sequence": float("inf")},
        {"counters": []},
        {"last_time": {"good_count": 10**400}},
        {"commands": [1]},
    ],
)
def test_tracker_restore_of_a_damaged_state_is_a_value_error(change: dict[str, Any]) -> None:
    state = {**MachineTracker("m1", TrackerSettings()).export_state(), **change}
    with pytest.raises(ValueError, match="m1"):
        MachineTracker.restore("m1", TrackerSettings(), state)


# ---------------------------------------------------------------- outbox after damage


def _outbox_entry(n: int, dests: frozenset[str]) -> Entry:
    return Entry(
        machine="m1",
        topic=f"sf/s/a/l/m1/event/{n}",
        payload=b'{"n":%d}' % n,
        destinations=dests,
        event_type="machine.state.changed",
        created=1.0,
    )


async def _seeded(path: Path, dests: tuple[str, ...], rows: int) -> None:
    ob = Outbox(path, dests, commit_window=0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    ob.append([_outbox_entry(n, frozenset(dests)) for n in range(1, rows + 1)])
    await ob.flush()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await ob.close()


async def _topics(path: Path, dests: tuple[str, ...], name: str) -> list[str]:
    """Reopen and drain one destination; the topics it received."""
    ob = Outbox(path, dests, commit_window=0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    q = ob.queue(Route(name))
    ready = asyncio.Event()
    q.waker = ready.set
    q.start()
    got: list[str] = []
    try:
        async with asyncio.timeout(5):
            while True:
                item = q.take()
                if item is not None:
                    got.append(item[1].topic)
                    q.ack(item[0])
                    continue
                await ob.flush()
                if len(q) == 0:
                    return got
                await ready.wait()
                ready.clear()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


def _sql(path: Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(statement, args)
    finally:
        db.close()


async def test_rows_a_destination_cannot_send_are_dropped_at_open(tmp_path: Path) -> None:
    """A TEXT payload used to crash the queue's take() (bytes expected); seq 2**63-1 used to
    make the next insert raise OverflowError; both are now dropped with a log line."""
    path = tmp_path / "o.db"
    await _seeded(path, ("a",), 3)
    _sql(path, "UPDATE messages SET payload = 'text' WHERE seq = 1")
    _sql(path, "UPDATE messages SET seq = ? WHERE seq = 3", 2**63 - 1)
    with capture_logs() as logs:
        assert await _topics(path, ("a",), "a") == ["sf/s/a/l/m1/event/2"]
    assert any(e["event"] == "outbox.rows_unreadable" and e["dropped"] == 2 for e in logs)
    await _seeded(path, ("a",), 1)  # numbering goes on


async def test_an_unknown_destination_bit_never_reaches_a_new_destination(tmp_path: Path) -> None:
    """A damaged routing mask named bit 2, which the next new destination is given: it used to
    receive rows routed to another platform."""
    path = tmp_path / "o.db"
    await _seeded(path, ("a", "b"), 2)
    _sql(path, "UPDATE messages SET pending = pending | 4")
    assert await _topics(path, ("a", "b", "c"), "c") == []
    assert len(await _topics(path, ("a", "b", "c"), "a")) == 2


async def test_unreadable_bookkeeping_is_logged_and_the_outbox_opens(tmp_path: Path) -> None:
    """A non-integer seq counter or destination bit used to escape open() as ValueError /
    TypeError; a tracker state that is not a dict was dropped without a word."""
    path = tmp_path / "o.db"
    await _seeded(path, ("a",), 1)
    _sql(path, "UPDATE meta SET value = 'twelve' WHERE key = 'last_seq'")
    _sql(path, "INSERT INTO destinations VALUES ('ghost', 'x')")
    _sql(path, "INSERT INTO trackers VALUES ('m1', '[1]'), ('m2', ?)", "[" * 5000)
    with capture_logs() as logs:
        assert len(await _topics(path, ("a",), "a")) == 1
    names = [e["event"] for e in logs]
    assert "outbox.seq_unreadable" in names
    assert "outbox.destination_unreadable" in names
    assert names.count("outbox.tracker_state_unreadable") == 2


async def test_a_row_sqlite_cannot_decode_ends_run_with_outbox_error(tmp_path: Path) -> None:
    """A topic that is not UTF-8 fails the read; the queue used to stall silently."""
    path = tmp_path / "o.db"
    await _seeded(path, ("a",), 2)
    _sql(path, "UPDATE messages SET topic = CAST(X'ff' AS TEXT) WHERE seq = 1")
    ob = Outbox(path, ("a",), commit_window=0)
    await ob.open()
    q = ob.queue(Route("a"))
    q.start()
    try:
        with pytest.raises(OutboxError, match="reading rows for a"):
            async with asyncio.timeout(5):
                await ob.run()
    finally:
        await ob.close()
