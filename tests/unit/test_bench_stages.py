"""bench.stages: the stage timer still fits the outbox it wraps, and its summary adds up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from bench import stages
from gateway.core.routing import Route
from gateway.delivery.outbox import Entry, Outbox


async def test_every_event_passes_the_stages_in_order(tmp_path: Path) -> None:
    undo = stages.install()
    stages.clear()
    try:
        ob = Outbox(tmp_path / "o.db", ["a"])
        await ob.open()
        q = ob.queue(Route("a"))
        task = asyncio.create_task(ob.run())
        q.start()
        start = time.time()
        seqs = ob.append(
            [
                Entry("m1", f"t/{i}", b"{}", frozenset({"a"}), "order.started", created=time.time())
                for i in range(5)
            ]
        )
        await ob.flush()
        taken = []
        while (item := q.take()) is not None:
            taken.append(item[0])
        for key in taken:
            q.ack(key)
        await ob.flush()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()
    finally:
        undo()
    out = tmp_path / "stages.json"
    stages.dump(out)
    data = json.loads(out.read_text())
    assert sorted(int(k) for k in data) == seqs
    for times in data.values():
        assert times == sorted(times), times
    summary = stages.summarise(out, start - 1, time.time())
    assert summary["events"] == 5
    assert summary["stages_ms"]["total"]["p99"] >= max(
        v["p99"] for k, v in summary["stages_ms"].items() if k != "total"
    )
    assert [r[0] for r in stages.table(summary, "x")][-1] == "x total p50/p90/p99 ms"
    # Undone: the outbox's own methods again.
    assert Outbox._t_write.__name__ == "_t_write"
