"""The one interface every device adapter implements, and its error tree.

An adapter is an async context manager that connects on enter and always releases its
connection on exit, plus :meth:`Adapter.samples`, an async iterator that yields one batch
of samples per acquisition (one poll cycle, or one subscription notification) until it is
cancelled. Polling and subscriptions look the same from outside.

Errors::

    AdapterError            anything an adapter raises on purpose
    ├── ConnectError        could not connect (refused, timeout, bad address): retry later
    ├── ConnectionLost      the link dropped or stopped answering: reconnect, retry later
    └── DecodeError         one point could not be decoded: mark it bad, carry on

Only ``ConnectError`` and ``ConnectionLost`` ever leave ``__aenter__`` / ``samples()``;
a ``DecodeError`` (or a device exception for one signal) becomes a sample with
``Quality.BAD`` and the other signals keep flowing.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self

from gateway.core.model import Sample


class AdapterError(Exception):
    """Base of every error an adapter raises on purpose."""


class ConnectError(AdapterError):
    """The device could not be reached; the supervisor retries with backoff."""


class ConnectionLost(AdapterError):
    """An established link dropped or stopped answering; the supervisor reconnects."""


class DecodeError(AdapterError):
    """One value could not be decoded; it becomes a bad-quality sample."""


@dataclass(slots=True)
class Acquisition:
    """How an adapter's latest batch was acquired, for the metrics (``adapter.acquisition``)."""

    #: ``poll`` (a read the adapter timed) or ``notification`` (pushed by a subscription).
    kind: Literal["poll", "notification"] = "poll"
    #: Seconds the read behind the latest batch took (``None`` for notifications).
    seconds: float | None = None
    #: Poll deadlines missed so far (ticks skipped because a read or its consumer overran).
    missed_deadlines: int = 0


class Adapter(Protocol):
    """A connection to one device, yielding batches of samples."""

    async def __aenter__(self) -> Self:
        """Connect; raise :class:`ConnectError` when the device cannot be reached."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the connection, whatever happened."""
        ...

    def samples(self) -> AsyncIterator[Sequence[Sample]]:
        """Yield one batch per acquisition until cancelled; raise :class:`ConnectionLost`."""
        ...


def check_timing(poll_interval: float, start_offset: float) -> None:
    """Refuse a poll interval or start offset no schedule can use (``ValueError``)."""
    if not (math.isfinite(poll_interval) and poll_interval > 0):
        raise ValueError(f"poll_interval must be a positive number, got {poll_interval}")
    if not (math.isfinite(start_offset) and start_offset >= 0):
        raise ValueError(f"start_offset must be 0 or more, got {start_offset}")


#: Width of one poll phase slot, seconds. Devices are spread over the interval in slots of
#: this width rather than at arbitrary instants: what a poll costs depends less on its work
#: than on how often the process wakes (after an idle gap the same Python runs two to four
#: times slower: ``bench.acquisition --layers memory --memory-gap``), so devices that share a
#: slot share one wake-up of the event loop, while ten slots a second still keep a floor of
#: devices from hitting the network in one burst. Measured at 500 devices polled once a
#: second: 334 us of CPU per poll spread evenly, 200 us in 20 ms slots, 167 us in 50 ms slots
#: (``bench.acquisition``); end to end (``bench.scale_modbus``, interleaved pairs) 100 ms slots
#: took 11% less of a core than 50 ms at 500 devices and 20% less at 200, with the same p99
#: from sample to PUBACK at 500 and 1-2 ms more at 200 (a slot's events share a commit: the
#: p50 rose by about 1 ms); 200 ms slots saved little more and doubled the p99.
POLL_SLOT = 0.1


def poll_phase(key: str, interval: float) -> float:
    """A stable phase for a device's polls: a slot start in ``[0, min(interval, 1 s))``."""
    slots = max(1, int(min(interval, 1.0) / POLL_SLOT + 1e-9))
    return (zlib.crc32(key.encode()) % slots) * POLL_SLOT


def first_deadline(now: float, interval: float, phase: float) -> float:
    """The first instant at or after ``now`` on the grid ``phase + k * interval``.

    Anchoring to the clock, not to when a device connected, keeps devices that share a phase
    (and an interval) waking together, also after reconnects.
    """
    if interval <= 0 or not math.isfinite(interval):
        raise ValueError(f"interval must be a positive number of seconds, got {interval}")
    return phase + math.ceil((now - phase) / interval) * interval


def next_deadline(previous: float, now: float, interval: float) -> tuple[float, int]:
    """The next fixed-rate deadline after ``now``, and how many ticks were skipped to reach it.

    Deadlines sit on the grid ``previous + k * interval``; a poll that overran its slot
    moves to the next grid point in the future instead of bursting to catch up.
    """
    if interval <= 0 or not math.isfinite(interval):
        raise ValueError(f"interval must be a positive number of seconds, got {interval}")
    ticks = max(1, math.floor((now - previous) / interval) + 1)
    return previous + ticks * interval, ticks - 1
