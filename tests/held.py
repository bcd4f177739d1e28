"""A scripted sewing station that stands still until the gateway under test has read it.

A script that begins with ``Idle(n)`` so that "the gateway reads the idle station first" is a
race with the gateway process's start: on a loaded machine that start can take longer than
any fixed ``n``, and the gateway then first sees the order already running (or done); the
same for a restart that must come back before the order ends. A :class:`HeldStation` stands
still while held and goes on from there when released, at the floor's pace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import Received
from tests.gatewayproc import events, short


class HeldStation(StationModel):
    """A :class:`StationModel` whose scenario time stands still while it is held.

    Held from the start unless ``held=False``; :meth:`hold` and :meth:`release` may follow
    each other any number of times (a gateway restart in the middle of an order).
    """

    def __init__(self, *args: Any, held: bool = True, **kwargs: Any) -> None:
        """As :class:`StationModel`; ``held``: wait for :meth:`release` before the script."""
        super().__init__(*args, **kwargs)
        self._held = held
        #: Floor time spent held: the scenario runs that much behind the floor.
        self._lag = 0.0
        self._held_since: float | None = None

    def hold(self) -> None:
        """Stop the scenario at the floor's next tick (what the registers show stays)."""
        self._held = True

    def release(self) -> None:
        """Let the scenario go on from the floor's next tick."""
        self._held = False

    def advance(self, t: float) -> None:
        """Move to floor time ``t`` less the time spent held."""
        if self._held:
            if self._held_since is None:
                self._held_since = t
            super().advance(self.time)
            return
        if self._held_since is not None:
            self._lag += t - self._held_since
            self._held_since = None
        super().advance(t - self._lag)


def state_read(machine: str) -> Callable[[list[Received]], bool]:
    """A ``wait_for`` condition: the gateway published the machine's first state."""

    def seen(messages: list[Received]) -> bool:
        return any(
            e["subject"] == machine and short(e) == "machine.state.changed"
            for e in events(messages)
        )

    return seen
