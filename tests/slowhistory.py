"""A history database slower than the load: an InfluxDB v2 write endpoint with a points budget.

``POST /api/v2/write`` stores the body's lines and answers ``204`` only after the time its
points take at ``points_per_s`` (fields count as points, as InfluxDB bills them); requests
are served one at a time, so the budget holds for all writers together. ``GET /ping`` and
``/health`` answer at once. Everything else is ``404``. Runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self


@dataclass(slots=True)
class Stored:
    """One line as the endpoint received it."""

    measurement: str
    tags: dict[str, str]
    fields: int
    #: The field set as written (``a=1,b=2``).
    field_text: str
    time_ms: int
    arrived: float


def parse_line(line: str, arrived: float) -> Stored | None:
    """The parts of a line-protocol line the tests look at (no escapes in their names)."""
    try:
        head, fields, stamp = line.rsplit(" ", 2)
    except ValueError:
        return None
    measurement, *tag_parts = head.split(",")
    tags = dict(part.split("=", 1) for part in tag_parts if "=" in part)
    return Stored(measurement, tags, fields.count("=") or 1, fields, int(stamp), arrived)


@dataclass(slots=True)
class SlowHistory:
    """The endpoint; ``url`` once entered."""

    points_per_s: float = 5000.0
    lines: list[Stored] = field(default_factory=list)
    points: int = 0
    requests: int = 0
    url: str = ""
    _server: asyncio.Server | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _clients: set[asyncio.StreamWriter] = field(default_factory=set)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._clients):
                writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self._clients.add(writer)
        try:
            while True:  # keep-alive: influxdb-client reuses its connection
                async with asyncio.timeout(60):
                    head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (h.partition(":") for h in lines[1:] if h)
                }
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                if method == "POST" and path.startswith("/api/v2/write"):
                    async with self._lock:
                        now = loop.time()
                        got = [parse_line(x, now) for x in body.decode().splitlines() if x]
                        points = sum(s.fields for s in got if s is not None)
                        await asyncio.sleep(points / self.points_per_s)
                        self.lines.extend(s for s in got if s is not None)
                        self.points += points
                        self.requests += 1
                    status = b"204 No Content"
                elif path.startswith(("/ping", "/health")):
                    status = b"204 No Content"
                else:
                    status = b"404 Not Found"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()
