"""The tick loop, task stop and "wait until the script ran" shared by every simulator server.

Each server (Modbus floor and line, PLC, OPC UA machine) advances its models in scenario
time (wall time since start times ``speed``) once per ``tick`` and writes what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable


def check_pace(speed: float, tick: float) -> None:
    """Raise ``ValueError`` unless ``speed`` and ``tick`` are finite and > 0."""
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed!r}")
    if not math.isfinite(tick) or tick <= 0:
        raise ValueError(f"tick must be > 0, got {tick!r}")


async def run_ticks(
    started: float,
    *,
    tick: float,
    speed: float,
    step: Callable[[float], Awaitable[None]],
) -> None:
    """Every ``tick`` s after loop time ``started``, await ``step(scenario seconds since it)``.

    Runs until cancelled. Ticks missed while the loop was busy are skipped: scenario time
    comes from the wall clock, so nothing is lost by skipping.
    """
    loop = asyncio.get_running_loop()
    deadline = started
    while True:
        deadline += tick
        now = loop.time()
        if deadline < now:
            deadline = now
        await asyncio.sleep(deadline - now)
        await step((loop.time() - started) * speed)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it; a failure of the task other than cancelling re-raises."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_finished(
    finished: asyncio.Event,
    task: asyncio.Task[None],
    timeout: float,  # noqa: ASYNC109 (the simulators' agreed API)
    *,
    name: str,
    stopped: str,
) -> None:
    """Return once ``finished`` is set; raise ``TimeoutError`` after ``timeout`` seconds.

    If the tick ``task`` ends first, its error is raised, else ``RuntimeError(stopped)``,
    instead of hanging. ``name`` names the helper task that waits for the event.
    """
    waiter = asyncio.create_task(finished.wait(), name=name)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    if not finished.is_set():
        task.result()
        raise RuntimeError(stopped)
