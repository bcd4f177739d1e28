"""The console's HTTP surface over a real loopback socket: every endpoint under hostile input,
the write endpoints' guards, no secret in any answer, and the committed OpenAPI document.

The host is a small stand-in for the runtime with real trackers and the real config loader;
the running gateway behind the console is covered by tests/integration/test_console_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config.loader import GatewayPlan, load_config
from gateway.contract.envelope import Topics
from gateway.core.model import Quality, Sample
from gateway.core.routing import RouteRules
from gateway.core.tracker import CommandResult, MachineTracker
from gateway.runtime.commands import Command, handle
from gateway.runtime.console.feed import ConsoleFeed
from gateway.runtime.console.models import openapi
from gateway.runtime.health import HealthServer
from gateway.runtime.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "console-T0ken-7f3a9"
SECRETS = {
    "BROKER_PASSWORD": "broker-Pa55-e81c",
    "ERP_PASSWORD": "erp-Pa55-44d0",
    "SITE_SECRET": "site-S3cret-90ab",
    "CONSOLE_TOKEN": TOKEN,
    "INFLUX_TOKEN": "influx-T0k-31f7",
}
CONFIG = """
gateway: {id: gw-1, site: plant-1}
destinations:
  - {name: default, host: 127.0.0.1, username: gw, password: '${BROKER_PASSWORD}', commands: true}
  - name: erp
    host: 127.0.0.1
    port: 1884
    username: erp
    password: '${ERP_PASSWORD}'
    routing: {customers: [acme]}
    operator: pseudonymise
redaction: {secret: '${SITE_SECRET}'}
influxdb: {url: 'http://127.0.0.1:1', org: o, bucket: b, token: '${INFLUX_TOKEN}'}
health: {token: '${CONSOLE_TOKEN}'COMMANDS_AS}
machines:
  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,
     tracker: {order_source: platform},
     connection: {protocol: modbus, host: 127.0.0.1, port: 5020}}
  - {id: sew-02, area: sewing, line: line-2, profile: sewing-station,
     connection: {protocol: modbus, host: 127.0.0.1, port: 5021}}
"""


class Host:
    """The runtime's side of the console: real trackers, commands through their rules."""

    def __init__(self, plan: GatewayPlan) -> None:
        self.plan = plan
        self.feed = ConsoleFeed()
        self.feed.configure(m.id for m in plan.machines)
        self.metrics = Metrics(gateway_id=plan.gateway_id, started_at=0.0, process=False)
        self.metrics.configure(m.id for m in plan.machines)
        self.topics = Topics(plan.topic_prefix, plan.site, plan.gateway_id)
        self.locations = {m.id: m.location for m in plan.machines}
        self.trackers = {m.id: MachineTracker(m.id, m.tracker) for m in plan.machines}
        self.customers: dict[tuple[str, str], str | None] = {}
        self.broken = False

    def apply_command(self, machine: str, command: Command, now: float) -> CommandResult:
        result, events = self.trackers[machine].command(command, now)
        customer = getattr(command, "customer", None)
        if result.accepted and customer is not None:
            self.customers[(machine, command.order_id)] = customer
        self.feed.events(machine, events)
        return result

    def customer_of(self, machine: str, order_id: str) -> str | None:
        return self.customers.get((machine, order_id))

    def snapshot(self, machine: str) -> dict[str, Any] | None:
        if self.broken:
            raise RuntimeError("collector bug")
        t = self.trackers.get(machine)
        return t.snapshot() if t is not None else None

    def queued_orders(self, machine: str) -> list[tuple[str, str | None]]:
        return self.trackers[machine].queued_orders()

    def delivery_errors(self) -> dict[str, str | None]:
        return {"default": None, "erp": "not authorised: check username and password"}

    def in_flight(self) -> dict[str, int]:
        return {"default": 2}

    def console_rules(self) -> tuple[RouteRules, str]:
        for d in self.plan.destinations:
            if d.name == self.plan.console_scope:
                return d.route.rules, d.name
        return RouteRules(), "console"


_PLANS: dict[tuple[bool, str | None], GatewayPlan] = {}


def make_plan(tmp_path: Path, *, token: bool = True, commands_as: str | None = None) -> GatewayPlan:
    """The test config compiled (once per variant: a plan is frozen, hosts may share it)."""
    key = (token, commands_as)
    if key not in _PLANS:
        _PLANS[key] = _compile(tmp_path, token=token, commands_as=commands_as)
    return _PLANS[key]


def _compile(tmp_path: Path, *, token: bool, commands_as: str | None) -> GatewayPlan:
    text = CONFIG.replace("COMMANDS_AS", f", commands_as: {commands_as}" if commands_as else "")
    if not token:
        text = text.replace("token: '${CONSOLE_TOKEN}'", "console: true")
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_config(path, env=SECRETS)


@pytest.fixture
async def host(tmp_path: Path) -> Host:
    h = Host(make_plan(tmp_path))
    now = time.time()
    h.feed.samples("sew-01", [Sample("sew-01", "good_count", 12, now, Quality.GOOD)])
    h.feed.samples("sew-01", [Sample("sew-01", "operator", "B-1234", now, Quality.GOOD)])
    for name in ("default", "erp"):
        h.metrics.destination_state(name, connected=True, backlog=3, oldest_age=1.5)
    return h


@pytest.fixture
async def server(host: Host) -> AsyncIterator[HealthServer]:
    async with HealthServer(
        host.metrics, "127.0.0.1", 0, request_timeout=0.25, console=host
    ) as srv:
        yield srv


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read the whole answer (the server closes the connection)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


def req(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for k, v in headers.items():
        head += f"{k.replace('_', '-')}: {v}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


READS = [
    "/healthz",
    "/metrics",
    "/",
    "/machines/sew-01",
    "/orders",
    "/deliveries",
    "/config",
    "/static/console.js",
    "/static/console.css",
    "/api/floor",
    "/api/machines/sew-01",
    "/api/orders",
    "/api/deliveries",
    "/api/config",
    "/api/openapi.json",
]
WRITES = ["/api/machines/sew-01/assign-order", "/api/machines/sew-01/cancel-order"]
EVERY = [*READS, "/api/stream", *WRITES]


@pytest.mark.parametrize("path", READS)
async def test_every_read_endpoint_answers(server: HealthServer, path: str) -> None:
    status, headers, body = await raw(server.port, req("GET", path))
    assert status in (200, 503), (path, body[:200])
    assert headers["Connection"] == "close"
    assert body
    status, _, body = await raw(server.port, req("HEAD", path))
    assert status in (200, 503) and body == b""


@pytest.mark.parametrize("path", EVERY)
async def test_every_endpoint_refuses_a_wrong_method_with_allow(
    server: HealthServer, path: str
) -> None:
    method = "GET" if path in WRITES else "POST"
    status, headers, _ = await raw(server.port, req(method, path))
    assert status == 405
    assert headers["Allow"] == ("POST" if path in WRITES else "GET,HEAD").replace(",", ", ")


@pytest.mark.parametrize("path", EVERY)
@pytest.mark.parametrize(
    ("template", "status"),
    [
        ("GET {path} SPDY/3\r\n\r\n", 400),
        ("GET {path}\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("GET {path} HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        ("GET {path} HTTP/1.1\r\nHost: x\r\nX: " + "a" * 10_000 + "\r\n\r\n", 431),
        ("GET {path}{huge} HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    ],
)
async def test_every_endpoint_answers_bad_requests_clearly(
    server: HealthServer, path: str, template: str, status: int
) -> None:
    data = template.format(path=path, huge="?q=" + "b" * 9000).encode("latin-1")
    assert (await raw(server.port, data))[0] == status


@pytest.mark.parametrize("path", EVERY)
async def test_a_silent_client_is_timed_out_on_every_endpoint(
    server: HealthServer, path: str
) -> None:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())  # never finishes
        data = await reader.read()
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert (await raw(server.port, req("GET", "/api/floor")))[0] == 200


async def test_a_slow_body_is_timed_out(server: HealthServer) -> None:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            req(
                "POST",
                WRITES[0],
                Authorization=f"Bearer {TOKEN}",
                Content_Type="application/json",
            ).replace(b"Content-Length: 0", b"Content-Length: 100")
            + b'{"order_id":'
        )
        data = await reader.read()
        writer.close()
    assert data.split(b"\r\n")[0] in (b"HTTP/1.1 408 Request Timeout",)


@pytest.mark.parametrize("path", [p for p in READS if p.startswith("/api/") and "openapi" not in p])
async def test_a_failing_view_gives_500_not_a_dead_server(
    server: HealthServer, host: Host, path: str
) -> None:
    host.broken = True
    if path in ("/api/orders", "/api/deliveries", "/api/config"):
        host.delivery_errors = None  # type: ignore[assignment,method-assign]
        host.feed.orders = None  # type: ignore[assignment]
        host.plan = None  # type: ignore[assignment]
    assert (await raw(server.port, req("GET", path)))[0] == 500
    assert (await raw(server.port, req("GET", "/metrics")))[0] == 200


@pytest.mark.parametrize("path", WRITES)
async def test_a_body_over_the_limit_is_413(server: HealthServer, path: str) -> None:
    body = b'{"order_id": "' + b"x" * 40_000 + b'"}'
    status, _, _ = await raw(
        server.port,
        req(
            "POST",
            path,
            body,
            Authorization=f"Bearer {TOKEN}",
            Content_Type="application/json",
        ),
    )
    assert status == 413


async def test_slow_clients_beyond_the_cap_are_closed_at_once_on_the_console(host: Host) -> None:
    async with HealthServer(
        host.metrics, "127.0.0.1", 0, request_timeout=1.0, max_connections=8, console=host
    ) as srv:
        slow = []
        async with asyncio.timeout(10):
            # Live streams hold connections too: they count against the cap.
            stream_r, stream_w = await asyncio.open_connection("127.0.0.1", srv.port)
            stream_w.write(req("GET", "/api/stream"))
            assert (await stream_r.readuntil(b"event: hello")).startswith(b"HTTP/1.1 200 ")
            for _ in range(40):
                slow.append(await asyncio.open_connection("127.0.0.1", srv.port))
            closed = 0
            for reader, _ in slow[7:]:
                async with asyncio.timeout(0.5):
                    closed += (await reader.read()) == b""
            assert closed == 33
            assert srv.active <= 8 and srv.refused >= 33
            for reader, _ in slow[:7]:
                assert (await reader.read()).startswith(b"HTTP/1.1 408 ")
            assert (await raw(srv.port, req("GET", "/api/floor")))[0] == 200
        stream_w.close()
        for _, writer in slow:
            writer.close()


# ------------------------------------------------------------------ writes


def assign(order_id: str = "PO-77", **extra: Any) -> bytes:
    return json.dumps({"order_id": order_id, "target": 10, **extra}).encode()


async def post(port: int, path: str, body: bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    status, _, answer = await raw(port, req("POST", path, body, **headers))
    return status, json.loads(answer)


GOOD = {"Authorization": f"Bearer {TOKEN}", "Content_Type": "application/json"}


async def test_assign_with_the_token_gives_the_mqtt_answer(
    server: HealthServer, host: Host
) -> None:
    status, doc = await post(server.port, WRITES[0], assign(command_id="c-1"), **GOOD)
    assert status == 200
    assert doc["accepted"] is True and doc["command"] == "assign-order"
    assert doc["machine"] == "sew-01" and doc["order_id"] == "PO-77"
    assert doc["command_id"] == "c-1"
    # The same command again: the tracker's duplicate answer, as over MQTT.
    status, doc = await post(server.port, WRITES[0], assign(command_id="c-1"), **GOOD)
    assert doc["reason"].startswith("duplicate command")
    _, _, body = await raw(server.port, req("GET", "/api/machines/sew-01"))
    detail = json.loads(body)
    assert detail["summary"]["order_id"] == "PO-77"
    assert [o["order_id"] for o in detail["orders"]] == ["PO-77"]
    # A second order waits in the queue, shown on the machine page.
    status, doc = await post(server.port, WRITES[0], assign("PO-78"), **GOOD)
    assert status == 200
    _, _, body = await raw(server.port, req("GET", "/api/machines/sew-01"))
    assert json.loads(body)["queue"] == [{"order_id": "PO-78", "customer": None}]
    status, doc = await post(server.port, WRITES[1], b'{"order_id": "PO-78"}', **GOOD)
    assert status == 200 and doc["accepted"] is True


async def test_refusals_match_the_mqtt_answers_word_for_word(
    server: HealthServer, host: Host
) -> None:
    cases = [
        b"{not json",
        json.dumps({"order_id": "PO-1", "target": -3}).encode(),
        json.dumps({"target": 3}).encode(),
        b"[1,2]",
    ]
    for body in cases:
        status, doc = await post(server.port, WRITES[0], body, **GOOD)
        assert status == 422 and doc["accepted"] is False
        mqtt = handle(
            prefix=host.topics.prefix,
            machines=host.locations,
            target=host,
            destination="console",
            topic=host.topics.command(host.locations["sew-01"], "assign-order"),
            payload=body,
            retained=False,
            response_topic=None,
            correlation_data=None,
            now=time.time(),
        )
        assert mqtt is not None
        expected = json.loads(mqtt.payload)
        assert {k: v for k, v in doc.items() if k != "time"} == {
            k: v for k, v in expected.items() if k != "time"
        }


async def test_an_unknown_machine_is_404_with_the_mqtt_reason(server: HealthServer) -> None:
    status, doc = await post(server.port, "/api/machines/nope/assign-order", assign(), **GOOD)
    assert status == 404
    assert doc["accepted"] is False and "unknown machine" in doc["reason"]


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        ({"Content_Type": "application/json"}, 401, "Authorization: Bearer"),
        (
            {"Content_Type": "application/json", "Authorization": "Bearer wrong"},
            401,
            "Authorization: Bearer",
        ),
        ({"Content_Type": "application/json", "Authorization": TOKEN}, 401, "Bearer"),
        # A plain HTML form from another site can send text/plain, never application/json.
        (
            {"Content_Type": "text/plain", "Authorization": f"Bearer {TOKEN}"},
            415,
            "application/json",
        ),
        ({**GOOD, "Origin": "http://evil.example"}, 403, "cross-site"),
        ({**GOOD, "Origin": "null"}, 403, "cross-site"),
    ],
)
async def test_write_guards(
    server: HealthServer, host: Host, headers: dict[str, str], status: int, words: str
) -> None:
    got, doc = await post(server.port, WRITES[0], assign(), **headers)
    assert got == status and words in doc["error"]
    assert host.queued_orders("sew-01") == [] and host.snapshot("sew-01")["order"] is None


async def test_a_same_origin_browser_request_is_accepted(server: HealthServer) -> None:
    origin = f"http://127.0.0.1:{server.port}"
    status, _, _ = await raw(
        server.port,
        req("POST", WRITES[0], assign(), Origin=origin, **GOOD).replace(
            b"Host: 127.0.0.1", f"Host: 127.0.0.1:{server.port}".encode()
        ),
    )
    assert status == 200


async def test_without_a_token_the_console_is_read_only(tmp_path: Path) -> None:
    host = Host(make_plan(tmp_path, token=False))
    async with HealthServer(host.metrics, "127.0.0.1", 0, console=host) as srv:
        for path in WRITES:
            status, doc = await post(srv.port, path, assign(), **GOOD)
            assert status == 403 and "read-only" in doc["error"] and "health.token" in doc["error"]
        _, _, body = await raw(srv.port, req("GET", "/api/config"))
        assert json.loads(body)["writable"] is False


async def test_commands_as_a_destination_get_its_scoping(tmp_path: Path) -> None:
    host = Host(make_plan(tmp_path, commands_as="erp"))
    async with HealthServer(host.metrics, "127.0.0.1", 0, console=host) as srv:
        status, doc = await post(srv.port, WRITES[0], assign(customer="globex"), **GOOD)
        assert status == 422
        assert doc["reason"] == "customer 'globex' is not served through this connection"
        # Its only customer is filled in, as over MQTT.
        status, doc = await post(srv.port, WRITES[0], assign("PO-9"), **GOOD)
        assert status == 200 and host.customer_of("sew-01", "PO-9") == "acme"


# ------------------------------------------------------------------ secrets and documents


async def test_no_secret_on_any_page_or_answer(server: HealthServer, host: Host) -> None:
    # An order with events, so every view has content.
    await post(server.port, WRITES[0], assign(), **GOOD)
    seen = b""
    for path in READS:
        seen += (await raw(server.port, req("GET", path)))[2]
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(req("GET", "/api/stream"))
        seen += await reader.readuntil(b"event: hello")
        writer.close()
    assert b"/api/floor" in seen and b"sew-02" in seen
    for name, value in SECRETS.items():
        assert value.encode() not in seen, name
    # The operator's badge is personal data: it stays in the gateway.
    assert b"B-1234" not in seen
    config = json.loads((await raw(server.port, req("GET", "/api/config")))[2])
    assert config["config"]["console"]["token"] == "***"
    assert config["config"]["influxdb"]["bucket"] == "b"
    assert set(config["config"]["influxdb"]["token"]) == {"*"}
    assert config["writable"] is True


def test_the_committed_openapi_document_is_current() -> None:
    doc = openapi()
    assert doc["openapi"] == "3.1.0"
    committed = json.loads((ROOT / "docs" / "console-openapi.json").read_text())
    assert committed == json.loads(json.dumps(doc)), "run: python -m gateway.runtime.console.models"
    # Every reference resolves.
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in doc["components"]["schemas"], name


async def test_the_openapi_document_is_served(server: HealthServer) -> None:
    status, headers, body = await raw(server.port, req("GET", "/api/openapi.json"))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == json.loads(json.dumps(openapi()))


async def test_pages_forbid_framing_and_foreign_scripts(server: HealthServer) -> None:
    status, headers, body = await raw(server.port, req("GET", "/"))
    assert status == 200 and b"/static/console.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    # No asset from anywhere else: the console works on a network without internet.
    for path in ("/", "/static/console.js", "/static/console.css"):
        text = (await raw(server.port, req("GET", path)))[2].decode()
        assert "http://" not in text.replace("http://${", "") or path == "/"
        assert "https://" not in text and "//cdn" not in text


async def test_an_unknown_machine_page_and_asset_are_404(server: HealthServer) -> None:
    assert (await raw(server.port, req("GET", "/machines/nope")))[0] == 404
    assert (await raw(server.port, req("GET", "/api/machines/nope")))[0] == 404
    assert (await raw(server.port, req("GET", "/static/..%2Fweb.py")))[0] == 404
    assert (await raw(server.port, req("GET", "/static/feed.py")))[0] == 404


def test_the_demo_prints_the_console_url_and_its_fresh_token() -> None:
    from gateway.cli.demo import DEMO_CONFIG, console_line

    plan = load_config(DEMO_CONFIG, env={"SHOPFLOOR_DEMO_TOKEN": "t-1"})
    assert console_line(plan) == "\nWeb console: http://127.0.0.1:19108/  (order token: t-1)"
    # Run outside the demo (no token given), the demo config's console is read-only.
    plan = load_config(DEMO_CONFIG, env={})
    assert plan.console_token is None
    assert console_line(plan) == "\nWeb console: http://127.0.0.1:19108/"


async def test_deliveries_show_each_destination_and_the_history_sink(
    server: HealthServer, host: Host
) -> None:
    host.metrics.destination_state("default", connected=True, backlog=3, published_total=40)
    host.metrics.destination_state(
        "influxdb", connected=False, backlog=9, oldest_age=12.5, dropped_total=4, required=False
    )
    _, _, body = await raw(server.port, req("GET", "/api/deliveries"))
    rows = {d["name"]: d for d in json.loads(body)["deliveries"]}
    assert rows["default"] | {"oldest_unacknowledged_s": None} == {
        "name": "default",
        "kind": "destination",
        "connected": True,
        "backlog": 3,
        "oldest_unacknowledged_s": None,
        "last_error": None,
        "sent": 42,
        "in_flight": 2,
        "acknowledged": 40,
        "dropped": 0,
        "limit": None,
    }
    assert rows["erp"]["last_error"] == "not authorised: check username and password"
    history = rows["influxdb"]
    assert history["kind"] == "history" and history["connected"] is False
    assert history["oldest_unacknowledged_s"] == 12.5 and history["dropped"] == 4


async def test_a_client_that_never_reads_its_answer_is_cut_off(host: Host) -> None:
    # An answer far bigger than the socket buffers, to a client that stops reading.
    size = 64_000_000
    host.metrics.render = lambda: b"#" * size  # type: ignore[method-assign]
    async with HealthServer(host.metrics, "127.0.0.1", 0, console=host, answer_timeout=0.5) as srv:
        async with asyncio.timeout(10):
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", srv.port))
            await loop.sock_sendall(sock, req("GET", "/metrics"))
            # The client's idleness is what is tested: longer than the answer may take.
            await asyncio.sleep(1.5)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := await loop.sock_recv(sock, 1 << 20):
                    got += len(chunk)
            sock.close()
            assert got < size, "the server waited for the idle client"
            assert srv.active == 0
            assert (await raw(srv.port, req("GET", "/api/floor")))[0] == 200


async def test_live_streams_are_bounded_and_get_pushes(server: HealthServer, host: Host) -> None:
    from gateway.runtime.console.web import MAX_STREAMS

    streams = []
    async with asyncio.timeout(10):
        for _ in range(MAX_STREAMS):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(req("GET", "/api/stream"))
            await reader.readuntil(b"event: hello\ndata: {}\n\n")
            streams.append((reader, writer))
        status, _, body = await raw(server.port, req("GET", "/api/stream"))
        assert status == 503 and b"live streams" in body
        # A change reaches every open stream, as the machine's floor line.
        await post(server.port, WRITES[0], assign("PO-LIVE"), **GOOD)
        for reader, _ in streams[:3]:
            await reader.readuntil(b"event: machines\n")
            line = await reader.readuntil(b"\n\n")
            rows = json.loads(line.removeprefix(b"data: "))
            assert [(r["id"], r["order_id"]) for r in rows] == [("sew-01", "PO-LIVE")]
    for _, writer in streams:
        writer.close()
