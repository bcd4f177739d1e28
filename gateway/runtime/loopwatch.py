"""Event-loop health: lag measured on the loop, stalls seen from a thread, a hard stop deadline.

Everything the gateway does runs on one event loop, so one piece of code that never awaits
(a loop that retries at once, a blocking call) stops every poll, every publish, the health
check and the SIGTERM handling with it. :class:`LoopWatch` makes that visible and bounded:

* **Lag** (:meth:`LoopWatch.run`, a task on the loop): it sleeps ``interval`` and measures how
  late it woke. The worst lag of each report period is exported as
  ``shopfloor_event_loop_lag_seconds``; the task's heartbeat also tells :meth:`healthy`
  whether the loop turns, which gates the systemd watchdog pings.
* **Stalls** (a daemon thread, ``loop-watch``): when the heartbeat has not come for
  ``stall_after`` seconds (1 s), the thread logs ``loop.stalled`` once, at warning, naming
  the task that holds the loop and where it is (the loop thread's innermost frames), and
  ``loop.recovered`` with the stall's length once the loop turns again. It reads the loop
  from outside, so it reports a stall while it lasts, not after.
* **Deadline** (:meth:`LoopWatch.arm`): SIGTERM, or a core task that ended by itself, arms
  it. When the process is still alive at the deadline the thread logs
  ``shutdown.deadline_exceeded`` with the stack of every thread and ends the process with
  exit code :data:`EXIT_HUNG`: whatever a task does, the gateway exits within its grace.
  Nothing committed is lost that way: events are in SQLite before they count as emitted,
  and whatever a broker had not acknowledged is sent again at the next start.

The thread only reads the heartbeat, the frames and the deadline; it never touches the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

#: Exit code when the shutdown deadline passed (sysexits ``EX_SOFTWARE``): systemd's
#: ``Restart=on-failure`` starts the gateway again.
EXIT_HUNG = 70
#: Frames named in a stall warning, innermost last.
STALL_FRAMES = 6


def where(frame: object | None, limit: int = STALL_FRAMES) -> list[str]:
    """A frame's innermost ``limit`` stack entries as ``file:line function`` (innermost last)."""
    if frame is None:
        return []
    stack = traceback.extract_stack(frame)  # type: ignore[arg-type]
    return [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in stack[-limit:]]


class LoopWatch:
    """Watches one event loop: lag, stalls and the shutdown deadline (see the module doc)."""

    def __init__(
        self,
        *,
        interval: float = 0.25,
        stall_after: float = 1.0,
        check_every: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        """A watch that is not running yet; :meth:`start` it from the loop's thread."""
        if not (interval > 0 and stall_after > interval and check_every > 0):
            raise ValueError("need interval > 0, stall_after > interval and check_every > 0")
        self.interval = interval
        self.stall_after = stall_after
        self._check_every = check_every
        self._clock = clock
        self._exit = exit_process
        self._beat = clock()
        self._worst = 0.0
        self.last_lag = 0.0
        #: Stalls longer than ``stall_after`` seen so far.
        self.stalls = 0
        self._deadline: float | None = None
        self._reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- on the loop --

    def start(self) -> None:
        """Begin watching the running loop (call on the loop's thread, before :meth:`run`)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat = self._clock()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
            self._thread.start()

    async def run(self) -> None:
        """Measure the loop's lag until cancelled (the heartbeat the thread watches)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - due)
            self.last_lag = lag
            with self._lock:
                self._worst = max(self._worst, lag)
                self._beat = self._clock()

    def take_worst_lag(self) -> float:
        """The worst lag since the last call (seconds), and start a new period."""
        with self._lock:
            # A stall still going on counts as lag already, though the loop has not woken.
            silent = self._clock() - self._beat - self.interval
            worst = max(self._worst, silent)
            self._worst = 0.0
        return max(0.0, worst)

    def healthy(self) -> bool:
        """True while the loop turns (its heartbeat is younger than ``stall_after``)."""
        return self._clock() - self._beat < self.stall_after

    # -- from anywhere (signal handlers, done callbacks, other threads) --

    def arm(self, seconds: float, reason: str) -> None:
        """End the process if it is still alive ``seconds`` from now (an earlier one stays)."""
        at = self._clock() + seconds
        with self._lock:
            if self._deadline is None or at < self._deadline:
                self._deadline = at
                self._reason = reason

    @property
    def armed(self) -> bool:
        """True once a deadline is set."""
        return self._deadline is not None

    def close(self) -> None:
        """Stop the thread (the process ends normally)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._thread = None

    # -- the thread --

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(self._check_every):
            now = self._clock()
            with self._lock:
                beat, deadline, reason = self._beat, self._deadline, self._reason
            silent = now - beat
            if silent > self.stall_after and stalled_since is None:
                stalled_since = beat
                self.stalls += 1
                task, frames = self._holder()
                log.warning(
                    "loop.stalled",
                    stalled_s=round(silent, 2),
                    task=task,
                    where=frames,
                    hint="the event loop has not turned: polls, publishing and health "
                    "are stopped while this lasts",
                )
            elif stalled_since is not None and silent < self.stall_after:
                log.info("loop.recovered", stalled_s=round(beat - stalled_since, 2))
                stalled_since = None
            if deadline is not None and now >= deadline:
                self._give_up(reason)
                return

    def _holder(self) -> tuple[str | None, list[str]]:
        """The task running on the loop and where the loop's thread is."""
        task_name: str | None = None
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(Exception):
                task = asyncio.current_task(loop)
                task_name = task.get_name() if task is not None else None
        frame = sys._current_frames().get(self._loop_thread or -1)
        return task_name, where(frame)

    def _give_up(self, reason: str) -> None:
        task, frames = self._holder()
        stacks = {
            str(t.name): where(sys._current_frames().get(t.ident or -1), limit=4)
            for t in threading.enumerate()
        }
        log.error(
            "shutdown.deadline_exceeded",
            reason=reason,
            task=task,
            where=frames,
            threads=stacks,
            exit_code=EXIT_HUNG,
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        self._exit(EXIT_HUNG)
