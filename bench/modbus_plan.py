"""Modbus read planning: requests per cycle divided by the theoretical minimum.

``python bench/modbus_plan.py [--layouts 200] [--seed 1]`` prints, for random layouts and for
the shipped profiles and simulators, how many requests the planner sends per poll cycle
against a lower bound, and how long planning takes. The minimum comes from an exact dynamic
programme over the signals sorted by address (small layouts) and is checked to be no larger
than the plan; a ratio of 1.00 means the plan is optimal.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shopfloor_gateway.adapters.modbus.config import ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.plan import plan_reads
from shopfloor_gateway.simulators.plc import PLC_SIGNALS


def minimum(signals: Mapping[str, ModbusSignalConfig], max_registers: int, max_gap: int) -> int:
    """Fewest requests covering every signal, by exhaustive search over contiguous groups.

    Within one area an optimal plan can always use groups that are contiguous in start
    order (the planner's greedy argument); the search tries every such grouping.
    """
    total = 0
    for area in {s.area for s in signals.values()}:
        spans = sorted(
            (s.start, s.start + s.register_count) for s in signals.values() if s.area == area
        )
        mapped = {r for a, b in spans for r in range(a, b)}

        def ok(
            i: int, j: int, spans: list[tuple[int, int]] = spans, mapped: set[int] = mapped
        ) -> bool:
            start = spans[i][0]
            end = max(b for _, b in spans[i : j + 1])
            if end - start > max_registers:
                return False
            run = 0
            for register in range(start, end):
                run = 0 if register in mapped else run + 1
                if run > max_gap:
                    return False
            return True

        @functools.cache
        def best(i: int, spans: tuple[tuple[int, int], ...] = tuple(spans)) -> int:
            if i == len(spans):
                return 0
            return min(1 + best(j + 1) for j in range(i, len(spans)) if ok(i, j))

        total += best(0)
    return total


def random_layout(rng: random.Random) -> dict[str, ModbusSignalConfig]:
    """Up to 40 signals of mixed types in a 400-register window, two areas."""
    signals = {}
    for i in range(rng.randint(5, 40)):
        kind = rng.choice(["uint16", "uint32", "float32", "string", "uint64", "bcd16"])
        signals[f"s{i}"] = ModbusSignalConfig(
            area=rng.choice(["holding", "holding", "input"]),
            address=rng.randint(0, 400),
            type=kind,
            length=rng.randint(1, 10) if kind == "string" else None,
        )
    return signals


def report(name: str, signals: Mapping[str, ModbusSignalConfig], max_regs: int, gap: int) -> float:
    started = time.perf_counter()
    plan = plan_reads(signals, max_registers=max_regs, max_gap=gap)
    took = (time.perf_counter() - started) * 1e6
    low = minimum(signals, max_regs, gap)
    ratio = len(plan) / low if low else 1.0
    print(
        f"{name:32} signals={len(signals):3} requests={len(plan):3} minimum={low:3} "
        f"ratio={ratio:.2f} plan_us={took:7.1f}"
    )
    return ratio


def main() -> int:
    """Print the table; exit 1 if any plan is worse than the minimum."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ratios = []
    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "config" / "profiles").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("protocol") != "modbus":
            continue
        signals = {k: ModbusSignalConfig.model_validate(v) for k, v in data["signals"].items()}
        ratios.append(report(f"profile {path.stem}", signals, 125, 16))
    plc = {k: ModbusSignalConfig.model_validate(v) for k, v in PLC_SIGNALS.items()}
    ratios.append(report("simulator plc (max_gap 16)", plc, 125, 16))
    ratios.append(report("simulator plc (max_gap 0)", plc, 125, 0))
    rng = random.Random(args.seed)
    random_ratios = []
    for _ in range(args.layouts):
        signals = random_layout(rng)
        max_regs, gap = rng.choice([(125, 16), (60, 8), (20, 0), (125, 0)])
        plan = plan_reads(signals, max_registers=max_regs, max_gap=gap)
        low = minimum(signals, max_regs, gap)
        random_ratios.append(len(plan) / low)
    print(
        f"{'random layouts':32} n={len(random_ratios)} "
        f"ratio mean={statistics.mean(random_ratios):.3f} max={max(random_ratios):.3f}"
    )
    return 0 if max(ratios + random_ratios) <= 1.0 + 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
