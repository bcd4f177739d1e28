"""What a destination reports about itself, and to what (the runtime's metrics)."""

from __future__ import annotations

from typing import Protocol


class DestinationStates(Protocol):
    """Receives the state of a destination (the runtime's :class:`Metrics` is one)."""

    def destination_state(
        self,
        name: str,
        *,
        connected: bool,
        backlog: int,
        oldest_age: float | None = None,
        published_total: int | None = None,
        dropped_total: int | None = None,
        limit: int | None = None,
        required: bool = True,
    ) -> None:
        """Latest state of one destination; totals are absolute (monotonic) counts."""
