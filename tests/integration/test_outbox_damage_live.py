"""A machine's tracker state unreadable at start: its sequences go on, the epoch changes.

The gateway runs as its own process. While the broker is away its events wait in the
outbox; the gateway is stopped, the machine's state row in the outbox is damaged, and the
gateway started again must neither reuse a sequence number nor hide that it lost the state.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Subscriber
from tests.gatewayproc import events, gateway_process, stop


def stored_events(db_path: Path, machine: str) -> list[int]:
    """Sequences of the machine's events waiting in the outbox (read-only, while it runs)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT sequence FROM messages WHERE machine = ?", (machine,)).fetchall()
    return sorted(s for (s,) in rows)


async def test_a_lost_tracker_state_continues_the_sequence_under_a_new_epoch(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    script = [Idle(0.3), *(RunOrder(f"PO-L{i}", target=100, piece_seconds=0.01) for i in range(60))]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    state = tmp_path / "state"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway: {id: gw-lt, site: plant-1, topic_prefix: lt}\n"
        f"state_dir: {state}\n"
        f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
        "logging: {level: info, format: json}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        "machines:\n"
        "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
        f" poll_interval: 0.05, connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}\n"
    )
    db_path = state / "shopfloor-outbox.db"
    async with (
        Subscriber(mosquitto.host, mosquitto.port, "lt/#", session="lt-sub") as sub,
        SimulatedFloor(stations),
    ):
        async with gateway_process(cfg, tmp_path / "gw1.log") as proc:
            await sub.wait_for(lambda ms: len(events(ms)) >= 10, timeout=20)
            mosquitto.stop()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while len(await asyncio.to_thread(stored_events, db_path, "sew-01")) < 5:
                assert loop.time() < deadline, "no events waited in the outbox"
                await asyncio.sleep(0.1)
            await stop(proc)
            assert proc.returncode == 0
        waiting = await asyncio.to_thread(stored_events, db_path, "sew-01")
        with sqlite3.connect(db_path) as db:
            db.execute("UPDATE trackers SET state = '{damaged' WHERE machine = 'sew-01'")
        first = events(sub.messages)
        old_epoch = first[0]["epoch"]
        mosquitto.start()
        async with gateway_process(cfg, tmp_path / "gw2.log") as proc:
            await sub.wait_for(
                lambda ms: any(e["epoch"] != old_epoch for e in events(ms)), timeout=20
            )
            await sub.wait_for(lambda ms: len(events(ms)) >= len(first) + 20, timeout=20)
            await stop(proc)
    evs = events(sub.messages)
    # The events that waited in the outbox arrive with the epoch they were made in.
    assert {e["sequence"] for e in evs if e["epoch"] == old_epoch} >= set(waiting)
    fresh = [e for e in evs if e["epoch"] != old_epoch]
    assert fresh and all(e["epoch"] > old_epoch for e in fresh)
    # No sequence number used twice: the new ones start after the last stored one.
    assert min(e["sequence"] for e in fresh) == max(waiting) + 1
    ids: dict[int, str] = {}
    for e in evs:
        assert ids.setdefault(e["sequence"], e["id"]) == e["id"], e["sequence"]


def config(tmp_path: Path, broker_port: int, device_port: int, extra: str = "") -> Path:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway: {id: gw-dm, site: plant-1, topic_prefix: dm}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"broker: {{host: 127.0.0.1, port: {broker_port}}}\n"
        "logging: {level: info, format: json}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        f"{extra}"
        "machines:\n"
        "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
        " poll_interval: 0.05, connection: {protocol: modbus, host: 127.0.0.1,"
        f" port: {device_port}}}}}\n"
    )
    return cfg


def logged(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_a_corrupt_outbox_file_is_set_aside_and_the_gateway_runs(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    script = [Idle(0.3), RunOrder("PO-C1", target=100, piece_seconds=0.01)]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "shopfloor-outbox.db").write_bytes(b"garbage, not SQLite " * 500)
    cfg = config(tmp_path, mosquitto.port, port)
    log = tmp_path / "gw.log"
    async with (
        Subscriber(mosquitto.host, mosquitto.port, "dm/#") as sub,
        SimulatedFloor(stations),
        gateway_process(cfg, log) as proc,
    ):
        await sub.wait_for(lambda ms: len(events(ms)) >= 3, timeout=20)
        await stop(proc)
        assert proc.returncode == 0
    damaged = [e for e in logged(log) if e["event"] == "outbox.damaged"]
    assert len(damaged) == 1 and damaged[0]["level"] == "error", damaged
    aside = Path(str(damaged[0]["moved_to"]))
    assert (await asyncio.to_thread(aside.read_bytes)).startswith(b"garbage, not SQLite")
    assert all(isinstance(e["epoch"], int) for e in events(sub.messages))
    assert "Traceback" not in log.read_text()


async def test_an_outbox_that_cannot_be_opened_stops_with_one_clear_line(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    where = tmp_path / "not-a-file"
    where.mkdir()
    cfg = config(tmp_path, mosquitto.port, free_port(), f"outbox: {{path: '{where}'}}\n")
    log = tmp_path / "gw.log"
    async with gateway_process(cfg, log) as proc:
        async with asyncio.timeout(20):
            await proc.wait()
    assert proc.returncode == 1
    # The start-up checks find it first (the same check `shopfloor check` runs), with the
    # file, line and field; an outbox that fails later says `outbox.failed` in one line.
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cannot start: ") and "outbox.path" in lines[0], lines
    assert str(where) in lines[0]
    assert "Traceback" not in log.read_text()
