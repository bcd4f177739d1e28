"""The delivery loop: a second event loop, on its own thread, for commit → publish → PUBACK.

The gateway's main loop polls the machines: each poll slot wakes it for a burst of decoding,
mapping and tracking (about 5 ms for 50 machines x 30 tags). With the outbox and the
publishers on that same loop, an event emitted at the start of a burst waited for the rest
of it before its commit even began, then once more when the commit's completion and the
PUBACK queued behind the next burst. The delivery loop takes everything after the emission
off the main loop: the outbox's commit coordination (its SQLite writer thread stays), the
destinations' send queues and publishers, and the history sink fed from the outbox.

The boundary is small and one way:

* :meth:`DeliveryLoop.post` runs a plain function there, in the order posted: the main loop
  appends events to the outbox and submits retained state this way, never waiting;
* :meth:`DeliveryLoop.call` runs a coroutine there and awaits its result from the main loop
  (start, flush, close): cancelling the caller cancels the coroutine and waits for it to end;
* the main loop only *reads* delivery-side figures (connected, backlog, dropped), plain
  attributes that are safe to read under the GIL.

A crash of the loop's thread cannot pass silently: :meth:`call` of a stopped loop raises,
and the outbox task the gateway awaits through :meth:`call` fails with whatever ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: How long :meth:`DeliveryLoop.stop` waits for the loop's thread (seconds).
STOP_TIMEOUT = 10.0


class DeliveryLoopClosed(RuntimeError):
    """The delivery loop is not running (not started, stopped, or its thread died)."""


def _new_loop(like: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """A loop of the same kind as ``like``: uvloop when the main loop is uvloop."""
    if like is not None and type(like).__module__.startswith("uvloop"):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class DeliveryLoop:
    """An event loop running on its own thread until :meth:`stop`."""

    def __init__(self, name: str = "delivery") -> None:
        """Prepare the loop; :meth:`start` runs it."""
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: Callers' futures still waiting for a task here, with the loop each waits on.
        self._waiting: dict[asyncio.Future[Any], asyncio.AbstractEventLoop] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The delivery loop (raises :class:`DeliveryLoopClosed` before :meth:`start`)."""
        if self._loop is None:
            raise DeliveryLoopClosed(f"{self.name} loop not started")
        return self._loop

    @property
    def running(self) -> bool:
        """True from :meth:`start` until :meth:`stop` (or the thread's death)."""
        return (
            not self._stopped
            and self._loop is not None
            and self._thread is not None
            and self._thread.is_alive()
        )

    def in_loop(self) -> bool:
        """True when called on the delivery loop's own thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread and return once its loop runs (of the caller's loop's kind)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} loop already started")
        try:
            like: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            like = None
        loop = _new_loop(like)
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                self._stopped = True
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                # Nobody waits forever for a task that will never run again.
                for done, caller in list(self._waiting.items()):
                    with contextlib.suppress(RuntimeError):
                        caller.call_soon_threadsafe(_closed, done, self.name)
                self._waiting.clear()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(STOP_TIMEOUT):  # pragma: no cover - a thread that cannot start
            raise DeliveryLoopClosed(f"{self.name} loop did not start")

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the delivery loop soon; calls run in the order posted.

        Never blocks. After :meth:`stop` the call is dropped with an error in the log: the
        outbox is closed by then, so nothing posted later could be kept anyway.
        """
        loop = self._loop
        if loop is None or self._stopped:
            log.error("delivery.post_after_stop", call=getattr(fn, "__qualname__", repr(fn)))
            return
        if self.in_loop():
            fn(*args)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            log.error("delivery.post_after_stop", call=getattr(fn, "__qualname__", repr(fn)))

    async def call(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> _T:
        """Run ``coro`` as a task on the delivery loop; return (or raise) what it does.

        Cancelling the awaiting task cancels the task over there and waits (up to
        ``STOP_TIMEOUT``) until it has finished, so its cleanup is over when the caller's
        cancellation goes on.
        """
        loop = self._loop
        if loop is None or not self.running:
            coro.close()
            raise DeliveryLoopClosed(f"{self.name} loop is not running")
        if self.in_loop():
            return await coro
        here = asyncio.get_running_loop()
        done: asyncio.Future[_T] = here.create_future()
        remote: list[asyncio.Task[_T]] = []

        def settle(task: asyncio.Task[_T]) -> None:  # on the delivery loop
            self._waiting.pop(done, None)
            with contextlib.suppress(RuntimeError):  # the caller's loop closed meanwhile
                here.call_soon_threadsafe(_copy_outcome, done, task)

        def begin() -> None:  # on the delivery loop
            task = loop.create_task(coro, name=name)
            remote.append(task)
            task.add_done_callback(settle)

        self._waiting[done] = here
        loop.call_soon_threadsafe(begin)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_cancel_first, remote)
                await asyncio.wait([done], timeout=STOP_TIMEOUT)
                if done.done() and not done.cancelled():
                    done.exception()  # seen: the caller was cancelled, not failed
            raise

    def tasks(self) -> int:
        """Tasks alive on the delivery loop (0 when it does not run)."""
        loop = self._loop
        if loop is None or not self.running:
            return 0
        try:
            # all_tasks() is written to be called from another thread (it retries its copy).
            return len(asyncio.all_tasks(loop))
        except RuntimeError:  # pragma: no cover - retried a thousand times inside
            return 0

    def stop(self) -> None:
        """Stop the loop (whatever still runs there is abandoned) and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                log.error("delivery.stop_timeout", thread=self.name, timeout_s=STOP_TIMEOUT)


def _cancel_first(remote: list[asyncio.Task[Any]]) -> None:
    """Cancel the task of a :meth:`DeliveryLoop.call` (on the delivery loop)."""
    for task in remote:
        task.cancel()


def _copy_outcome(done: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
    """Give the caller's future the finished task's outcome (on the caller's loop)."""
    if done.done():
        return
    if task.cancelled():
        done.cancel()
        return
    exc = task.exception()
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


def _closed(done: asyncio.Future[Any], name: str) -> None:
    if not done.done():
        done.set_exception(DeliveryLoopClosed(f"{name} loop stopped before the call ended"))
