"""The live view against a real broker: retained state, events, duplicates, gaps, reconnects."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Literal

import aiomqtt
import pytest

from gateway.cli.broker import EmbeddedBroker, find_mosquitto, free_port
from gateway.cli.watch import FloorView, add_arguments, run, watch
from gateway.core.backoff import Backoff

pytestmark = pytest.mark.integration

PREFIX = "shopfloor"
BASE = f"{PREFIX}/plant1/sewing/line1"
FAST = Backoff(base=0.05, cap=0.2, floor=0.01)


def snapshot(machine: str, sequence: int, good: int) -> bytes:
    return json.dumps(
        {
            "machine": machine,
            "location": {"site": "plant1", "area": "sewing", "line": "line1", "machine": machine},
            "gateway_id": "gw-1",
            "time": "2026-11-22T10:00:00.000Z",
            "state": "running",
            "state_since": "2026-11-22T09:00:00.000Z",
            "connected": True,
            "order": {"order_id": "PO-1", "good": good, "scrap": 0, "target": 100, "percent": good},
            "alarm": None,
            "sequence": sequence,
            "updated_at": "2026-11-22T10:00:00.000Z",
        }
    ).encode()


def progress(machine: str, sequence: int, good: int) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": f"{machine}-{sequence}",
            "source": f"/shopfloor/plant1/sewing/line1/{machine}",
            "type": "io.shopfloor.order.progress",
            "time": "2026-11-22T10:00:01.000Z",
            "subject": machine,
            "sequence": sequence,
            "gatewayid": "gw-1",
            "data": {"order_id": "PO-1", "good": good, "scrap": 0, "target": 100, "percent": good},
        }
    ).encode()


async def publish_floor(port: int) -> None:
    """The retained part of the contract, as a gateway leaves it on the broker."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(
            f"{PREFIX}/plant1/gateway/gw-1/status", b'{"status":"online"}', qos=1, retain=True
        )
        await client.publish(f"{BASE}/sew-01/state", snapshot("sew-01", 10, 10), qos=1, retain=True)


@pytest.fixture(params=["mosquitto", "amqtt"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[EmbeddedBroker]:
    prefer: Literal["mosquitto", "amqtt"] = request.param
    if prefer == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    async with EmbeddedBroker(port=0, prefer=prefer) as running:
        yield running


async def test_watch_sees_retained_state_then_deduplicated_events_with_gaps(
    broker: EmbeddedBroker,
) -> None:
    await publish_floor(broker.port)
    joined = asyncio.Event()

    def until(view: FloorView) -> bool:
        row = view.machine("sew-01")
        if row is not None and row.state == "running":
            joined.set()
        return view.stats.events + view.stats.duplicates >= 4

    out = io.StringIO()
    task = asyncio.create_task(
        watch("127.0.0.1", broker.port, PREFIX, refresh=0.05, stream=out, until=until)
    )
    async with asyncio.timeout(5):
        await joined.wait()
        async with aiomqtt.Client("127.0.0.1", broker.port) as gateway:
            topic = f"{BASE}/sew-01/event/order.progress"
            for sequence, good in [(11, 11), (12, 12), (12, 12), (15, 15)]:  # dup 12, gap 13-14
                await gateway.publish(topic, progress("sew-01", sequence, good), qos=1)
        view = await task

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 15
    assert row.order_id == "PO-1"
    assert view.stats.events == 3
    assert view.stats.duplicates == 1
    assert view.stats.gaps == 1
    assert view.missing == 2
    assert view.gateways["plant1/gw-1"].status == "online"
    assert view.stats.malformed == 0

    screen = out.getvalue()
    assert "\x1b[" not in screen  # a StringIO is not a terminal: no clear codes, no colours
    last_frame = screen[screen.rindex("Shopfloor live view") :]
    assert "sew-01" in last_frame
    assert "duplicates 1  gaps 1 (2 missing)" in last_frame
    assert f"connected to 127.0.0.1:{broker.port}" in last_frame


async def test_watch_reconnects_when_the_broker_comes_back() -> None:
    port = free_port()
    unreachable = asyncio.Event()

    def until(view: FloorView) -> bool:
        if "broker unreachable" in view.link:
            unreachable.set()
        return view.machine("sew-01") is not None

    out = io.StringIO()
    task = asyncio.create_task(
        watch("127.0.0.1", port, PREFIX, refresh=0.02, stream=out, until=until, backoff=FAST)
    )
    async with asyncio.timeout(10):
        await unreachable.wait()
        async with EmbeddedBroker(port=port) as broker:
            await publish_floor(broker.port)
            view = await task

    assert view.link.startswith("connected")
    assert "broker unreachable" in out.getvalue()


async def test_watch_recovers_after_the_broker_restarts() -> None:
    port = free_port()
    seen_first = asyncio.Event()
    seen_unreachable = asyncio.Event()

    def until(view: FloorView) -> bool:
        row = view.machine("sew-01")
        if row is not None:
            seen_first.set()
        if seen_first.is_set() and "broker unreachable" in view.link:
            seen_unreachable.set()
        return seen_unreachable.is_set() and row is not None and row.good == 20

    task = asyncio.create_task(
        watch(
            "127.0.0.1", port, PREFIX, refresh=0.02, stream=io.StringIO(), until=until, backoff=FAST
        )
    )
    async with asyncio.timeout(10):
        async with EmbeddedBroker(port=port):
            await publish_floor(port)
            await seen_first.wait()
        await seen_unreachable.wait()
        async with EmbeddedBroker(port=port):
            async with aiomqtt.Client("127.0.0.1", port) as gateway:
                await gateway.publish(
                    f"{BASE}/sew-01/state", snapshot("sew-01", 20, 20), qos=1, retain=True
                )
            view = await task

    row = view.machine("sew-01")
    assert row is not None
    assert row.good == 20


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shopfloor watch")
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_once_prints_the_retained_state(
    broker: EmbeddedBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    await publish_floor(broker.port)

    code = await run(cli("--broker", f"127.0.0.1:{broker.port}", "--once", "--wait", "0.3"))

    assert code == 0
    screen = capsys.readouterr().out
    assert "sew-01" in screen
    assert "PO-1" in screen
    assert "gateways: gw-1 online" in screen


async def test_once_fails_clearly_without_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()

    code = await run(cli("--broker", f"127.0.0.1:{port}", "--once"))

    assert code == 2
    assert f"127.0.0.1:{port} unreachable" in capsys.readouterr().err


async def test_watch_returns_nothing_extra_when_cancelled(broker: EmbeddedBroker) -> None:
    started = asyncio.Event()

    def until(view: FloorView) -> bool:
        if view.link.startswith("connected"):
            started.set()
        return False

    task = asyncio.create_task(
        watch("127.0.0.1", broker.port, PREFIX, refresh=0.02, stream=io.StringIO(), until=until)
    )
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a real tty would."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("no_color", "coloured"), [("", True), ("1", False)])
async def test_terminal_gets_clear_screen_and_state_colours(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch, no_color: str, coloured: bool
) -> None:
    monkeypatch.setenv("NO_COLOR", no_color)
    await publish_floor(broker.port)
    out = Terminal()

    await watch(
        "127.0.0.1",
        broker.port,
        PREFIX,
        refresh=0.02,
        stream=out,
        until=lambda view: view.machine("sew-01") is not None,
        header="Demo: Ctrl-C stops",
    )

    screen = out.getvalue()
    assert screen.startswith("\x1b[H\x1b[2JDemo: Ctrl-C stops\n\nShopfloor live view")
    assert ("\x1b[32mrunning" in screen) is coloured
