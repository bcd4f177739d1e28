"""The delivery loop: a second event loop on its own thread, and its one-way boundary."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
import uvloop
from structlog.testing import capture_logs

from gateway.delivery import DeliveryLoop, DeliveryLoopClosed


@pytest.fixture
async def dl() -> AsyncIterator[DeliveryLoop]:
    d = DeliveryLoop("delivery-test")
    d.start()
    yield d
    d.stop()


async def _on_loop(d: DeliveryLoop) -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
    async def where() -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
        return threading.current_thread(), asyncio.get_running_loop()

    return await d.call(where())


async def test_calls_run_on_the_delivery_thread_and_return_their_result(dl: DeliveryLoop) -> None:
    thread, loop = await _on_loop(dl)
    assert thread is not threading.current_thread()
    assert thread.name == "delivery-test"
    assert loop is dl.loop and loop is not asyncio.get_running_loop()


async def test_posts_run_in_order_and_before_a_later_call(dl: DeliveryLoop) -> None:
    seen: list[tuple[int, str]] = []
    for i in range(500):
        dl.post(lambda i=i: seen.append((i, threading.current_thread().name)))

    async def snapshot() -> list[tuple[int, str]]:
        return list(seen)

    got = await dl.call(snapshot())
    assert [i for i, _ in got] == list(range(500))
    assert {name for _, name in got} == {"delivery-test"}


async def test_a_failing_call_raises_its_exception_here(dl: DeliveryLoop) -> None:
    async def fail() -> None:
        raise ValueError("outbox broke")

    with pytest.raises(ValueError, match="outbox broke"):
        await dl.call(fail())


async def test_cancelling_the_caller_waits_for_the_remote_cleanup(dl: DeliveryLoop) -> None:
    started = threading.Event()
    cleaned: list[str] = []

    async def long_running() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            # Cleanup that takes a few loop turns, as a publisher's goodbye does.
            await asyncio.sleep(0.05)
            cleaned.append(threading.current_thread().name)

    caller = asyncio.create_task(dl.call(long_running(), name="remote"))
    assert await asyncio.to_thread(started.wait, 5)
    assert dl.tasks() == 1
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The remote task had finished its cleanup when the cancellation came back.
    assert cleaned == ["delivery-test"]
    assert dl.tasks() == 0


async def test_a_call_on_a_stopped_loop_is_refused_and_a_post_is_logged() -> None:
    d = DeliveryLoop("stopped")
    d.start()
    d.stop()
    assert not d.running

    async def never() -> None:  # pragma: no cover - must not run
        raise AssertionError("ran after stop")

    with pytest.raises(DeliveryLoopClosed, match="not running"):
        await d.call(never())
    ran: list[int] = []
    with capture_logs() as logs:
        d.post(ran.append, 1)
    assert ran == []
    assert [e["event"] for e in logs] == ["delivery.post_after_stop"]


async def test_a_call_still_waiting_when_the_loop_stops_fails_instead_of_hanging() -> None:
    d = DeliveryLoop("stopping")
    d.start()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    caller = asyncio.create_task(d.call(forever()))
    assert await asyncio.to_thread(started.wait, 5)
    await asyncio.to_thread(d.stop)
    with pytest.raises(DeliveryLoopClosed, match="stopped before the call ended"):
        async with asyncio.timeout(5):
            await caller


def test_the_delivery_loop_is_uvloop_when_the_main_loop_is() -> None:
    async def main() -> tuple[str, str]:
        d = DeliveryLoop()
        d.start()
        try:
            _, loop = await _on_loop(d)
            return type(asyncio.get_running_loop()).__module__, type(loop).__module__
        finally:
            d.stop()

    main_kind, delivery_kind = uvloop.run(main())
    assert main_kind.startswith("uvloop") and delivery_kind.startswith("uvloop")
    main_kind, delivery_kind = asyncio.run(main())
    assert not main_kind.startswith("uvloop") and not delivery_kind.startswith("uvloop")


async def test_start_twice_is_a_bug(dl: DeliveryLoop) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        dl.start()
