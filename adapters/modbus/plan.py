"""Read planning (pure): coalesce signals into as few register reads as possible.

Rules of a plan:

- each request reads one area, at most ``max_registers`` registers (``max_bits`` bits for
  coils and discrete inputs), and starts and ends on a mapped register (or bit);
- a signal is never split across requests (it is decoded from exactly one response);
- a request may bridge runs of *unmapped* registers (mapped by no signal of that area)
  of at most ``max_gap`` registers (``max_bit_gap`` bits). Registers mapped by some other
  signal are not a gap, even when that signal is read by another request: they exist on
  the device.

Under these rules a greedy pass is optimal: the signal that starts first must be read by
a request starting at its address, and that request may as well take every signal that
ends within ``max_registers`` and is reachable without crossing a gap wider than
``max_gap`` (taking more never makes the rest harder to cover). The unit tests check
this against a brute-force search.

Polling cadence lives in :func:`adapters.base.next_deadline`: fixed-rate deadlines that skip
missed ticks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from shopfloor_gateway.adapters.modbus.config import (
    BIT_AREAS,
    MAX_BITS_PER_READ,
    ModbusConnectionConfig,
    ModbusSignalConfig,
    RegisterArea,
)
from shopfloor_gateway.adapters.modbus.decode import BlockDecoder


class Point(NamedTuple):
    """One signal inside a read: its name, first register relative to the request, width."""

    signal: str
    offset: int
    width: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: ``count`` registers of ``area`` from ``start``, and what is in them."""

    area: RegisterArea
    start: int
    count: int
    points: tuple[Point, ...]


def plan_reads(
    signals: Mapping[str, ModbusSignalConfig],
    *,
    max_registers: int,
    max_gap: int,
    max_bits: int = MAX_BITS_PER_READ,
    max_bit_gap: int = 128,
) -> tuple[ReadRequest, ...]:
    """The minimal set of requests covering every signal (ordered by area, then address).

    Raises ``ValueError`` when a signal is wider than ``max_registers``.
    """
    for name, limit in (("max_registers", max_registers), ("max_bits", max_bits)):
        if limit < 1:
            raise ValueError(f"{name} must be at least 1, got {limit}")
    for name, gap in (("max_gap", max_gap), ("max_bit_gap", max_bit_gap)):
        if gap < 0:
            raise ValueError(f"{name} must be 0 or more, got {gap}")
    by_area: dict[RegisterArea, list[tuple[int, int, str]]] = {}
    for name, signal in signals.items():
        width = signal.register_count
        if width > max_registers:
            raise ValueError(
                f"signal {name!r} is {width} registers wide; one read takes at most "
                f"{max_registers} (max_registers_per_read)"
            )
        by_area.setdefault(signal.area, []).append((signal.start, signal.start + width, name))
    requests: list[ReadRequest] = []
    for area in sorted(by_area):
        bits = area in BIT_AREAS
        limit, gap = (max_bits, max_bit_gap) if bits else (max_registers, max_gap)
        for cluster in _clusters(sorted(by_area[area]), gap):
            requests.extend(_cover(area, cluster, limit))
    return tuple(requests)


def plan_for(
    connection: ModbusConnectionConfig, signals: Mapping[str, ModbusSignalConfig]
) -> tuple[ReadRequest, ...]:
    """:func:`plan_reads` with the limits of one device's connection config."""
    return plan_reads(
        signals,
        max_registers=connection.max_registers_per_read,
        max_gap=connection.max_gap,
        max_bits=connection.max_bits_per_read,
        max_bit_gap=connection.max_bit_gap,
    )


def _clusters(spans: list[tuple[int, int, str]], max_gap: int) -> list[list[tuple[int, int, str]]]:
    """Split spans sorted by start where the unmapped gap between them exceeds ``max_gap``."""
    clusters: list[list[tuple[int, int, str]]] = []
    covered_to = -1
    for span in spans:
        start, end, _ = span
        if not clusters or start - covered_to > max_gap:
            clusters.append([])
            covered_to = end
        clusters[-1].append(span)
        covered_to = max(covered_to, end)
    return clusters


def _cover(
    area: RegisterArea, spans: list[tuple[int, int, str]], max_registers: int
) -> list[ReadRequest]:
    """Greedy cover of one gap-free cluster (spans sorted by start) with bounded windows."""
    requests: list[ReadRequest] = []
    remaining = spans
    while remaining:
        first = remaining[0][0]
        limit = first + max_registers
        taken = [span for span in remaining if span[1] <= limit]
        remaining = [span for span in remaining if span[1] > limit]
        end = max(span[1] for span in taken)
        # Points by offset, then width, then name: a stable, readable order.
        points = sorted(
            (Point(name, start - first, stop - start) for start, stop, name in taken),
            key=lambda p: (p.offset, p.width, p.signal),
        )
        requests.append(ReadRequest(area, first, end - first, tuple(points)))
    return requests


def split_gaps(request: ReadRequest) -> tuple[ReadRequest, ...]:
    """The same signals without bridging any unmapped register: the first fallback when a
    device refuses a bridged block (it has a hole there)."""
    spans = sorted(
        (request.start + p.offset, request.start + p.offset + p.width, p.signal)
        for p in request.points
    )
    out: list[ReadRequest] = []
    for cluster in _clusters(spans, 0):
        out.extend(_cover(request.area, cluster, request.count))
    return tuple(out)


def split(request: ReadRequest) -> tuple[ReadRequest, ...]:
    """One request per signal of ``request``, for a device that rejects the bridged block."""
    return tuple(
        ReadRequest(
            request.area, request.start + point.offset, point.width, (point._replace(offset=0),)
        )
        for point in request.points
    )


def compile_decoder(
    request: ReadRequest, signals: Mapping[str, ModbusSignalConfig]
) -> BlockDecoder:
    """The decoder of one request's response: offsets and ``struct`` formats worked out once."""
    return BlockDecoder(
        [(p.signal, p.offset, signals[p.signal]) for p in request.points],
        request.count,
        bit_area=request.area in BIT_AREAS,
    )
