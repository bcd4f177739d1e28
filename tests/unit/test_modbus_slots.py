"""The connection slots of a shared Modbus line: first come, first served, never lost."""

from __future__ import annotations

import asyncio

from shopfloor_gateway.adapters.modbus.line import _SlotPool


async def test_free_slots_are_taken_at_once_and_waiters_served_in_order() -> None:
    pool = _SlotPool(1)
    first = await pool.take()
    order: list[str] = []

    async def unit(name: str) -> None:
        index = await pool.take()
        order.append(name)
        pool.give(index)

    waiting = [asyncio.create_task(unit(n)) for n in ("a", "b", "c")]
    await asyncio.sleep(0)  # every unit is now in line
    # A unit arriving now queues behind them even though it is handed the slot back at once.
    late = asyncio.create_task(unit("late"))
    await asyncio.sleep(0)
    pool.give(first)
    await asyncio.gather(*waiting, late)
    assert order == ["a", "b", "c", "late"]
    assert await pool.take() == first


async def test_a_cancelled_waiter_leaves_the_line_and_loses_no_slot() -> None:
    pool = _SlotPool(1)
    index = await pool.take()
    gone = asyncio.create_task(pool.take())
    stays = asyncio.create_task(pool.take())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    pool.give(index)
    assert await stays == index
    assert gone.cancelled()


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_ran_is_passed_on() -> None:
    pool = _SlotPool(1)
    index = await pool.take()
    first = asyncio.create_task(pool.take())
    second = asyncio.create_task(pool.take())
    await asyncio.sleep(0)
    pool.give(index)  # handed to `first`, which has not resumed yet...
    first.cancel()  # ...and is cancelled before it does
    assert await second == index
    assert first.cancelled()
