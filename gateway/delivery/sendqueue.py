"""The ordered, acknowledged queue every sender reads from (MQTT publishers, history sink).

Keys are increasing integers in push order. ``take`` hands out the oldest unsent item and
marks it in flight; ``ack`` forgets it once the receiver stored it; ``requeue`` puts every
in-flight item back in front, in order, after a lost connection. The durable outbox
(:class:`gateway.delivery.outbox.OutboxQueue`) implements the same protocol on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class SinkQueue(Protocol[T]):
    """Ordered items waiting for a receiver's acknowledgement."""

    def push(self, item: T) -> int:
        """Add an item; returns how many older items were dropped to stay bounded."""
        ...

    def take(self) -> tuple[int, T] | None:
        """Oldest unsent item, now in flight; ``None`` when nothing waits."""
        ...

    def ack(self, key: int) -> None:
        """Forget an in-flight item the receiver stored."""
        ...

    def requeue(self) -> None:
        """Return all in-flight items to the front, oldest first."""
        ...

    def oldest_key(self) -> int | None:
        """Smallest key still held (sent or not), ``None`` when empty."""
        ...

    @property
    def last_key(self) -> int:
        """Key of the most recently pushed item (0 before the first)."""
        ...

    @property
    def in_flight(self) -> int:
        """Items handed out and not yet acknowledged."""
        ...

    def __len__(self) -> int:
        """All items held: unsent and in flight."""
        ...


class MemorySinkQueue(Generic[T]):
    """In-memory :class:`SinkQueue` that drops the oldest unsent items beyond its bounds.

    Bounded by a count (``max_len``) and, with a ``weigh`` function, by the items' total
    weight (``max_weight``, e.g. bytes of text): whichever is reached first drops the oldest
    unsent items. Items in flight count towards both and are never dropped.

    Subclasses change what is dropped first (:meth:`_victim`) and keep their own indexes
    in step through :meth:`_forget_unsent` and :meth:`_restore`.
    """

    def __init__(
        self,
        max_len: int,
        *,
        max_weight: int | None = None,
        weigh: Callable[[T], int] | None = None,
    ) -> None:
        """A queue holding at most ``max_len`` items (in flight ones included)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if (max_weight is None) != (weigh is None):
            raise ValueError("max_weight and weigh go together")
        if max_weight is not None and max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {max_weight}")
        self._max = max_len
        self._max_weight = max_weight
        self._weigh = weigh
        #: Total weight of the items held (unsent and in flight); 0 without ``weigh``.
        self.weight = 0
        self._seq = 0
        self._unsent: OrderedDict[int, T] = OrderedDict()
        self._inflight: dict[int, T] = {}

    def push(self, item: T) -> int:
        """Add an item at the end."""
        self._seq += 1
        self._unsent[self._seq] = item
        if self._weigh is not None:
            self.weight += self._weigh(item)
        self._added(self._seq, item)
        return self._bound()

    def _added(self, key: int, item: T) -> None:
        """Hook: an item entered the unsent part."""

    def _over(self) -> bool:
        if len(self) > self._max:
            return True
        return self._max_weight is not None and self.weight > self._max_weight

    def _bound(self) -> int:
        dropped = 0
        while self._unsent and self._over():
            item = self._forget_unsent(self._victim())
            if self._weigh is not None:
                self.weight -= self._weigh(item)
            dropped += 1
        return dropped

    def _victim(self) -> int:
        """Key of the unsent item to drop when the queue is full: the oldest."""
        return next(iter(self._unsent))

    def _forget_unsent(self, key: int) -> T:
        return self._unsent.pop(key)

    def _restore(self, key: int, item: T) -> bool:
        """Hook for :meth:`requeue`: False drops the item instead of putting it back."""
        return True

    def take(self) -> tuple[int, T] | None:
        """Oldest unsent item, now in flight."""
        if not self._unsent:
            return None
        key = next(iter(self._unsent))
        item = self._forget_unsent(key)
        self._inflight[key] = item
        return key, item

    def ack(self, key: int) -> None:
        """Forget a stored item (unknown keys are ignored)."""
        item = self._inflight.pop(key, None)
        if item is not None and self._weigh is not None:
            self.weight -= self._weigh(item)

    def requeue(self) -> None:
        """Put in-flight items back in front, in key order."""
        for key in sorted(self._inflight, reverse=True):
            item = self._inflight.pop(key)
            if self._restore(key, item):
                self._unsent[key] = item
                self._unsent.move_to_end(key, last=False)
            elif self._weigh is not None:
                self.weight -= self._weigh(item)

    def oldest_key(self) -> int | None:
        """Smallest key held."""
        candidates = []
        if self._unsent:
            candidates.append(next(iter(self._unsent)))
        if self._inflight:
            candidates.append(min(self._inflight))
        return min(candidates) if candidates else None

    @property
    def last_key(self) -> int:
        """Key of the newest push."""
        return self._seq

    @property
    def in_flight(self) -> int:
        """Items handed out, not acknowledged."""
        return len(self._inflight)

    def __len__(self) -> int:
        """Unsent plus in flight."""
        return len(self._unsent) + len(self._inflight)


class FlushWaiters:
    """Callers waiting until everything submitted to a queue so far has left it (acked).

    The sender calls :meth:`progress` whenever items were acknowledged.
    """

    def __init__(self, queue: SinkQueue[Any]) -> None:
        """Waiters on ``queue``."""
        self._queue = queue
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    def __bool__(self) -> bool:
        """True while somebody waits."""
        return bool(self._waiting)

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a budget, not a guard
        """Wait until every item pushed so far is acknowledged; False on timeout."""
        target = self._queue.last_key
        oldest = self._queue.oldest_key()
        if oldest is None or oldest > target:
            return True
        entry = (target, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await entry[1]
            return True
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(entry)

    def progress(self) -> None:
        """Release the waiters whose items have all been acknowledged."""
        if self._waiting:
            oldest = self._queue.oldest_key()
            for target, fut in self._waiting:
                if (oldest is None or oldest > target) and not fut.done():
                    fut.set_result(None)


class BacklogClock:
    """When were queue keys pushed? Tells the age of the oldest pending message.

    Works with any queue that numbers messages with increasing keys (the ``SendQueue``
    protocol's ``last_key`` / ``oldest_key()``): call :meth:`note` after pushing, ask
    :meth:`oldest_age` with the queue's oldest key. Pushes within ``resolution`` seconds
    share one mark, so memory stays small under load; ages are exact to ``resolution``
    (never under-estimated).
    """

    def __init__(self, resolution: float = 1.0, max_marks: int = 100_000) -> None:
        """Marks closer than ``resolution`` seconds are merged; at most ``max_marks`` kept."""
        self._resolution = resolution
        self._max = max_marks
        # (highest key pushed in this mark, time the mark started)
        self._marks: deque[tuple[int, float]] = deque()

    def note(self, last_key: int, now: float) -> None:
        """Record that every key up to ``last_key`` has been pushed by ``now``."""
        if self._marks:
            key, started = self._marks[-1]
            if last_key <= key:
                return
            if now - started < self._resolution:
                self._marks[-1] = (last_key, started)
                return
        self._marks.append((last_key, now))
        if len(self._marks) > self._max:
            self._marks.popleft()

    def oldest_age(self, oldest_key: int | None, now: float) -> float | None:
        """Seconds since ``oldest_key`` was pushed; ``None`` when nothing is pending."""
        if oldest_key is None:
            self._marks.clear()
            return None
        # Marks wholly below the oldest pending key are acknowledged history.
        while self._marks and self._marks[0][0] < oldest_key:
            self._marks.popleft()
        if not self._marks:
            return None
        return max(0.0, now - self._marks[0][1])
