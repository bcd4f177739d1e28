"""Core: the pure per-sample work on one core, no I/O (decode, mapping, tracker, envelope).

    python -m bench.core --machines 500 --signals 20 --cycles 200

Each stage runs over the same synthetic poll cycles (a dense block of registers per
machine, the load simulator's register map): counters advance, telemetry changes every
cycle, and every machine changes its order every ``--change-every`` cycles, so the tracker
emits events at a realistic rate. Figures are samples (tags) per second of one core.
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable
from typing import Any

from bench.common import report
from gateway.contract.envelope import encode_event, new_event_id
from gateway.core.mapping import Mapper
from gateway.core.model import Location, Quality, Sample, Value
from gateway.core.tracker import MachineTracker, TrackerSettings
from shopfloor_gateway.adapters.modbus.config import ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.decode import decode
from shopfloor_gateway.simulators.load import LoadDevice, registers, signal_map

_CODES = {"uint16": "H", "int16": "h", "uint32": "I", "int32": "i", "float32": "f"}


def block_decoder(
    sigs: dict[str, ModbusSignalConfig],
) -> Callable[[list[int]], list[tuple[str, Value]]]:
    """Prototype of a compiled block decoder: one ``struct`` call per block, not per signal.

    Only ABCD word order and the types of the load simulator; it shows what
    ``adapters/modbus/decode.py`` could reach with a decoder compiled per read request.
    """
    ordered = sorted(sigs.items(), key=lambda kv: kv[1].start)
    fmt, pos = ">", 0
    names: list[str] = []
    strings: set[int] = set()
    for name, sig in ordered:
        if sig.start > pos:
            fmt += f"{2 * (sig.start - pos)}x"
        if sig.value_type == "string":
            fmt += f"{2 * sig.register_count}s"
            strings.add(len(names))
        else:
            fmt += _CODES[sig.value_type]
        names.append(name)
        pos = sig.start + sig.register_count
    words = struct.Struct(f">{pos}H")
    values = struct.Struct(fmt)

    def run(block: list[int]) -> list[tuple[str, Value]]:
        out: list[tuple[str, Value]] = list(
            zip(names, values.unpack(words.pack(*block[:pos])), strict=True)
        )
        for i in strings:
            name, raw = out[i]
            assert isinstance(raw, bytes)
            out[i] = (name, raw.rstrip(b"\x00 ").decode("ascii"))
        return out

    return run


def _best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    """Fastest of ``repeat`` runs: (seconds, items)."""
    best = float("inf")
    items = 0
    for _ in range(repeat):
        t = time.perf_counter()
        items = fn()
        best = min(best, time.perf_counter() - t)
    return best, items


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, default=500)
    p.add_argument("--signals", type=int, default=20)
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--change-every", type=int, default=20, help="cycles between order changes")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    device = LoadDevice("m", 1, signals=args.signals, origin=0.0, piece_seconds=1.0)
    sigs = {k: ModbusSignalConfig.model_validate(v) for k, v in signal_map(device).items()}
    names = list(sigs)
    mapper = Mapper(sigs)
    points = [(n, s.start, s.register_count, s) for n, s in sigs.items()]
    # One register block per cycle, shared by all machines (the work does not depend on it).
    blocks = [registers(device, 1000.0 + c) for c in range(args.cycles)]
    for c, block in enumerate(blocks):
        order = f"PO-{c // args.change_every:06d}".encode().ljust(20, b"\x00")
        block[3:13] = [int.from_bytes(order[i : i + 2], "big") for i in range(0, 20, 2)]
    machines = [f"m{i:04d}" for i in range(args.machines)]
    settings = TrackerSettings(counter_mode="lifetime")
    n_tags = args.machines * args.cycles * len(names)

    def decoded_batches() -> list[list[Sample]]:
        out = []
        for c, block in enumerate(blocks):
            for m in machines:
                out.append(
                    [
                        Sample(m, n, decode(block[a : a + w], s), 1000.0 + c, Quality.GOOD)
                        for n, a, w, s in points
                    ]
                )
        return out

    batches = decoded_batches()
    mapped = [mapper.apply(b)[0] for b in batches]

    def run_decode() -> int:
        return sum(len(b) for b in decoded_batches())

    fast = block_decoder(sigs)
    assert [(s.signal, s.value) for s in batches[0]] == sorted(
        fast(blocks[0]), key=lambda kv: names.index(kv[0])
    )

    def run_block_decode() -> int:
        n = 0
        for c, block in enumerate(blocks):
            for m in machines:
                batch = [Sample(m, k, v, 1000.0 + c, Quality.GOOD) for k, v in fast(block)]
                n += len(batch)
        return n

    def run_map() -> int:
        n = 0
        for b in batches:
            n += len(mapper.apply(b)[0])
        return n

    events: list[Any] = []

    def run_track() -> int:
        trackers = {m: MachineTracker(m, settings) for m in machines}
        events.clear()
        n = 0
        for b in mapped:
            t = trackers[b[0].machine]
            events.extend(t.observe(b, b[0].source_time))
            n += len(b)
        return n

    def run_pipeline() -> int:
        trackers = {m: MachineTracker(m, settings) for m in machines}
        n = 0
        for c, block in enumerate(blocks):
            for m in machines:
                batch = [
                    Sample(m, name, decode(block[a : a + w], s), 1000.0 + c, Quality.GOOD)
                    for name, a, w, s in points
                ]
                ok, _ = mapper.apply(batch)
                trackers[m].observe(ok, 1000.0 + c)
                n += len(batch)
        return n

    def run_fast_pipeline() -> int:
        trackers = {m: MachineTracker(m, settings) for m in machines}
        n = 0
        for c, block in enumerate(blocks):
            for m in machines:
                batch = [Sample(m, k, v, 1000.0 + c, Quality.GOOD) for k, v in fast(block)]
                ok, _ = mapper.apply(batch)
                trackers[m].observe(ok, 1000.0 + c)
                n += len(batch)
        return n

    loc = Location("plant", "hall", "line-1", "m0000")

    def run_envelope() -> int:
        for i, e in enumerate(events):
            encode_event(e, loc, gateway_id="gw", event_id=new_event_id(e.time, i))
        return len(events)

    rows: list[tuple[str, Any, str]] = []
    for label, fn, goal in (
        ("decode tags/s", run_decode, ""),
        ("mapping tags/s", run_map, ""),
        ("tracker samples/s", run_track, ">= 200,000"),
        ("decode+map+track tags/s", run_pipeline, "(with acquisition) >= 250,000"),
        ("block decode (prototype) tags/s", run_block_decode, ""),
        ("block decode+map+track tags/s", run_fast_pipeline, "(with acquisition) >= 250,000"),
    ):
        secs, items = _best(fn, args.repeat)
        assert items == n_tags
        rows.append((label, round(items / secs), goal))
    secs, n_events = _best(run_envelope, args.repeat)
    rows.append(("events from tracker run", n_events, ""))
    rows.append(("envelope encode events/s", round(n_events / secs), ""))
    params = {
        "machines": args.machines,
        "signals": args.signals,
        "cycles": args.cycles,
        "change_every": args.change_every,
    }
    report("core", params, rows)


if __name__ == "__main__":
    main()
