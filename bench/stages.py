"""Where an event's time goes, stage by stage, from its emission to the broker's PUBACK.

``python -m bench.stages OUT.json run -c FILE`` runs the gateway exactly as
``python -m gateway run -c FILE`` does, with timing wrappers around four methods of the
outbox (nothing in the product changes), and writes every event's stage times to OUT.json
when the gateway exits::

    emitted     the tracker emitted it (``Entry.created``, the sample in hand)
    scheduled   the outbox's commit task took its batch (``Outbox._write_once`` began)
    writing     the SQLite writer thread began the transaction (``Outbox._t_write``)
    written     the transaction, fsync included, was over
    committed   the event loop saw the commit (``_write_once`` returned)
    sent        the publisher took it from its queue and handed it to paho
    acked       the broker's PUBACK was processed (``OutboxQueue.ack``)

With several destinations an event's ``sent`` and ``acked`` are those of the first
destination to get there. Commits started anywhere but ``_write_once`` (none in the product)
would leave their events out.

``bench.scale_modbus --stages`` starts the gateway this way and prints :func:`summarise`
over its measuring window. The wrappers cost a few microseconds per event (a clock read
and a dict store per stage), so compare CPU figures only between runs that both use them.
"""

from __future__ import annotations

import atexit
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STAGES = ("emitted", "scheduled", "writing", "written", "committed", "sent", "acked")

#: Stage name -> event seq -> wall-clock time (``time.time()``, the clock ``created`` uses).
_times: dict[str, dict[int, float]] = {name: {} for name in STAGES}


def install() -> Callable[[], None]:
    """Wrap the outbox's methods so each event's stage times are recorded; returns an undo."""
    from gateway.delivery.outbox import Outbox, OutboxQueue

    write_once = Outbox._write_once
    t_write = Outbox._t_write
    take = OutboxQueue.take
    ack = OutboxQueue.ack
    scheduled, writing, written = _times["scheduled"], _times["writing"], _times["written"]
    committed, sent, acked = _times["committed"], _times["sent"], _times["acked"]
    emitted = _times["emitted"]

    async def timed_write_once(self: Outbox) -> None:
        now = time.time()
        seqs = [p.seq for p in self._pending]
        for seq in seqs:
            scheduled[seq] = now
        await write_once(self)
        now = time.time()
        for seq in seqs:
            committed[seq] = now

    def timed_t_write(self: Outbox, batch: list[Any], *args: Any) -> Any:
        began = time.time()
        result = t_write(self, batch, *args)
        ended = time.time()
        for p in batch:
            emitted[p.seq] = p.entry.created
            writing[p.seq] = began
            written[p.seq] = ended
        return result

    def timed_take(self: OutboxQueue) -> Any:
        item = take(self)
        if item is not None:
            rows = self._inflight.get(item[0])
            if isinstance(rows, list):
                now = time.time()
                for row in rows:
                    sent.setdefault(row.seq, now)
        return item

    def timed_ack(self: OutboxQueue, key: int) -> None:
        rows = self._inflight.get(key)
        if isinstance(rows, list):
            now = time.time()
            for row in rows:
                acked.setdefault(row.seq, now)
        ack(self, key)

    Outbox._write_once = timed_write_once  # type: ignore[method-assign,assignment]
    Outbox._t_write = timed_t_write  # type: ignore[method-assign,assignment]
    OutboxQueue.take = timed_take  # type: ignore[method-assign,assignment]
    OutboxQueue.ack = timed_ack  # type: ignore[method-assign,assignment]

    def undo() -> None:
        Outbox._write_once = write_once  # type: ignore[method-assign]
        Outbox._t_write = t_write  # type: ignore[method-assign]
        OutboxQueue.take = take  # type: ignore[method-assign]
        OutboxQueue.ack = ack  # type: ignore[method-assign]

    return undo


def clear() -> None:
    """Forget the stage times recorded so far."""
    for times in _times.values():
        times.clear()


def dump(path: Path) -> None:
    """Write every event with all its stages as ``{seq: [time per stage]}``."""
    complete = {
        seq: [_times[name][seq] for name in STAGES]
        for seq in _times["acked"]
        if all(seq in _times[name] for name in STAGES)
    }
    path.write_text(json.dumps(complete))


def summarise(path: Path, start: float, end: float) -> dict[str, Any]:
    """Per-stage p50/p90/p99 (ms) of the events emitted in ``[start, end]``.

    ``slowest_1pct_ms`` is the mean of each stage over the slowest 1% of events: what the
    p99 is made of.
    """
    from bench.common import percentile  # not at import: this module runs in the gateway

    data: dict[str, list[float]] = json.loads(path.read_text())
    events = [t for t in data.values() if start <= t[0] <= end]
    out: dict[str, Any] = {"events": len(events)}
    if not events:
        return out
    names = [f"{a}->{b}" for a, b in itertools.pairwise(STAGES)]
    spans: dict[str, list[float]] = {
        name: [(t[i + 1] - t[i]) * 1000 for t in events] for i, name in enumerate(names)
    }
    spans["total"] = [(t[-1] - t[0]) * 1000 for t in events]
    out["stages_ms"] = {
        name: {
            "p50": round(percentile(v, 50), 2),
            "p90": round(percentile(v, 90), 2),
            "p99": round(percentile(v, 99), 2),
        }
        for name, v in spans.items()
    }
    slowest = sorted(events, key=lambda t: t[-1] - t[0])[-max(1, len(events) // 100) :]
    out["slowest_1pct_ms"] = {
        name: round(sum((t[i + 1] - t[i]) for t in slowest) / len(slowest) * 1000, 2)
        for i, name in enumerate(names)
    }
    return out


def table(summary: dict[str, Any], label: str) -> list[tuple[str, Any, str]]:
    """Rows for the benchmark's printed table."""
    rows: list[tuple[str, Any, str]] = []
    slowest = summary.get("slowest_1pct_ms", {})
    for name, p in summary.get("stages_ms", {}).items():
        tail = f"slowest 1%: {slowest[name]:.2f}" if name in slowest else ""
        rows.append((f"{label} {name} p50/p90/p99 ms", f"{p['p50']}/{p['p90']}/{p['p99']}", tail))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``OUT.json`` then the gateway's own arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m bench.stages OUT.json run -c FILE")
    out = Path(args.pop(0))
    install()
    atexit.register(dump, out)
    from gateway.cli.main import main as gateway_main

    return gateway_main(args)


if __name__ == "__main__":
    sys.exit(main())
