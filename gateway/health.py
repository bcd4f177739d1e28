"""A tiny HTTP server on a local port: ``/healthz`` and ``/metrics``.

No web framework: the gateway needs two read-only endpoints, so this is an
``asyncio.start_server`` handler that understands just enough HTTP/1.1 (one request per
connection, ``GET`` and ``HEAD``, bounded header size, a read timeout) and answers with
``Connection: close``.

* ``GET /healthz``: ``200`` with a JSON body when ready, ``503`` when not; the body has the
  checks, the problems and the status summary (version, uptime, devices online/total,
  backlog). Container health checks and load balancers read the code; people read the body.
* ``GET /metrics``: the Prometheus text format from :meth:`Metrics.render`.

It listens on ``127.0.0.1:9108`` by default: metrics name machines and orders, which stay
inside the factory unless someone chooses a wider address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from types import TracebackType
from typing import Self

import structlog

from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9108"
#: The classic text format every Prometheus version reads (what ``generate_latest`` writes).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEADER_BYTES = 8192
#: Requests served at once; more are closed at once. Slow or idle clients must not use up
#: the process's file descriptors, which the MQTT links and the outbox need.
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into a pair; ``ValueError`` says what is wrong.

    The host must be an IP address: a name would resolve at start-up to something the
    config file does not show.
    """
    raw = text.strip()
    if raw.startswith("["):
        host, sep, port_text = raw[1:].partition("]:")
        if not sep:
            raise ValueError(f"listen address {text!r}: write IPv6 as [address]:port")
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or not host:
            raise ValueError(f"listen address {text!r}: expected host:port, e.g. {DEFAULT_LISTEN}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen address {text!r}: {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and not raw.startswith("["):
        raise ValueError(f"listen address {text!r}: write IPv6 as [address]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r}: port must be 0..65535")
    return str(ip), int(port_text)


def parse_request_line(line: bytes) -> tuple[str, str]:
    """``(method, path)`` of an HTTP/1.x request line, query string removed."""
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ValueError(f"not an HTTP/1.x request line: {text[:80]!r}")
    method, target, _ = parts
    return method, target.split("?", 1)[0]


def response(
    status: int, body: bytes, content_type: str, *, head: bool = False, extra: str = ""
) -> bytes:
    """A complete HTTP/1.1 response with ``Connection: close``."""
    reason = _REASONS.get(status, "Unknown")
    headers = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"{extra}"
        "\r\n"
    )
    return headers.encode("ascii") + (b"" if head else body)


class HealthServer:
    """Serves ``/healthz`` and ``/metrics`` for one :class:`Metrics` until closed."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9108,
        *,
        request_timeout: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """Nothing listens until :meth:`start`; port 0 picks a free port."""
        self.metrics = metrics
        self._max_connections = max_connections
        #: Connections being served now, and those closed unanswered for being too many.
        self.active = 0
        self.refused = 0
        self.host = host
        self._port = port
        self._timeout = request_timeout
        self._server: asyncio.Server | None = None
        #: Set once the server listens (for a caller that started :meth:`run` as a task).
        self.listening = asyncio.Event()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._server is not None and self._server.sockets:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._port

    async def start(self) -> None:
        """Bind and start accepting; ``OSError`` when the address is taken."""
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, limit=MAX_HEADER_BYTES
        )
        self.listening.set()
        log.info("health.listening", address=f"{self.host}:{self.port}")

    async def close(self) -> None:
        """Stop accepting and wait for open requests to finish."""
        server, self._server = self._server, None
        self.listening.clear()
        if server is not None:
            server.close()
            # Python 3.12's wait_closed also waits for handlers; ours end within the timeout.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout + 1):
                    await server.wait_closed()

    async def run(self) -> None:
        """Start, serve until cancelled, then close (for a task in the runtime's group)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def __aenter__(self) -> Self:
        """Start serving."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop serving."""
        await self.close()

    def answer(self, method: str, path: str) -> bytes:
        """The response bytes for one request (no I/O; the routing table)."""
        head = method == "HEAD"
        if path not in ("/healthz", "/metrics", "/"):
            return response(404, b"not found\n", "text/plain; charset=utf-8", head=head)
        if method not in ("GET", "HEAD"):
            return response(
                405,
                b"only GET and HEAD\n",
                "text/plain; charset=utf-8",
                extra="Allow: GET, HEAD\r\n",
            )
        if path == "/metrics":
            return response(200, self.metrics.render(), METRICS_CONTENT_TYPE, head=head)
        if path == "/":
            body = b"shopfloor gateway: /healthz, /metrics\n"
            return response(200, body, "text/plain; charset=utf-8", head=head)
        report = self.metrics.health()
        body_obj = {**report.as_json(), **self.metrics.summary()}
        body_obj["gateway_id"] = self.metrics.gateway_id
        text = json.dumps(body_obj, separators=(",", ":")).encode() + b"\n"
        return response(200 if report.ready else 503, text, "application/json", head=head)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self._max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "health.too_many_connections",
                    limit=self._max_connections,
                    refused_total=self.refused,
                )
            writer.transport.abort()
            return
        self.active += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.active -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                writer.write(response(431, b"headers too large\n", "text/plain"))
                return
            except TimeoutError:
                writer.write(response(408, b"request timeout\n", "text/plain"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client went away; nothing to answer
            try:
                method, path = parse_request_line(head.split(b"\r\n", 1)[0])
            except ValueError as exc:
                log.debug("health.bad_request", error=str(exc))
                writer.write(response(400, b"bad request\n", "text/plain"))
                return
            try:
                payload = self.answer(method, path)
            except Exception:
                # A bug in a collector must not kill the server or hide as a hang.
                log.exception("health.handler_failed", path=path)
                payload = response(500, b"internal error\n", "text/plain")
            writer.write(payload)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await writer.drain()
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await writer.wait_closed()
