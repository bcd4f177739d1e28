"""Operator attribution: who worked on an order, for how long, and how many pieces each.

Pure bookkeeping for :class:`gateway.core.tracker.MachineTracker` (no I/O, no clock: time comes
in as ``now`` with every call). One :class:`Attribution` per machine follows the badge
(the ``operator`` signal) and, while an order runs, keeps one :class:`Share` per operator:
the seconds the operator was logged in while the order ran and the gateway observed the
machine, and the good and scrap pieces counted while the operator was logged in. Time and
pieces with nobody logged in (an empty badge) go to the operator ``None``, so the shares
always add up to the order's counts (from the moment the badge was first read).

The badge is personal data: the tracker keeps it in clear (the outbox is local), and the
per-destination operator policy (:mod:`gateway.core.routing`) decides who sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway.core.vocabulary import MAX_OPERATOR_LEN, OPERATOR_SIGNAL, clean_text

#: Operators remembered per order; a stream of distinct badges beyond this is a decoding
#: error, and the newest ones are folded into the ``None`` share instead of growing the state.
MAX_OPERATORS = 50


@dataclass(slots=True)
class Share:
    """One operator's part of one order."""

    operator: str | None
    seconds: float = 0.0
    good: int = 0
    scrap: int = 0


def parse_operator(value: object) -> str | None:
    """Validate a badge read from a device: the badge text, ``None`` for nobody logged in."""
    text = clean_text(value, OPERATOR_SIGNAL, MAX_OPERATOR_LEN)
    # A badge reader shows 0 when nobody is logged in.
    return text if text and text != "0" else None


class Attribution:
    """The badge of one machine and the operator shares of its current (or last) order."""

    def __init__(self) -> None:
        """Nothing known: no badge read yet, no order."""
        #: True once the machine reported a badge (an empty one included): only then do
        #: order events carry ``operators``.
        self.known = False
        self.operator: str | None = None
        self._shares: dict[str | None, Share] = {}
        self._order_open = False
        #: Start of the running interval of the current operator; None while not timing
        #: (no order, device unreachable, or not yet observed since a restart).
        self._since: float | None = None

    # ------------------------------------------------------------------ inputs

    def badge(self, operator: str | None, now: float) -> None:
        """The device shows ``operator`` (None: nobody) now."""
        if self.known and operator == self.operator:
            return
        self._close(now)
        self.known = True
        self.operator = operator
        if self._order_open:
            # A badge is only read from a reachable machine: timing runs from now.
            self._since = now
            self._share(operator)

    def observed(self, now: float) -> None:
        """The machine was heard from: resume timing after a disconnect or restart."""
        if self._order_open and self._since is None and self.known:
            self._since = now
            self._share(self.operator)

    def pause(self, now: float) -> None:
        """The machine is no longer observed (link down): stop timing until heard from."""
        self._close(now)

    def begin_order(self, now: float) -> None:
        """An order starts: fresh shares, the current operator's time starts now."""
        self._shares = {}
        self._order_open = True
        self._since = None
        if self.known:
            self._since = now
            self._share(self.operator)

    def end_order(self, now: float) -> None:
        """The order completed: its shares are final."""
        self._close(now)
        self._order_open = False

    def credit(self, good: int, scrap: int) -> None:
        """Pieces counted for the running order go to the operator logged in."""
        self.credit_to(self.operator, good, scrap)

    def credit_to(self, operator: str | None, good: int, scrap: int) -> None:
        """Pieces read while ``operator`` was logged in, counted for the running order now."""
        if not self._order_open or not self.known or (good <= 0 and scrap <= 0):
            return
        share = self._share(operator)
        share.good += max(0, good)
        share.scrap += max(0, scrap)

    # ------------------------------------------------------------------ outputs

    def view(self, now: float) -> list[dict[str, Any]] | None:
        """JSON-ready shares of the order (in order of first appearance); None when unknown."""
        if not self.known:
            return None
        out = []
        running = self._share(self.operator) if self._since is not None else None
        for share in self._shares.values():
            seconds = share.seconds
            if share is running and self._since is not None:
                seconds += max(0.0, now - self._since)
            out.append(
                {
                    "operator": share.operator,
                    "seconds": round(seconds, 3),
                    "good": share.good,
                    "scrap": share.scrap,
                }
            )
        return out

    def export(self) -> dict[str, Any]:
        """JSON-ready state for a restart."""
        return {
            "known": self.known,
            "operator": self.operator,
            "order_open": self._order_open,
            "since": self._since,
            "shares": [[s.operator, s.seconds, s.good, s.scrap] for s in self._shares.values()],
        }

    @classmethod
    def restore(
        cls, state: dict[str, Any] | None, last_seen: float | None, order_running: bool = False
    ) -> Attribution:
        """Rebuild from :meth:`export`; timing resumes only when the machine is heard from.

        ``last_seen`` is when the tracker last heard from or about the machine before the
        restart: the running interval is closed there, so the time the gateway was down is
        not credited to anyone. ``order_running`` says whether an order runs, for state
        written before attribution existed. Raises ``ValueError`` for malformed state.
        """
        a = cls()
        if state is None:
            # Written by a gateway without attribution: the badge is not known yet.
            a._order_open = order_running
            return a
        if not isinstance(state, dict):
            raise ValueError("attribution state must be a mapping")
        a.known = _bool(state["known"])
        a.operator = _opt_str(state["operator"])
        a._order_open = _bool(state["order_open"])
        for op, seconds, good, scrap in state["shares"]:
            share = Share(_opt_str(op), _seconds(seconds), _count(good), _count(scrap))
            a._shares[share.operator] = share
        since = state["since"]
        if since is not None and last_seen is not None and a._order_open:
            a._since = _seconds(since)
            a._close(max(a._since, float(last_seen)))
        return a

    # ------------------------------------------------------------------ internals

    def _share(self, operator: str | None) -> Share:
        share = self._shares.get(operator)
        if share is None:
            if operator is not None and len(self._shares) >= MAX_OPERATORS - 1:
                operator = None  # keep one place for the folded remainder
                share = self._shares.get(None)
            if share is None:
                share = self._shares[operator] = Share(operator)
        return share

    def _close(self, now: float) -> None:
        if self._since is not None:
            self._share(self.operator).seconds += max(0.0, now - self._since)
            self._since = None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {value!r}")
    return value


def _opt_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected a string or null, got {value!r}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected seconds, got {value!r}")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value
