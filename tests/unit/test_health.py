"""The /healthz and /metrics server over a real loopback socket."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.listen import parse_listen
from gateway.runtime.health import HealthServer
from gateway.runtime.metrics import Metrics


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    metrics = Metrics(gateway_id="gw-1", started_at=0.0, version="9.9", process=False)
    metrics.configure(["sew-01"])
    async with HealthServer(metrics, "127.0.0.1", 0, request_timeout=0.5) as srv:
        yield srv


async def raw(srv: HealthServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read the whole answer (the server closes the connection)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
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


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_healthz_is_503_until_a_destination_is_usable(server: HealthServer) -> None:
    status, headers, body = await raw(server, get("/healthz"))
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["status"] == "unavailable"
    assert doc["problems"] == ["no destination configured"]

    server.metrics.destination_state("default", connected=True, backlog=2)
    server.metrics.device_connected("sew-01", True)
    status, _, body = await raw(server, get("/healthz?verbose=1"))
    assert status == 200
    doc = json.loads(body)
    assert doc["status"] == "ok"
    assert doc["gateway_id"] == "gw-1"
    assert doc["devices_online"] == 1 and doc["devices_total"] == 1
    assert doc["backlog"] == 2 and doc["version"] == "9.9"


async def test_metrics_in_prometheus_text_format(server: HealthServer) -> None:
    server.metrics.event_emitted("order.started")
    # A real HTTP client, as Prometheus would be.
    url = f"http://127.0.0.1:{server.port}/metrics"
    resp = await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
    with resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"shopfloor_events", "shopfloor_device_connected", "shopfloor_gateway_ready"} <= names


async def test_head_has_headers_and_no_body(server: HealthServer) -> None:
    status, headers, body = await raw(server, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert int(headers["Content-Length"]) > 0
    assert body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/nope"), 404),
        (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        # HTTP/1.1 requires Host (RFC 9112 3.2).
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"GET /healthz SPDY/3\r\n\r\n", 400),
        (b"GET \xff HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_get_clear_answers(
    server: HealthServer, request_bytes: bytes, status: int
) -> None:
    assert (await raw(server, request_bytes))[0] == status


async def test_a_silent_client_is_timed_out_and_the_server_keeps_serving(
    server: HealthServer,
) -> None:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finishes the headers
        data = await reader.read()
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert (await raw(server, get("/metrics")))[0] == 200


async def test_a_failing_collector_gives_500_not_a_dead_server(server: HealthServer) -> None:
    def broken() -> bytes:
        raise RuntimeError("collector bug")

    server.metrics.render = broken  # type: ignore[method-assign]
    assert (await raw(server, get("/metrics")))[0] == 500
    assert (await raw(server, get("/healthz")))[0] == 503


async def test_run_serves_until_cancelled_and_frees_the_port() -> None:
    metrics = Metrics(gateway_id="gw-1", started_at=0.0, process=False)
    srv = HealthServer(metrics, "127.0.0.1", 0)
    task = asyncio.create_task(srv.run())
    async with asyncio.timeout(5):
        await srv.listening.wait()
    port = srv.port
    assert (await raw(srv, get("/")))[0] == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_port_in_use_is_an_oserror(server: HealthServer) -> None:
    other = HealthServer(server.metrics, "127.0.0.1", server.port)
    with pytest.raises(OSError):
        await other.start()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9108", ("::1", 9108)),
        (" 10.0.0.5:80 ", ("10.0.0.5", 80)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9108", "expected host:port"),
        ("localhost:9108", "not an IP address"),
        ("127.0.0.1:99999", "port must be"),
        ("127.0.0.1:http", "port must be"),
        ("::1:9108", "write IPv6 as"),
        ("[::1]9108", "write IPv6 as"),
    ],
)
def test_parse_listen_rejects_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


async def test_the_query_string_does_not_change_the_route(server: HealthServer) -> None:
    assert (await raw(server, get("/metrics?x=1")))[0] == 200


async def test_urllib_sees_503_as_an_error_like_a_healthcheck_would(server: HealthServer) -> None:
    url = f"http://127.0.0.1:{server.port}/healthz"
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
    assert info.value.code == 503
    info.value.close()


async def test_slow_clients_beyond_the_cap_are_closed_at_once_not_held() -> None:
    # 1,100 slow connections once took every file descriptor of the process.
    metrics = Metrics(gateway_id="gw-1", started_at=0.0, process=False)
    async with HealthServer(metrics, "127.0.0.1", 0, request_timeout=1.0, max_connections=8) as srv:
        slow = []
        async with asyncio.timeout(10):
            for _ in range(40):
                slow.append(await asyncio.open_connection("127.0.0.1", srv.port))
            # Past the cap, connections are closed unanswered at once (EOF, not a 1 s wait).
            closed = 0
            for reader, _ in slow[8:]:
                async with asyncio.timeout(0.5):
                    closed += (await reader.read()) == b""
            assert closed == 32
            assert srv.active <= 8
            assert srv.refused >= 32
            # The slow ones time out; the server answers again.
            for reader, _ in slow[:8]:
                assert (await reader.read()).startswith(b"HTTP/1.1 408 ")
            assert (await raw(srv, get("/metrics")))[0] == 200
        for _, writer in slow:
            writer.close()
