"""The fault catalogue of the chaos campaign, and the pieces that inject each fault.

Everything here acts from outside the gateway, as the world would: a small tmpfs that fills
up, bytes written into the outbox file while the gateway is stopped, an InfluxDB v2 write
endpoint that answers slowly, and the MQTT messages of a hostile platform. Nothing imports
the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Every fault the campaign may draw, with its weight. Faults marked ``stopped`` need the
#: gateway stopped while they are applied (the campaign restarts it afterwards).
CATALOGUE: dict[str, float] = {
    # A device misbehaves (through its fault proxy).
    "device_stall": 2.0,
    "device_cut": 2.0,
    "device_refuse": 1.0,
    "device_late": 1.0,
    "device_drop": 1.0,
    "device_latency": 1.0,
    # A platform's broker goes away for a while.
    "broker_outage": 2.0,
    # The gateway process is killed or stopped and started again.
    "gateway_sigkill": 2.0,
    "gateway_sigterm": 1.5,
    # The state directory (a real tmpfs) fills up.
    "disk_full": 1.5,
    # The outbox file is damaged while the gateway is stopped.
    "outbox_damage": 1.0,
    # The hostile platform.
    "hostile_squat": 1.5,
    "hostile_queue_flood": 1.0,
    "hostile_guess": 1.5,
    "command_flood": 1.0,
    "big_commands": 0.5,
    # The history sink answers very slowly.
    "slow_history": 1.0,
}

#: Faults that keep their effect for a while and are healed at the end of the episode.
LASTING = {"device_stall", "device_refuse", "device_latency", "disk_full", "slow_history"}


@dataclass
class Draw:
    """One fault drawn for an episode: what, when (seconds into the episode) and its knobs."""

    fault: str
    at: float
    params: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The draw as it goes into the report."""
        return {"fault": self.fault, "at": round(self.at, 2), **self.params}


def draw_episode(
    rng: random.Random,
    length: float,
    machines: list[str],
    *,
    allowed: list[str] | None = None,
    count: tuple[int, int] = (1, 3),
) -> list[Draw]:
    """Draw 1..3 faults (by catalogue weight) at random moments of an episode of ``length`` s."""
    names = [n for n in CATALOGUE if allowed is None or n in allowed]
    weights = [CATALOGUE[n] for n in names]
    n = rng.randint(*count)
    picked = rng.choices(names, weights=weights, k=n)
    draws = []
    for name in picked:
        at = rng.uniform(0.1, 0.5) * length
        params: dict[str, Any] = {}
        if name.startswith("device_"):
            params["machine"] = rng.choice(machines)
            if name in ("device_stall", "device_refuse"):
                params["seconds"] = round(rng.uniform(2, 10), 1)
            elif name == "device_late":
                params["seconds"] = round(rng.uniform(0.5, 3), 1)
            elif name == "device_drop":
                params["count"] = rng.randint(1, 3)
            elif name == "device_latency":
                params["seconds"] = round(rng.uniform(0.05, 0.4), 2)
                params["duration"] = round(rng.uniform(3, 10), 1)
        elif name == "broker_outage":
            params["broker"] = rng.choice(["acme", "zeta"])
            params["seconds"] = round(rng.uniform(1, 8), 1)
        elif name == "disk_full":
            params["seconds"] = round(rng.uniform(3, 12), 1)
            params["restart"] = rng.random() < 0.7
        elif name == "outbox_damage":
            params["mode"] = rng.choice(["truncate", "garbage", "zero", "wal_garbage"])
        elif name == "hostile_queue_flood":
            params["orders"] = rng.choice([64, 70, 80])
        elif name == "command_flood":
            params["messages"] = rng.choice([2000, 5000])
        elif name == "big_commands":
            params["megabytes"] = rng.choice([48, 96])
            params["count"] = rng.randint(3, 5)
        elif name == "slow_history":
            params["seconds"] = round(rng.uniform(3, 8), 1)
        draws.append(Draw(name, at, params))
    return sorted(draws, key=lambda d: d.at)


def proxy_command(draw: Draw) -> str:
    """The fault proxy's command line for a device fault."""
    p = draw.params
    match draw.fault:
        case "device_stall":
            return f"stall {p['seconds']}"
        case "device_cut":
            return "cut"
        case "device_refuse":
            return f"refuse {p['seconds']}"
        case "device_late":
            return f"late {p['seconds']}"
        case "device_drop":
            return f"drop {p['count']} down"
        case "device_latency":
            return f"latency {p['seconds']} {p['duration']}"
    raise ValueError(f"not a device fault: {draw.fault}")


class Tmpfs:
    """A real small tmpfs mounted at ``path`` (needs root); ``fill()`` makes its disk full."""

    def __init__(self, path: Path, size: str) -> None:
        """Prepare; nothing is mounted until ``mount()``."""
        self.path = path
        self.size = size
        self.mounted = False
        self.filler = path / "chaos-filler"

    def mount(self) -> None:
        """Mount the tmpfs (a clear error when not root)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            raise PermissionError("the full-disk fault mounts a tmpfs: run the campaign as root")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
            check=True,
        )
        self.mounted = True

    def umount(self) -> None:
        """Unmount (lazily, so a process still holding a file does not block it)."""
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False

    def fill(self) -> int:
        """Write a filler file until the filesystem says ENOSPC; returns the bytes written."""
        written = 0
        chunk = b"\0" * 65536
        # Unbuffered: each write meets ENOSPC itself, and closing has nothing left to flush.
        with self.filler.open("ab", buffering=0) as f:
            # Bounded: a tmpfs of a few MiB fills within a few hundred chunks.
            for _ in range(1_000_000):
                try:
                    written += f.write(chunk) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            # Smaller pieces for the last bytes, so not even a page is left.
            for size in (4096, 512, 64, 1):
                with contextlib.suppress(OSError):
                    for _ in range(65536 // size):
                        written += f.write(b"\0" * size) or 0
        return written

    def free(self) -> None:
        """Remove the filler."""
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def usage(self) -> dict[str, int]:
        """Bytes used and free on the tmpfs."""
        st = os.statvfs(self.path)
        return {
            "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "free": st.f_bavail * st.f_frsize,
        }


def damage_outbox(state_dir: Path, mode: str, rng: random.Random) -> dict[str, Any]:
    """Damage the outbox files while the gateway is stopped; says what was done."""
    db = state_dir / "shopfloor-outbox.db"
    wal = state_dir / "shopfloor-outbox.db-wal"
    if not db.exists():
        return {"mode": mode, "done": "no outbox file yet"}
    size = db.stat().st_size
    if mode == "truncate":
        keep = rng.randint(0, max(0, size - 1))
        with db.open("r+b") as f:
            f.truncate(keep)
        return {"mode": mode, "size_before": size, "size_after": keep}
    if mode == "garbage":
        offset = rng.randint(0, max(0, size - 4096))
        with db.open("r+b") as f:
            f.seek(offset)
            f.write(rng.randbytes(4096))
        return {"mode": mode, "size": size, "offset": offset, "bytes": 4096}
    if mode == "zero":
        db.write_bytes(b"")
        with contextlib.suppress(FileNotFoundError):
            wal.unlink()
        return {"mode": mode, "size_before": size}
    if mode == "wal_garbage":
        with wal.open("ab") as f:
            f.write(rng.randbytes(8192))
        return {"mode": mode, "wal_appended": 8192}
    raise ValueError(f"unknown damage mode {mode!r}")


def move_aside(state_dir: Path, tag: str) -> list[str]:
    """What an operator does when the gateway cannot start on a damaged outbox."""
    moved = []
    for p in sorted(state_dir.glob("shopfloor-outbox.db*")):
        target = p.with_name(f"{p.name}.chaos-{tag}")
        p.rename(target)
        moved.append(target.name)
    return moved


class SlowInflux:
    """A tiny InfluxDB v2 write endpoint on loopback that answers after ``delay`` seconds."""

    def __init__(self) -> None:
        """Prepare; ``start()`` binds a free port."""
        self.delay = 0.02
        self.writes = 0
        self.bytes = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on 127.0.0.1, a free port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end every open connection."""
        if self._server is not None:
            self._server.close()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            # Keep-alive: bounded by the client closing or by close().
            for _ in range(1_000_000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                await asyncio.sleep(self.delay)  # the slowness is the point of this server
                self.writes += 1
                self.bytes += len(body)
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
