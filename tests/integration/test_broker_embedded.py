"""EmbeddedBroker: both kinds carry publish/subscribe and retained messages, and always stop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Literal

import aiomqtt
import pytest

from gateway.cli.broker import BrokerStartError, EmbeddedBroker, find_mosquitto, probe

pytestmark = pytest.mark.integration

Prefer = Literal["mosquitto", "amqtt"]
#: Mosquitto is the broker the test suite trusts; amqtt is the demo fallback (forced here).
#: No skip when Mosquitto is missing: `make test` installs it, and a missing broker must
#: fail loudly rather than quietly test only the fallback.
KINDS = ["mosquitto", "amqtt"]


async def receive(client: aiomqtt.Client, count: int) -> list[aiomqtt.Message]:
    """The next ``count`` messages, within a bounded time."""
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(5):
        async for message in client.messages:
            got.append(message)
            if len(got) == count:
                break
    return got


@pytest.mark.parametrize("prefer", KINDS)
async def test_publish_subscribe_and_retained(prefer: Prefer) -> None:
    async with EmbeddedBroker(port=0, prefer=prefer) as broker:
        assert broker.kind == ("mosquitto" if prefer == "mosquitto" else "embedded")
        assert broker.port > 0

        async with aiomqtt.Client(broker.host, broker.port) as publisher:
            await publisher.publish("t/plant1/m1/state", b'{"state":"running"}', qos=1, retain=True)

            # A late joiner gets the retained snapshot first, then live messages.
            async with aiomqtt.Client(broker.host, broker.port) as subscriber:
                await subscriber.subscribe("t/#", qos=1)
                [retained] = await receive(subscriber, 1)
                assert str(retained.topic) == "t/plant1/m1/state"
                assert retained.payload == b'{"state":"running"}'
                assert retained.retain

                await publisher.publish("t/plant1/m1/event/x", b"live", qos=1)
                [live] = await receive(subscriber, 1)
                assert (str(live.topic), live.payload, live.retain) == (
                    "t/plant1/m1/event/x",
                    b"live",
                    False,
                )

    assert not await probe(broker.host, broker.port, within=0.5)


async def test_mosquitto_child_is_gone_after_exit() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    async with EmbeddedBroker(port=0) as broker:
        pid = broker.pid
        assert pid is not None
        os.kill(pid, 0)  # running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("prefer", KINDS)
async def test_cancelled_owner_leaves_no_broker_behind(prefer: Prefer) -> None:
    started = asyncio.Event()
    seen: list[EmbeddedBroker] = []

    async def owner() -> None:
        async with EmbeddedBroker(port=0, prefer=prefer) as broker:
            seen.append(broker)
            started.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(owner())
    async with asyncio.timeout(5):
        await started.wait()
    [broker] = seen
    pid = broker.pid
    assert await probe(broker.host, broker.port)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not await probe(broker.host, broker.port, within=0.5)
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("prefer", KINDS)
async def test_port_in_use_is_a_clear_error(prefer: Prefer) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(port=port, prefer=prefer, ready_timeout=2.0)
        with pytest.raises(BrokerStartError, match=str(port)):
            async with broker:
                pass
    assert broker.pid is None


async def test_amqtt_does_not_spam_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = EmbeddedBroker(port=0, prefer="amqtt")
    async with broker, aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("a/#", qos=1)
        await client.publish("a/b", b"x", qos=1)
        await receive(client, 1)

    chatter = [r for r in caplog.records if r.name.startswith(("amqtt", "transitions"))]
    assert chatter == []
