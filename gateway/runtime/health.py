"""The gateway's HTTP server on a local port: ``/healthz``, ``/metrics`` and the web console.

Built on aiohttp (an asyncio HTTP server made for a long-running daemon: streaming answers
for Server-Sent Events, bounded request bodies, clean shutdown), with a thin guard in front
of it for what aiohttp leaves to a reverse proxy:

* at most ``max_connections`` connections at once; more are closed at once, unanswered,
  so slow or idle clients cannot use up the file descriptors the MQTT links and the outbox
  need;
* a request whose head does not arrive within ``request_timeout`` gets ``408``; a head
  over :data:`MAX_HEADER_BYTES` gets ``431``;
* one request per connection (``Connection: close``), as before, and at most
  ``answer_timeout`` seconds from request to the end of the answer: a client that never
  reads a large answer is cut off instead of holding its place under the cap.

Endpoints:

* ``GET /healthz``: ``200`` with a JSON body when ready, ``503`` when not; the body has the
  checks, the problems and the status summary (version, uptime, devices online/total,
  backlog). Container health checks and load balancers read the code; people read the body.
* ``GET /metrics``: the Prometheus text format from :meth:`Metrics.render`.
* the console's pages and JSON API (:mod:`gateway.runtime.console.web`) when the runtime gives a
  console host.

It listens on ``127.0.0.1:9108`` by default: metrics name machines and orders, which stay
inside the factory unless someone chooses a wider address (which needs a console token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import structlog
from aiohttp import web

from gateway.runtime.metrics import Metrics

if TYPE_CHECKING:
    from gateway.runtime.console.web import Console, ConsoleHost

log = structlog.get_logger(__name__)
# aiohttp logs every malformed request at error with a traceback: anyone who can reach the
# port could fill the journal. Malformed requests get their 400; handler failures are logged
# by this module.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

#: The classic text format every Prometheus version reads (what ``generate_latest`` writes).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEADER_BYTES = 8192
#: Requests served at once; more are closed at once. Slow or idle clients must not use up
#: the process's file descriptors, which the MQTT links and the outbox need.
MAX_CONNECTIONS = 64
#: Largest request body accepted (commands are at most 16 KiB).
MAX_BODY_BYTES = 32 * 1024

_REASONS = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def raw_response(status: int, body: bytes) -> bytes:
    """A complete plain-text HTTP/1.1 answer with ``Connection: close`` (for the guard)."""
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's protocol per connection: the connection cap and the head timeout."""

    def __init__(self, server: HealthServer, inner: Any) -> None:
        self._server = server
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._refused = False
        self._head_done = False
        self._seen = 0
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        #: The first bytes received (the request line), to tell a live stream from the rest.
        self._first: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, yet have its methods.
        transport = cast(asyncio.Transport, transport)
        srv = self._server
        if srv.active >= srv.max_connections:
            self._refused = True
            srv.refused += 1
            if srv.refused == 1 or srv.refused % 1000 == 0:
                log.warning(
                    "health.too_many_connections",
                    limit=srv.max_connections,
                    refused_total=srv.refused,
                )
            transport.abort()
            return
        srv.active += 1
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(srv.request_timeout, self._too_slow)
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._answer_and_close(408, b"request timeout\n")

    def _answer_and_close(self, status: int, body: bytes) -> None:
        self._head_done = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(raw_response(status, body))
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._head_done:
            self._inner.data_received(data)
            return
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        if end < 0:
            if self._seen + len(data) > MAX_HEADER_BYTES:
                self._answer_and_close(431, b"headers too large\n")
                return
            self._seen += len(data)
            self._tail = window[-3:]
        else:
            head_len = self._seen - len(self._tail) + end + 4
            if head_len > MAX_HEADER_BYTES:
                self._answer_and_close(431, b"headers too large\n")
                return
            self._head_done = True
            if self._timer is not None:
                self._timer.cancel()
            first = (self._first or data).split(b"\r\n", 1)[0]
            if b" /api/stream" not in first:
                # A client that never reads a large answer must not hold its connection
                # (the cap counts it) for ever: an answer has this long to be taken.
                self._timer = asyncio.get_running_loop().call_later(
                    self._server.answer_timeout, self._abort
                )
        if self._first is None:
            self._first = data[:256]
        self._inner.data_received(data)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._server.active -= 1
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", headers=headers)


class HealthServer:
    """Serves ``/healthz``, ``/metrics`` (and the console, given a host) until closed."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9108,
        *,
        request_timeout: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
        console: ConsoleHost | None = None,
        answer_timeout: float = 30.0,
    ) -> None:
        """Nothing listens until :meth:`start`; port 0 picks a free port.

        ``console``: a :class:`gateway.runtime.console.web.ConsoleHost` to serve the web console
        and its API on the same port; ``None`` serves health and metrics only.
        ``answer_timeout``: seconds a connection may take from its request to the end of
        its answer (live streams excepted: a stream that stops being read is ended).
        """
        self.metrics = metrics
        self.max_connections = max_connections
        #: Connections being served now, and those closed unanswered for being too many.
        self.active = 0
        self.refused = 0
        self.host = host
        self._port = port
        self.request_timeout = request_timeout
        self.answer_timeout = answer_timeout
        self._console_host = console
        self.console: Console | None = None
        self._runner: web.AppRunner | None = None
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

    def _app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[self._errors],
            handler_args={
                "max_field_size": MAX_HEADER_BYTES,
                "max_line_size": MAX_HEADER_BYTES,
                # No waiting for the rest of an unread body after answering: a slow sender
                # must not hold a connection past the request timeout.
                "lingering_time": 0,
            },
        )
        app.router.add_route("*", "/healthz", self._healthz)
        app.router.add_route("*", "/metrics", self._metrics)
        if self._console_host is not None:
            from gateway.runtime.console.web import Console

            self.console = Console(self._console_host, self.request_timeout)
            self.console.mount(app)
        else:
            app.router.add_route("*", "/", self._index)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Clear plain answers for every failure; one request per connection."""
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            if exc.status == 405:
                allow = ", ".join(
                    m.strip() for m in exc.headers.get("Allow", "GET,HEAD").split(",")
                )
                resp = _text(405, f"only {allow}\n", Allow=allow)
            elif exc.status == 404:
                resp = _text(404, "not found\n")
            elif exc.status == 413:
                resp = _text(413, f"request body over {MAX_BODY_BYTES} bytes\n")
            else:
                raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            # A bug in a collector or page must not kill the server or hide as a hang.
            log.exception("health.handler_failed", path=request.path)
            resp = _text(500, "internal error\n")
        if not resp.prepared:
            resp.headers.setdefault("Cache-Control", "no-store")
            resp.force_close()
        return resp

    @staticmethod
    def _only_get(request: web.Request) -> None:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])

    async def _index(self, request: web.Request) -> web.Response:
        self._only_get(request)
        return _text(200, "shopfloor gateway: /healthz, /metrics\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        self._only_get(request)
        resp = web.Response(status=200, body=self.metrics.render())
        resp.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return resp

    async def _healthz(self, request: web.Request) -> web.Response:
        self._only_get(request)
        report = self.metrics.health()
        body_obj = {**report.as_json(), **self.metrics.summary()}
        body_obj["gateway_id"] = self.metrics.gateway_id
        text = json.dumps(body_obj, separators=(",", ":")).encode() + b"\n"
        resp = web.Response(status=200 if report.ready else 503, body=text)
        resp.headers["Content-Type"] = "application/json"
        return resp

    async def start(self) -> None:
        """Bind and start accepting; ``OSError`` when the address is taken."""
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        protocol = runner.server
        assert protocol is not None
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Guard(self, protocol()), self.host, self._port
            )
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.console is not None:
            self.console.start()
        self.listening.set()
        log.info("health.listening", address=f"{self.host}:{self.port}")

    async def close(self) -> None:
        """Stop accepting, end the live streams and wait for open requests to finish."""
        server, self._server = self._server, None
        runner, self._runner = self._runner, None
        self.listening.clear()
        if self.console is not None:
            await self.console.stop()
        if server is not None:
            server.close()
        if runner is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.request_timeout + 2):
                    await runner.cleanup()
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.request_timeout + 1):
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
