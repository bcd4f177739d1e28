"""Shutdown ends tasks that swallow a cancel (Python 3.11 wait_for inside libraries)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from gateway.runtime.gateway import finish


async def swallows_one_cancel(ended: list[str]) -> None:
    # What a lost cancel looks like from outside: the task waits on as if nothing happened.
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
    try:
        await asyncio.Event().wait()
    finally:
        ended.append("second")


async def test_a_task_that_swallows_its_cancel_is_cancelled_again() -> None:
    ended: list[str] = []
    task = asyncio.create_task(swallows_one_cancel(ended), name="commands[default]")
    polite = asyncio.create_task(asyncio.Event().wait(), name="ticker")
    await asyncio.sleep(0)
    async with asyncio.timeout(3):
        await finish([task, polite], within=2.0)
    assert task.cancelled() and polite.cancelled()
    assert ended == ["second"]


async def test_a_task_that_never_ends_is_named_and_left_to_the_deadline() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        async with asyncio.timeout(3):
            await finish([task], within=0.6)
    assert not task.done()
    assert [e["tasks"] for e in logs if e["event"] == "gateway.tasks_not_stopping"] == [
        ["stubborn"]
    ]
    release.set()
    await task
