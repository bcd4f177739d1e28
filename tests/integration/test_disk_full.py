"""A full disk on a real small filesystem: the outbox drops and holds, never crashes.

A 400 KiB tmpfs is mounted as the outbox's directory (the test runs as root). SQLite's page
limit, which the unit tests use, lets deletions through; a real full disk does not: in WAL
mode a deletion needs room in the WAL too, and so does the commit of the deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.core.routing import Route
from gateway.delivery.outbox import Entry, Outbox, OutboxQueue
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Subscriber
from tests.gatewayproc import events, gateway_process, stop

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tmpfs (a real full disk) needs root"
)


@contextlib.contextmanager
def small_disk(where: Path, size: str = "400k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``, unmounted afterwards whatever happened."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def step(n: int, *, order: int) -> list[Entry]:
    """One tracker step: a progress event and, every tenth, a lifecycle event."""
    body = {"id": f"id-{n}", "n": n, "pad": "p" * 400}
    out = [
        Entry(
            machine="m1",
            topic="t/m1/event/order.progress",
            payload=json.dumps({**body, "type": "order.progress"}).encode(),
            destinations=frozenset({"a"}),
            event_type="order.progress",
            order_id=f"PO-{order}",
            created=1000.0 + n,
        )
    ]
    if n % 10 == 0:
        out.append(
            Entry(
                machine="m1",
                topic="t/m1/event/order.started",
                payload=json.dumps({**body, "type": "order.started"}).encode(),
                destinations=frozenset({"a"}),
                event_type="order.started",
                order_id=f"PO-{order}",
                created=1000.0 + n,
            )
        )
    return out


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[tuple[Outbox, asyncio.Task[None]]]:
    ob = Outbox(path, ["a"], retry_delay=0.02, full_quiet=1.0)
    await ob.open()
    task = asyncio.create_task(ob.run())
    try:
        yield ob, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


def take_all(q: OutboxQueue, *, ack: bool) -> list[dict[str, object]]:
    """Everything the queue has ready now, acknowledged when ``ack``."""
    got = []
    while (item := q.take()) is not None:
        key, msg = item
        got.append(json.loads(msg.payload))
        if ack:
            q.ack(key)
    return got


class Machine:
    """Appends tracker steps like a running machine and remembers what it emitted."""

    def __init__(self, ob: Outbox) -> None:
        self.ob = ob
        self.n = 0
        self.started: list[int] = []
        self.progress = 0

    def step(self, *, lifecycle_only: bool = False) -> None:
        if lifecycle_only:
            self.n += 10 - self.n % 10
        entries = step(self.n, order=self.n // 50)
        if lifecycle_only:
            entries = entries[1:]
        for e in entries:
            if e.event_type == "order.started":
                self.started.append(self.n)
            else:
                self.progress += 1
        self.ob.append(entries, {"m1": {"n": self.n}})
        self.n += 1


async def test_a_full_tmpfs_drops_progress_holds_the_rest_and_recovers(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk, capture_logs() as logs:
        async with running(disk / "ob.db") as (ob, task):
            q = ob.queue(Route("a"), prefetch=50)
            q.start()
            m = Machine(ob)
            sent: list[dict[str, object]] = []
            # The broker is down: nothing is acknowledged, the backlog fills the disk, and
            # progress that newer progress supersedes goes first, as the overflow policy says.
            async with asyncio.timeout(30):
                while not ob.stats.dropped_progress:
                    assert not task.done(), task.exception()
                    m.step()
                    await asyncio.sleep(0.002)
            assert ob.disk_full
            # Then only lifecycle events are left: they are held in memory, not dropped.
            async with asyncio.timeout(30):
                while ob.committed_upto == ob.assigned_upto:
                    assert not task.done(), task.exception()
                    for _ in range(10):
                        m.step(lifecycle_only=True)
                    await asyncio.sleep(0.005)
            assert ob.disk_full
            # The broker is back: acknowledgements free the disk, the held events go in, and
            # the machine goes on producing.
            async with asyncio.timeout(30):
                while ob.disk_full or ob.committed_upto < ob.assigned_upto:
                    assert not task.done(), task.exception()
                    sent += take_all(q, ack=True)
                    m.step()
                    await asyncio.sleep(0.01)
                await ob.flush()
                while ob.backlog("a"):
                    sent += take_all(q, ack=True)
                    await asyncio.sleep(0.01)
            assert not task.done()
    full = [e for e in logs if e["event"] == "outbox.disk_full"]
    assert len(full) == 1, full
    assert [e["event"] for e in logs if e["event"] == "outbox.disk_writable"] == [
        "outbox.disk_writable"
    ]
    # Every lifecycle event reached the destination, in order; only progress went.
    started = [e["n"] for e in sent if e["type"] == "order.started"]
    assert started == m.started
    progress = [e["n"] for e in sent if e["type"] == "order.progress"]
    assert progress == sorted(set(progress))
    assert ob.stats.dropped_progress > 0
    # Rows already in the send window when dropped may still go out (docs/delivery.md).
    assert len(progress) + ob.stats.dropped_progress >= m.progress


async def wait_http(url: str, status: int, within: float = 20.0) -> dict[str, object]:
    """Poll ``url`` until it answers ``status``; its JSON body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: tuple[int, str] | None = None
    while loop.time() < deadline:
        with contextlib.suppress(OSError):
            last = await asyncio.to_thread(http_get, url)
            if last[0] == status:
                return dict(json.loads(last[1]))
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url}: wanted {status}, last answer {last}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def logged(log: Path) -> list[str]:
    """The ``event`` of every JSON line of the gateway's log, in order."""
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(str(entry.get("event")))
    return out


async def wait_log(log: Path, event: str, within: float = 20.0) -> None:
    """Wait until the gateway's JSON log has a line of ``event``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while event not in await asyncio.to_thread(logged, log):
        assert loop.time() < deadline, f"no {event} in the log"
        await asyncio.sleep(0.1)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem is full (another program eating the disk)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        for _ in range(10_000):
            f.write(b"\0" * 4096)
    return filler


async def test_the_gateway_process_stays_up_on_a_full_disk_and_recovers(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    health = free_port()
    # Orders of 100 pieces, 10 ms each: a progress event every 5 pieces (5 %).
    script = [Idle(0.5), *(RunOrder(f"PO-D{i}", target=100, piece_seconds=0.01) for i in range(90))]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    log = tmp_path / "gw.log"
    # 1 MiB: the events held in memory while the disk is full must fit once the filler is
    # gone, however long a loaded machine keeps the gateway producing them meanwhile (a
    # stored record holds its typed payload and its wire text).
    with small_disk(tmp_path / "state", size="1m") as disk:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "gateway: {id: gw-df, site: plant-1, topic_prefix: df}\n"
            f"state_dir: {disk}\n"
            f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
            "logging: {level: info, format: json}\n"
            f"health: {{listen: '127.0.0.1:{health}'}}\n"
            "machines:\n"
            "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
            f" poll_interval: 0.05, connection: {{protocol: modbus, host: 127.0.0.1,"
            f" port: {port}}}}}\n"
        )
        base = f"http://127.0.0.1:{health}"
        async with (
            Subscriber(mosquitto.host, mosquitto.port, "df/#", session="df-sub") as sub,
            SimulatedFloor(stations),
            gateway_process(cfg, log) as proc,
        ):
            await sub.wait_for(lambda ms: len(events(ms)) >= 5, timeout=20)
            # Another program fills the disk while the broker is away: the backlog must grow.
            filler = await asyncio.to_thread(fill, disk)
            mosquitto.stop()
            await wait_log(log, "outbox.disk_full")
            body = await wait_http(base + "/healthz", 503)
            assert body["checks"] == {
                "config": True,
                "outbox": False,
                "tasks": True,
                "destinations": True,
            }
            metrics = await asyncio.to_thread(http_get, base + "/metrics")
            assert "shopfloor_outbox_writable 0.0" in metrics[1], metrics[1][:2000]
            assert proc.returncode is None
            # Space comes back, and the broker: the held and stored events go out.
            mosquitto.start()
            filler.unlink()
            await wait_log(log, "outbox.disk_writable", within=40)
            await wait_http(base + "/healthz", 200)
            metrics = await asyncio.to_thread(http_get, base + "/metrics")
            assert "shopfloor_outbox_writable 1.0" in metrics[1]
            assert 'shopfloor_outbox_dropped_total{class="progress"}' in metrics[1]
            after = len(events(sub.messages))
            await sub.wait_for(lambda ms: len(events(ms)) > after + 20, timeout=20)
            assert proc.returncode is None
            await stop(proc)
            assert proc.returncode == 0
    assert logged(log).count("outbox.disk_full") == 1
    assert "OutboxError" not in log.read_text()
    # Sequence numbers are used once: one id per (machine, sequence).
    ids: dict[tuple[str, int], str] = {}
    for e in events(sub.messages):
        key = (e["subject"], e["sequence"])
        assert ids.setdefault(key, e["id"]) == e["id"], key
