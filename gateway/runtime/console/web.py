"""The console's routes: pages, the JSON API, the live stream and the two order commands.

Reads come from the gateway's :class:`~gateway.runtime.console.feed.ConsoleFeed`, its metrics and
its plan; the order commands go through :func:`gateway.runtime.commands.handle`, the very function
that serves the MQTT downlink, so validation, scoping and answers are the same.

Write requests are safe against cross-site requests: they need the token in an
``Authorization: Bearer`` header (a browser never adds one by itself, and no cookie is
used), a JSON content type (which a plain HTML form cannot send), and an ``Origin``, when
the browser sends one, equal to the console's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Protocol

import structlog
from aiohttp import web
from pydantic import SecretStr

from gateway.config.loader import GatewayPlan, redacted
from gateway.contract.envelope import Topics
from gateway.core.model import Event, Location
from gateway.core.routing import RouteRules
from gateway.core.tracker import CommandResult
from gateway.core.vocabulary import OPERATORS_KEY, PERSONAL_SIGNALS
from gateway.runtime.commands import Command, handle
from gateway.runtime.console.feed import PUSH_INTERVAL, ConsoleFeed, MachineFeed
from gateway.runtime.console.models import (
    ConfigPage,
    ConnectionChange,
    Deliveries,
    Delivery,
    EventView,
    Floor,
    MachineDetail,
    MachineSummary,
    Orders,
    OrderView,
    QueuedOrder,
    Reload,
    SignalValue,
    openapi,
)
from gateway.runtime.metrics import Metrics

log = structlog.get_logger(__name__)

#: Live streams open at once; each is a connection, and pages must still load.
MAX_STREAMS = 16
#: Seconds between comments on an idle stream (proxies and tablets drop silent ones).
KEEPALIVE = 15.0
#: Keys never shown: who worked on an order is personal data, which stays in the tracker.
PERSONAL_KEYS = PERSONAL_SIGNALS | {OPERATORS_KEY}
PAGES = ("/", "/machines/{machine}", "/orders", "/deliveries", "/config")
STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class ConsoleHost(Protocol):
    """What the console reads from and asks of the running gateway."""

    plan: GatewayPlan
    feed: ConsoleFeed
    metrics: Metrics
    topics: Topics
    locations: dict[str, Location]

    def apply_command(self, machine: str, command: Command, now: float) -> CommandResult:
        """Run a command on a machine's tracker and publish the events it caused."""
        ...

    def customer_of(self, machine: str, order_id: str) -> str | None:
        """The customer an order on a machine was assigned for, if any."""
        ...

    def snapshot(self, machine: str) -> dict[str, Any] | None:
        """A machine's current tracker snapshot; ``None`` for an unknown machine."""
        ...

    def queued_orders(self, machine: str) -> list[tuple[str, str | None]]:
        """The platform orders waiting on a machine."""
        ...

    def delivery_errors(self) -> Mapping[str, str | None]:
        """The last error of each destination and sink (``None``: none yet)."""
        ...

    def in_flight(self) -> Mapping[str, int]:
        """Events sent to each destination and sink, not yet acknowledged."""
        ...

    def console_rules(self) -> tuple[RouteRules, str]:
        """The routing rules console commands are held to, and their origin name."""
        ...


def _public(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in PERSONAL_KEYS}


def event_dict(event: Event) -> dict[str, Any]:
    """An event for the API (personal fields left out), JSON-ready."""
    return {
        "type": event.type,
        "time": event.time,
        "sequence": event.sequence,
        "data": _public(event.data),
    }


def event_view(event: Event) -> EventView:
    """An event as its API model."""
    return EventView.model_validate(event_dict(event))


def summary_dict(
    machine: str, loc: Location, snap: Mapping[str, Any] | None, feed: MachineFeed | None
) -> dict[str, Any]:
    """The floor page's line for one machine, JSON-ready (the live stream's hot path)."""
    snap = snap or {}
    order = snap.get("order") or {}
    alarm = snap.get("alarm")
    last = feed.last_event if feed is not None else None
    if last is not None and feed is not None:
        # One conversion per event, not one per push.
        if feed.last_event_view is None or feed.last_event_view[0] is not last:
            feed.last_event_view = (last, event_dict(last))
        last_view: dict[str, Any] | None = feed.last_event_view[1]
    else:
        last_view = None
    return {
        "id": machine,
        "area": loc.area,
        "line": loc.line,
        "state": snap.get("state"),
        "connected": bool(snap.get("connected")),
        "order_id": order.get("order_id"),
        "order_status": order.get("status"),
        "good": order.get("good"),
        "scrap": order.get("scrap"),
        "target": order.get("target"),
        "percent": order.get("percent"),
        "eta": order.get("eta"),
        "at_risk": bool(feed is not None and feed.at_risk and order.get("status") == "running"),
        "queued": int(snap.get("queued") or 0),
        "alarm": (f"{alarm.get('code')}: {alarm.get('text') or ''}".strip(": ") if alarm else None),
        "last_event": last_view,
    }


def _order_status(events: list[Event]) -> str:
    for event in reversed(events):
        if event.type == "order.completed":
            return "completed"
        if event.type in ("order.started", "order.progress", "order.at_risk"):
            return "running"
    return "unknown"


class Console:
    """The console's routes and its live stream for one gateway."""

    def __init__(self, host: ConsoleHost, request_timeout: float) -> None:
        """Routes are added by :meth:`mount`; streams run between :meth:`start` and :meth:`stop`."""
        self.host = host
        self._timeout = request_timeout
        self._streams: set[asyncio.Queue[bytes | None]] = set()
        self._broadcaster: asyncio.Task[None] | None = None
        self._openapi = json.dumps(openapi(), indent=2).encode()
        self._static = resources.files("gateway.runtime.console").joinpath("static")

    # -- set-up --

    def mount(self, app: web.Application) -> None:
        """Add the console's routes to the application."""
        r = app.router
        for page in PAGES:
            r.add_route("*", page, self._page)
        r.add_route("*", "/static/{name}", self._asset)
        r.add_route("*", "/api/floor", self._get(self.floor))
        r.add_route("*", "/api/machines/{machine}", self._get(self.machine))
        r.add_route("*", "/api/orders", self._get(self.orders))
        r.add_route("*", "/api/deliveries", self._get(self.deliveries))
        r.add_route("*", "/api/config", self._get(self.config))
        r.add_route("*", "/api/openapi.json", self._openapi_doc)
        r.add_route("*", "/api/stream", self._stream)
        r.add_route("*", "/api/machines/{machine}/{command}", self._command)

    def start(self) -> None:
        """Start pushing changes to the streams."""
        self._broadcaster = asyncio.create_task(self._broadcast(), name="console-stream")

    async def stop(self) -> None:
        """End every stream (the server closes next)."""
        if self._broadcaster is not None:
            self._broadcaster.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broadcaster
            self._broadcaster = None
        for q in list(self._streams):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    # -- views --

    def floor(self, request: web.Request) -> Floor:
        """Every machine."""
        h = self.host
        return Floor(
            gateway_id=h.plan.gateway_id,
            site=h.plan.site,
            machines=[
                self._summary(m, loc)
                for m, loc in sorted(
                    h.locations.items(), key=lambda i: (i[1].area, i[1].line, i[0])
                )
            ],
        )

    def _summary(self, machine: str, loc: Location) -> MachineSummary:
        h = self.host
        row = summary_dict(machine, loc, h.snapshot(machine), h.feed.machines.get(machine))
        return MachineSummary.model_validate(row)

    def _orders_of(self, machine: str | None) -> list[OrderView]:
        out = []
        for (m, order_id), order in reversed(self.host.feed.orders.items()):
            if machine is not None and m != machine:
                continue
            events = list(order.events)
            out.append(
                OrderView(
                    machine=m,
                    order_id=order_id,
                    status=_order_status(events),
                    events=[event_view(e) for e in events],
                )
            )
        return out

    def machine(self, request: web.Request) -> MachineDetail:
        """One machine; 404 when the gateway has no such machine."""
        h = self.host
        machine = request.match_info["machine"]
        loc = h.locations.get(machine)
        if loc is None:
            raise web.HTTPNotFound()
        feed = h.feed.machines.get(machine) or MachineFeed()
        return MachineDetail(
            summary=self._summary(machine, loc),
            signals=[
                SignalValue(
                    signal=s.signal,
                    value=s.value,
                    quality=s.quality.value,
                    source_time=s.source_time,
                )
                for name, s in sorted(feed.signals.items())
                if name not in PERSONAL_KEYS
            ],
            events=[event_view(e) for e in reversed(feed.events)],
            connections=[
                ConnectionChange(time=t, connected=c, reason=r)
                for t, c, r in reversed(feed.connections)
            ],
            alarms=[event_view(e) for e in reversed(feed.alarms)],
            queue=[QueuedOrder(order_id=o, customer=c) for o, c in h.queued_orders(machine)],
            orders=self._orders_of(machine),
        )

    def orders(self, request: web.Request) -> Orders:
        """Recent orders of every machine, newest first."""
        return Orders(orders=self._orders_of(None))

    def deliveries(self, request: web.Request) -> Deliveries:
        """Destinations and the history sink."""
        errors = self.host.delivery_errors()
        flight = self.host.in_flight()
        return Deliveries(
            deliveries=[
                Delivery(
                    name=d.name,
                    kind="destination" if d.required else "history",
                    connected=d.connected,
                    backlog=d.backlog,
                    oldest_unacknowledged_s=d.oldest_age,
                    last_error=errors.get(d.name),
                    sent=d.published_total + flight.get(d.name, 0),
                    in_flight=flight.get(d.name, 0),
                    acknowledged=d.published_total,
                    dropped=d.dropped_total,
                    limit=d.limit,
                )
                for d in self.host.metrics.destination_views()
            ]
        )

    def config(self, request: web.Request) -> ConfigPage:
        """The running config with every secret masked, and the last reload."""
        h = self.host
        last = h.feed.last_reload
        cfg = redacted(h.plan)
        # JSON mode writes every SecretStr (the history token) as asterisks.
        influx = h.plan.influxdb
        cfg["influxdb"] = influx.model_dump(mode="json") if influx is not None else None
        cfg["console"] = {
            "listen": "{}:{}".format(*h.plan.health_listen) if h.plan.health_listen else None,
            "token": "***" if h.plan.console_token is not None else None,
            "commands_as": h.plan.console_scope,
        }
        return ConfigPage(
            config=cfg,
            last_reload=Reload(time=last.at, applied=last.applied, problems=last.problems)
            if last is not None
            else None,
            writable=h.plan.console_token is not None,
        )

    # -- handlers --

    @staticmethod
    def _only_get(request: web.Request) -> None:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])

    def _get(self, view: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            self._only_get(request)
            body = view(request).model_dump_json().encode()
            return self._json(200, body)

        return handler

    @staticmethod
    def _json(status: int, body: bytes, **headers: str) -> web.Response:
        resp = web.Response(status=status, body=body, headers={**SECURITY_HEADERS, **headers})
        resp.headers["Content-Type"] = "application/json"
        return resp

    def _problem(self, status: int, text: str, **headers: str) -> web.Response:
        return self._json(status, json.dumps({"error": text}).encode(), **headers)

    async def _openapi_doc(self, request: web.Request) -> web.Response:
        self._only_get(request)
        return self._json(200, self._openapi)

    async def _page(self, request: web.Request) -> web.Response:
        self._only_get(request)
        if "machine" in request.match_info and request.match_info["machine"] not in (
            self.host.locations
        ):
            raise web.HTTPNotFound()
        return self._file("index.html")

    async def _asset(self, request: web.Request) -> web.Response:
        self._only_get(request)
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        kind = STATIC_TYPES.get(suffix)
        if kind is None or "/" in name or name.startswith("."):
            raise web.HTTPNotFound()
        path = self._static.joinpath(name)
        if not path.is_file():
            raise web.HTTPNotFound()
        resp = web.Response(status=200, body=path.read_bytes(), headers=SECURITY_HEADERS)
        resp.headers["Content-Type"] = f"{kind}; charset=utf-8"
        return resp

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self._only_get(request)
        if len(self._streams) >= MAX_STREAMS:
            return self._problem(503, f"at most {MAX_STREAMS} live streams at once")
        resp = web.StreamResponse(
            status=200, headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream"}
        )
        resp.headers["Cache-Control"] = "no-store"
        resp.force_close()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        self._streams.add(queue)
        self.host.feed.subscribers += 1
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            await resp.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE):
                        chunk = await queue.get()
                except TimeoutError:
                    chunk = b": keepalive\n\n"
                if chunk is None:
                    break
                async with asyncio.timeout(self._timeout):
                    await resp.write(chunk)
        except TimeoutError:
            # The browser stopped reading: drop the connection rather than wait for its
            # buffer to drain (it reconnects by itself if it is still there).
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the browser went away; it reconnects by itself
        finally:
            self._streams.discard(queue)
            self.host.feed.subscribers -= 1
        return resp

    async def _broadcast(self) -> None:
        """Once per push interval at most: the changed machines, encoded once for all."""
        h = self.host
        feed = h.feed
        mark = feed.version
        pause = PUSH_INTERVAL
        sent: dict[str, dict[str, Any]] = {}
        while True:
            await feed.wait_change()
            await asyncio.sleep(pause)
            started = time.thread_time()
            mark, changed = feed.changed_since(mark)
            feed.settle()
            if not changed or not self._streams:
                continue
            rows = []
            for m in changed:
                loc = h.locations.get(m)
                if loc is None:
                    continue
                row = summary_dict(m, loc, h.snapshot(m), feed.machines.get(m))
                # A poll that changed nothing shown (most of them) sends nothing.
                if sent.get(m) != row:
                    sent[m] = row
                    rows.append(row)
            if len(sent) > 2 * len(h.locations) + 16:
                sent = {m: r for m, r in sent.items() if m in h.locations}
            if not rows:
                continue
            data = json.dumps(rows, separators=(",", ":")).encode()
            chunk = b"event: machines\ndata: " + data + b"\n\n"
            # The pushes take at most ~0.5% of a core: a floor so large that one push costs
            # more than 5 ms is pushed less often.
            pause = max(PUSH_INTERVAL, (time.thread_time() - started) * 200)
            for q in list(self._streams):
                try:
                    q.put_nowait(chunk)
                except asyncio.QueueFull:
                    # A browser that does not read: end its stream, it reconnects and
                    # reloads the floor.
                    with contextlib.suppress(asyncio.QueueEmpty):
                        q.get_nowait()
                    q.put_nowait(None)

    async def _command(self, request: web.Request) -> web.Response:
        """``assign-order`` / ``cancel-order`` over HTTP: the MQTT command's rules and answer."""
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        h = self.host
        command = request.match_info["command"]
        if command not in ("assign-order", "cancel-order"):
            raise web.HTTPNotFound()
        token = h.plan.console_token
        if token is None:
            return self._problem(
                403,
                "the console is read-only: set health.token or health.token_file in the "
                "gateway config to accept orders over HTTP",
            )
        origin = request.headers.get("Origin")
        if origin is not None and origin not in (
            f"http://{request.host}",
            f"https://{request.host}",
        ):
            return self._problem(403, f"cross-site request from {origin[:100]!r} refused")
        if request.content_type != "application/json":
            return self._problem(415, "send the command as Content-Type: application/json")
        if not _token_ok(request.headers.get("Authorization", ""), token):
            return self._problem(
                401,
                "send the console token as 'Authorization: Bearer TOKEN'",
                **{"WWW-Authenticate": 'Bearer realm="shopfloor"'},
            )
        try:
            async with asyncio.timeout(self._timeout):
                payload = await request.read()
        except TimeoutError:
            resp = web.Response(status=408, text="request timeout\n", content_type="text/plain")
            return resp
        machine = request.match_info["machine"]
        loc = h.locations.get(machine)
        rules, origin_name = h.console_rules()
        topic_loc = loc if loc is not None else Location(h.plan.site, "-", "-", machine)
        reply = handle(
            prefix=h.topics.prefix,
            machines=h.locations,
            target=h,
            rules=rules,
            destination=origin_name,
            topic=h.topics.command(topic_loc, command),
            payload=payload,
            retained=False,
            response_topic=None,
            correlation_data=None,
            now=time.time(),
        )
        if reply is None:
            return self._problem(404, "not a machine of this gateway")
        accepted = bool(json.loads(reply.payload).get("accepted"))
        status = 200 if accepted else (404 if loc is None else 422)
        return self._json(status, reply.payload)


def _token_ok(header: str, token: SecretStr) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())
