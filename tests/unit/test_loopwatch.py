"""The loop watch: lag, stalls named from outside the loop, and the hard shutdown deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from structlog.testing import capture_logs

from gateway.runtime.loopwatch import EXIT_HUNG, LoopWatch


def hog(seconds: float) -> None:
    """Hold the event loop without awaiting (what a buggy sink did)."""
    time.sleep(seconds)


async def test_a_stall_is_named_once_with_its_task_and_place_then_recovery() -> None:
    watch = LoopWatch(interval=0.02, stall_after=0.3, check_every=0.02)
    watch.start()
    beat = asyncio.create_task(watch.run(), name="loop-watch")
    try:
        await asyncio.sleep(0.1)
        assert watch.healthy()

        async def stuck() -> None:
            hog(0.8)

        with capture_logs() as logs:
            await asyncio.create_task(stuck(), name="influxdb")
            await asyncio.sleep(0.2)  # the loop turns again: recovered
        stalls = [e for e in logs if e["event"] == "loop.stalled"]
        assert len(stalls) == 1, logs
        assert stalls[0]["log_level"] == "warning"
        assert stalls[0]["task"] == "influxdb"
        assert any("hog" in f for f in stalls[0]["where"]), stalls[0]
        recovered = [e for e in logs if e["event"] == "loop.recovered"]
        assert len(recovered) == 1
        assert 0.5 <= recovered[0]["stalled_s"] <= 1.5
        assert watch.stalls == 1
        assert watch.healthy()
    finally:
        beat.cancel()
        watch.close()


async def test_health_and_lag_while_the_loop_is_blocked() -> None:
    watch = LoopWatch(interval=0.02, stall_after=0.2, check_every=0.02)
    watch.start()
    beat = asyncio.create_task(watch.run())
    seen: list[bool] = []
    try:
        await asyncio.sleep(0.05)
        watch.take_worst_lag()
        # Another thread asks while the loop is held (as /healthz's numbers would be read).
        probe = threading.Timer(0.4, lambda: seen.append(watch.healthy()))
        probe.start()
        hog(0.6)
        probe.join()
        await asyncio.sleep(0.05)
        assert seen == [False]
        assert watch.take_worst_lag() >= 0.45
        await asyncio.sleep(0.1)
        assert watch.take_worst_lag() < 0.2
    finally:
        beat.cancel()
        watch.close()


async def test_the_deadline_ends_the_process_with_its_reason_and_stacks() -> None:
    exits: list[int] = []
    done = threading.Event()

    def fake_exit(code: int) -> None:
        exits.append(code)
        done.set()

    watch = LoopWatch(interval=0.02, stall_after=0.3, check_every=0.02, exit_process=fake_exit)
    watch.start()
    beat = asyncio.create_task(watch.run())
    try:
        with capture_logs() as logs:
            watch.arm(0.2, "SIGTERM")
            watch.arm(5.0, "later")  # an earlier deadline stays
            assert await asyncio.to_thread(done.wait, 3)
        assert exits == [EXIT_HUNG]
        ended = [e for e in logs if e["event"] == "shutdown.deadline_exceeded"]
        assert len(ended) == 1
        assert ended[0]["reason"] == "SIGTERM"
        assert "MainThread" in ended[0]["threads"]
    finally:
        beat.cancel()
        watch.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopWatch(interval=0.5, stall_after=0.2)
