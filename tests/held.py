"""A scripted sewing station held at its start until the gateway under test has read it.

A script that begins with ``Idle(n)`` so that "the gateway reads the idle station first" is a
race with the gateway process's start: on a loaded machine that start can take longer than
any fixed ``n``, and the gateway then first sees the order already running (or done). A
:class:`HeldStation` shows its first step (scenario time 0) until :meth:`release`; its
script runs from there, at the floor's pace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import Received
from tests.gatewayproc import events, short


class HeldStation(StationModel):
    """A :class:`StationModel` that stays at scenario time 0 until released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As :class:`StationModel`; the script waits for :meth:`release`."""
        super().__init__(*args, **kwargs)
        self._released = False
        #: The floor's time at the release: the script's time 0.
        self._origin: float | None = None

    def release(self) -> None:
        """Let the script run from the floor's next tick on."""
        self._released = True

    def advance(self, t: float) -> None:
        """Move to ``t`` counted from the release (before it: stay at time 0)."""
        if not self._released:
            super().advance(0.0)
            return
        if self._origin is None:
            self._origin = t
        super().advance(t - self._origin)


def state_read(machine: str) -> Callable[[list[Received]], bool]:
    """A ``wait_for`` condition: the gateway published the machine's first state."""

    def seen(messages: list[Received]) -> bool:
        return any(
            e["subject"] == machine and short(e) == "machine.state.changed"
            for e in events(messages)
        )

    return seen
