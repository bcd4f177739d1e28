"""A null-modem cable in software: two pseudo-terminals joined back to back.

Each end is a real tty device path (``/dev/pts/N``) that pyserial opens like a USB RS-485
adapter, so the gateway and a simulator exercise real RTU framing over a serial driver
without ``socat`` or hardware. Bytes written to one end are read at the other; the link
forwards them from an asyncio reader callback on the two pty masters.

The link keeps its own handle on both ttys open for its lifetime: without it, a reader of
a master whose tty nobody holds gets EIO on every wake-up (a busy loop), and reopening an
end (a client reconnecting) would race with the forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from types import TracebackType
from typing import Self

import structlog

log = structlog.get_logger(__name__)


class PtyLink:
    """Async context manager: ``async with PtyLink() as link:`` then open ``link.ends``."""

    def __init__(self) -> None:
        """Nothing is created before ``async with``."""
        self._fds: list[int] = []
        self._masters: tuple[int, int] | None = None
        self.ends: tuple[str, str] = ("", "")
        #: Bytes forwarded in each direction (a -> b, b -> a), for tests.
        self.forwarded = [0, 0]

    async def __aenter__(self) -> Self:
        """Open both pty pairs and start forwarding."""
        loop = asyncio.get_running_loop()
        try:
            master_a, slave_a = os.openpty()
            self._fds += [master_a, slave_a]
            master_b, slave_b = os.openpty()
            self._fds += [master_b, slave_b]
            for fd in (slave_a, slave_b):
                # Raw: no echo, no line editing, no CR/LF translation of binary frames.
                tty.setraw(fd)
            for fd in (master_a, master_b):
                os.set_blocking(fd, False)
        except BaseException:
            self._close_fds()
            raise
        self._masters = (master_a, master_b)
        self.ends = (os.ttyname(slave_a), os.ttyname(slave_b))
        loop.add_reader(master_a, self._forward, master_a, master_b, 0)
        loop.add_reader(master_b, self._forward, master_b, master_a, 1)
        log.debug("pty link open", ends=self.ends)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop forwarding, then close every descriptor."""
        loop = asyncio.get_running_loop()
        if self._masters is not None:
            for fd in self._masters:
                loop.remove_reader(fd)
            self._masters = None
        self._close_fds()

    def _forward(self, source: int, target: int, direction: int) -> None:
        """Move whatever is waiting on one master to the other."""
        try:
            data = os.read(source, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while an end is being reopened; the next wake-up carries on
        if not data:
            return
        self.forwarded[direction] += len(data)
        view = memoryview(data)
        while view:
            try:
                written = os.write(target, view)
            except BlockingIOError:
                # The far side is not reading (nothing holds it open): drop, as a line would.
                return
            view = view[written:]

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
