"""Summarise a py-spy collapsed-stack profile: top functions by own and inclusive time.

    python -m bench.hotspots bench/results/profile-500x20.txt [--top 25]

Besides functions, samples are grouped by *area* (the first frame of the project or of a
library, from the leaf up), which answers "where does the CPU go" in one glance:
pymodbus, aiomqtt/paho, the tracker, logging, the event loop.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")

#: Path fragments → area name, checked in order on each frame from the leaf up.
AREAS: tuple[tuple[str, str], ...] = (
    ("gateway/tracker", "tracker"),
    ("gateway/mapping", "mapping"),
    ("gateway/counters", "tracker"),
    ("gateway/envelope", "envelope (JSON)"),
    ("gateway/outbox", "outbox (SQLite)"),
    ("gateway/publisher", "publisher"),
    ("gateway/runtime", "runtime"),
    ("adapters/modbus/decode", "modbus decode"),
    ("adapters/modbus/line", "modbus line"),
    ("adapters/modbus/adapter", "modbus adapter"),
    ("structlog", "logging"),
    ("logging/", "logging"),
    ("pymodbus", "pymodbus"),
    ("aiomqtt", "aiomqtt/paho"),
    ("paho", "aiomqtt/paho"),
    ("sqlite3", "outbox (SQLite)"),
    ("uvloop", "event loop"),
    ("asyncio", "event loop"),
)


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """Stacks (root first) of ``(function, file)`` with their sample counts."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw.strip())
            frames.append((m["func"], m["file"]) if m else (raw.strip(), ""))
        out.append((frames, int(count)))
    return out


def area_of(frames: list[tuple[str, str]]) -> str:
    """The area of a stack: the leaf-most frame that names one."""
    for func, file in reversed(frames):
        for fragment, area in AREAS:
            if fragment in file:
                return area
        if func.startswith("<") and not file:
            continue
    return "other"


def summarise(path: Path, top: int = 25) -> str:
    """A text report of the profile."""
    stacks = parse(path)
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, n in stacks:
        if frames:
            func, file = frames[-1]
            own[f"{func} ({_short(file)})"] += n
        for key in {f"{f} ({_short(p)})" for f, p in frames}:
            incl[key] += n
        areas[area_of(frames)] += n
    lines = [f"{path.name}: {total} samples"]
    lines.append("\nby area (leaf-most recognised frame):")
    lines += [f"  {100 * n / total:5.1f}%  {a}" for a, n in areas.most_common()]
    lines.append(f"\ntop {top} by own time:")
    lines += [f"  {100 * n / total:5.1f}%  {k}" for k, n in own.most_common(top)]
    lines.append(f"\ntop {top} by inclusive time:")
    lines += [f"  {100 * n / total:5.1f}%  {k}" for k, n in incl.most_common(top)]
    return "\n".join(lines)


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    print(summarise(args.profile, args.top))


if __name__ == "__main__":
    main()
