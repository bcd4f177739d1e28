"""The history runner never spins: a queue that holds items it cannot hand out yet is waited on.

The durable outbox's queue counts rows that are stored (or still being committed) before they
are read back into memory; ``take()`` hands out nothing until the commit or the read lands,
and both land through the event loop. A runner that retries ``take()`` without awaiting
starves them for ever: the gateway froze at 100% of a core with every poll stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.delivery.influx.sink import RunnerSettings, history_runner
from gateway.delivery.sendqueue import MemorySinkQueue

#: take() calls without the loop getting a turn in between: far more than a batch needs.
SPIN_LIMIT = 1000


class LateQueue(MemorySinkQueue[int]):
    """Counts its items before it can hand them out, as the outbox's queue does.

    Items pushed with :meth:`push_later` are counted at once but become takeable only on a
    later turn of the event loop (``call_soon``, like a commit or a read that lands), which
    then calls the runner's ``notify``. ``take()`` fails the test once it is called
    ``SPIN_LIMIT`` times without the loop having run in between.
    """

    def __init__(self) -> None:
        super().__init__(100_000)
        self.hidden: list[int] = []
        self.waker: object = None
        self._calls_this_turn = 0
        self._turn_marker: asyncio.Handle | None = None

    def push_later(self, items: Sequence[int], notify: object) -> None:
        self.hidden.extend(items)
        asyncio.get_running_loop().call_soon(self._land, notify)

    def _land(self, notify: object) -> None:
        for item in self.hidden:
            super().push(item)
        self.hidden.clear()
        assert callable(notify)
        notify()

    def _new_turn(self) -> None:
        self._calls_this_turn = 0
        self._turn_marker = None

    def take(self) -> tuple[int, int] | None:
        self._calls_this_turn += 1
        if self._calls_this_turn > SPIN_LIMIT:
            raise AssertionError("the runner calls take() in a loop without awaiting")
        if self._turn_marker is None:
            # Reset once the loop gets a turn: only calls within one turn count.
            self._turn_marker = asyncio.get_running_loop().call_soon(self._new_turn)
        return super().take()

    def __len__(self) -> int:
        return super().__len__() + len(self.hidden)


class Store:
    """A sink that keeps what it is given (it runs in the runner's worker thread)."""

    def __init__(self) -> None:
        self.items: list[int] = []

    def write(self, batch: Sequence[int]) -> None:
        self.items.extend(batch)


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
async def test_items_counted_before_they_can_be_taken_are_awaited(batch_size: int) -> None:
    queue = LateQueue()
    store = Store()
    runner = history_runner(
        store, settings=RunnerSettings(batch_size=batch_size, flush_interval=0.05), queue=queue
    )
    task = asyncio.create_task(runner.run())
    try:
        # Enough items that the runner sees a full batch waiting, none of them takeable yet.
        queue.push_later(range(max(batch_size, 5) * 2), runner.notify)
        async with asyncio.timeout(10):
            while len(store.items) < max(batch_size, 5) * 2:
                await asyncio.sleep(0.01)
                assert not task.done(), task.exception()
    finally:
        await runner.close(timeout=2)
        async with asyncio.timeout(5):
            await task
    assert store.items == list(range(max(batch_size, 5) * 2))


async def test_a_queue_that_never_hands_out_leaves_the_loop_free() -> None:
    # Counted but never takeable (a read that failed): the runner waits, the loop runs on.
    queue = LateQueue()
    queue.hidden.extend(range(5000))
    runner = history_runner(
        Store(), settings=RunnerSettings(batch_size=1000, flush_interval=0.01), queue=queue
    )
    task = asyncio.create_task(runner.run())
    ticks = 0
    async with asyncio.timeout(10):
        while ticks < 20:
            await asyncio.sleep(0.005)
            ticks += 1
            assert not task.done(), task.exception()
    await runner.close(timeout=0.1)
    async with asyncio.timeout(5):
        await task
