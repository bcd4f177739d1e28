"""Many cheap Modbus TCP devices in one process: the load simulator for benchmarks.

Hundreds of simulated machines cost next to nothing here because nothing is stored per
register: every read computes the registers of the device from the wall clock with the pure
:func:`registers` function, and the wire is a minimal hand-written Modbus TCP responder
(read holding / input registers only) on asyncio instead of one pymodbus server with its
datastore per device: serving 500 devices polled once a second costs it about 6% of a core
(``docs/performance.md``), so the gateway, not the simulator, is what a benchmark measures.

Devices are spread over TCP ports (``units_per_port=1``: one device per port, the usual
Ethernet counter box) or sit as several unit ids behind one port (a Modbus TCP gateway).
Each device is ``ok`` (answers), ``dead`` (its port is closed: connect refused) or ``stall``
(accepts the connection and the request, never answers: a hung PLC).

Register map of every device (holding and input registers are the same words, zero-based):

====  =====  ============  ==========================================================
addr  count  signal        meaning
====  =====  ============  ==========================================================
0     1      state         1 running, 0 idle (idle for the last 15% of each state period)
1     2      good_count    uint32 ABCD, one piece per ``piece_seconds`` since the origin
3     10     order_id      ASCII, NUL padded: ``PO-<device>`` or, with ``change_period``,
                           ``L<epoch ms>`` naming the (wall-clock) instant of its last change
13    ...    telemetry     uint16 each, ``(second * 7 + address) & 0xFFFF``
====  =====  ============  ==========================================================

The ``L<epoch ms>`` order ids are the latency probe: the value changes at known instants
(a jittered schedule, pure in :func:`last_change`) and carries its own change time, so a
subscriber in another process can measure change → arrival without sharing any state.

Run it on its own (``python -m simulators.load --devices 500``): it prints one JSON line
``{"ready": true, "devices": [...]}`` when every port listens and, on SIGTERM/SIGINT or
after ``--duration``, writes per-device request times to ``--stats`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import structlog

from shopfloor_gateway.simulators import logsetup as logs

log = structlog.get_logger(__name__)

Mode = Literal["ok", "dead", "stall"]

ADDR_STATE = 0
ADDR_GOOD_COUNT = 1
ADDR_ORDER_ID = 3
ORDER_ID_REGISTERS = 10
ADDR_TELEMETRY = 13
#: Fixed registers before the telemetry block (state, good_count, order_id).
FIXED_SIGNALS = 3

_READ_HOLDING = 3
_READ_INPUT = 4
_ILLEGAL_FUNCTION = 1
_ILLEGAL_ADDRESS = 2
_ILLEGAL_VALUE = 3
_GATEWAY_TARGET_FAILED = 11
_MBAP = struct.Struct(">HHHB")
_REQUEST = struct.Struct(">BHH")
#: MBAP length field of a read request: unit id + function + start + count.
_READ_LENGTH = 6
#: The biggest MBAP length a valid frame can announce (253-byte PDU + unit id).
_MAX_LENGTH = 254


@dataclass(frozen=True, slots=True)
class LoadDevice:
    """One simulated device: its place on the wire and its (pure) value model."""

    name: str
    port: int
    unit_id: int = 1
    signals: int = 20
    mode: Mode = "ok"
    #: Wall-clock epoch seconds at which the device's counters start.
    origin: float = 0.0
    piece_seconds: float = 5.0
    state_period: float = 60.0
    #: Seconds between order id changes (the latency probe); ``None``: a fixed order id.
    change_period: float | None = None
    #: Fraction of ``change_period`` by which this device's changes are shifted, so a
    #: floor of devices does not change all at once.
    change_phase: float = 0.0

    def __post_init__(self) -> None:
        """Refuse devices the wire or the model cannot represent."""
        if not 1 <= self.port <= 65535:
            raise ValueError(f"device {self.name}: port must be 1..65535, got {self.port}")
        if not 1 <= self.unit_id <= 247:
            raise ValueError(f"device {self.name}: unit_id must be 1..247, got {self.unit_id}")
        if not FIXED_SIGNALS <= self.signals <= 125 - ADDR_TELEMETRY + FIXED_SIGNALS:
            raise ValueError(f"device {self.name}: signals must be 3..115, got {self.signals}")
        for what, value in (
            ("piece_seconds", self.piece_seconds),
            ("state_period", self.state_period),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"device {self.name}: {what} must be > 0, got {value}")
        if self.change_period is not None and not (
            math.isfinite(self.change_period) and self.change_period > 0
        ):
            raise ValueError(f"device {self.name}: change_period must be > 0")
        if not 0 <= self.change_phase < 1:
            raise ValueError(f"device {self.name}: change_phase must be in [0, 1)")
        if self.mode not in ("ok", "dead", "stall"):
            raise ValueError(f"device {self.name}: unknown mode {self.mode!r}")

    @property
    def register_count(self) -> int:
        """Registers the device serves (0..register_count-1)."""
        return ADDR_TELEMETRY + self.signals - FIXED_SIGNALS


def _jitter(k: int) -> float:
    """A fixed pseudo-random fraction in [0, 1) for change number ``k`` (Knuth hash)."""
    return ((k * 2654435761) & 0xFFFFFFFF) / 2**32


def change_time(origin: float, period: float, k: int) -> float:
    """Instant of change number ``k``: ``origin + (k + jitter/2) * period``, strictly rising."""
    return origin + (k + 0.5 * _jitter(k)) * period


def last_change(origin: float, period: float, t: float) -> float | None:
    """The latest change instant at or before ``t`` (``None`` before the first)."""
    if t < origin:
        return None
    k = math.floor((t - origin) / period)
    at = change_time(origin, period, k)
    # Change k falls in [origin + k*period, origin + (k+0.5)*period): if it is still
    # ahead, change k-1 (earlier in the previous slot) is the last one.
    if at <= t:
        return at
    return change_time(origin, period, k - 1) if k > 0 else None


def order_id_at(device: LoadDevice, t: float) -> str:
    """The order id the device shows at wall time ``t``."""
    if device.change_period is None:
        return f"PO-{device.name}"[: 2 * ORDER_ID_REGISTERS]
    origin = device.origin + device.change_phase * device.change_period
    at = last_change(origin, device.change_period, t)
    return "L0" if at is None else f"L{round(at * 1000)}"


def registers(device: LoadDevice, t: float) -> list[int]:
    """All register words of ``device`` at wall time ``t`` (pure)."""
    elapsed = max(0.0, t - device.origin)
    phase = (elapsed + device.unit_id * 7.0 + device.port * 3.0) % device.state_period
    state = 1 if phase < 0.85 * device.state_period else 0
    good = int(elapsed // device.piece_seconds) & 0xFFFFFFFF
    text = order_id_at(device, t).encode("ascii").ljust(2 * ORDER_ID_REGISTERS, b"\x00")
    words = [state, good >> 16, good & 0xFFFF]
    words += struct.unpack(f">{ORDER_ID_REGISTERS}H", text)
    second = int(t)
    words += [
        (second * 7 + a) & 0xFFFF
        for a in range(ADDR_TELEMETRY, ADDR_TELEMETRY + device.signals - FIXED_SIGNALS)
    ]
    return words


@dataclass(frozen=True, slots=True)
class Request:
    """One Modbus TCP request as it came off the wire."""

    transaction: int
    unit_id: int
    function: int
    start: int
    count: int


class FrameError(ValueError):
    """The byte stream is not Modbus TCP (the connection gets closed)."""


def parse_requests(buffer: bytes) -> tuple[list[Request], bytes]:
    """Split complete Modbus TCP frames off ``buffer``; return them and the unused rest.

    A function the responder does not serve comes back with ``count=-1`` (answered with
    ILLEGAL FUNCTION). Raises :class:`FrameError` on a frame no Modbus TCP client sends.
    """
    out: list[Request] = []
    pos = 0
    while len(buffer) - pos >= _MBAP.size:
        transaction, protocol, length, unit = _MBAP.unpack_from(buffer, pos)
        if protocol != 0 or not 2 <= length <= _MAX_LENGTH:
            raise FrameError(f"not Modbus TCP: protocol {protocol}, length {length}")
        end = pos + 6 + length
        if len(buffer) < end:
            break
        function = buffer[pos + 7]
        if function in (_READ_HOLDING, _READ_INPUT) and length == _READ_LENGTH:
            _, start, count = _REQUEST.unpack_from(buffer, pos + 7)
            out.append(Request(transaction, unit, function, start, count))
        else:
            out.append(Request(transaction, unit, function, 0, -1))
        pos = end
    return out, buffer[pos:]


def exception_response(request: Request, code: int) -> bytes:
    """The exception answer to ``request``."""
    return _MBAP.pack(request.transaction, 0, 3, request.unit_id) + bytes(
        (request.function | 0x80, code)
    )


def respond(request: Request, words: Sequence[int]) -> bytes:
    """The answer to a read of ``words`` (the device's registers), or its exception."""
    if request.count < 0:
        return exception_response(request, _ILLEGAL_FUNCTION)
    if not 1 <= request.count <= 125:
        return exception_response(request, _ILLEGAL_VALUE)
    end = request.start + request.count
    if end > len(words):
        return exception_response(request, _ILLEGAL_ADDRESS)
    n = request.count
    return _MBAP.pack(request.transaction, 0, 3 + 2 * n, request.unit_id) + struct.pack(
        f">BB{n}H", request.function, 2 * n, *words[request.start : end]
    )


@dataclass(slots=True)
class DeviceStats:
    """What one device saw: the wall times of the requests it received."""

    requests: list[float] = field(default_factory=list)


class _Responder(asyncio.Protocol):
    """One client connection to one port; answers for the unit ids on that port."""

    def __init__(
        self,
        devices: dict[int, LoadDevice],
        stats: dict[str, DeviceStats],
        clock: Callable[[], float],
    ) -> None:
        self._devices = devices
        self._stats = stats
        self._clock = clock
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            requests, self._buffer = parse_requests(self._buffer + data)
        except FrameError as exc:
            log.warning("load.bad_frame", error=str(exc))
            transport.close()
            return
        now = self._clock()
        for request in requests:
            device = self._devices.get(request.unit_id)
            if device is None:
                transport.write(exception_response(request, _GATEWAY_TARGET_FAILED))
                continue
            self._stats[device.name].requests.append(now)
            if device.mode == "stall":
                continue  # a hung PLC: takes the request, never answers
            transport.write(respond(request, registers(device, now)))


class LoadFloor:
    """Async context manager serving a set of :class:`LoadDevice` on 127.0.0.1."""

    def __init__(
        self,
        devices: Sequence[LoadDevice],
        *,
        host: str = "127.0.0.1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Group the devices by port; nothing listens before ``async with``."""
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        self.devices = tuple(devices)
        self.host = host
        self._clock = clock
        self.stats: dict[str, DeviceStats] = {d.name: DeviceStats() for d in devices}
        self._ports: dict[int, dict[int, LoadDevice]] = {}
        for d in devices:
            units = self._ports.setdefault(d.port, {})
            if d.unit_id in units:
                raise ValueError(f"port {d.port} has unit id {d.unit_id} twice")
            units[d.unit_id] = d
        self._servers: list[asyncio.Server] = []

    async def __aenter__(self) -> LoadFloor:
        """Listen on every port that has at least one device not ``dead``."""
        loop = asyncio.get_running_loop()
        try:
            for port, units in self._ports.items():
                live = {u: d for u, d in units.items() if d.mode != "dead"}
                if not live:
                    continue
                server = await loop.create_server(
                    lambda live=live: _Responder(live, self.stats, self._clock),  # type: ignore[misc]
                    self.host,
                    port,
                    reuse_address=True,
                    backlog=1024,
                )
                self._servers.append(server)
        except BaseException:
            await self._close()
            raise
        log.info("load.serving", devices=len(self.devices), ports=len(self._servers))
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close every listener and connection."""
        await self._close()

    async def _close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
            # Python 3.11's wait_closed() does not close accepted connections; do it here so
            # a client sees the device go away instead of a silent socket.
            with contextlib.suppress(AttributeError):
                server.close_clients()  # type: ignore[attr-defined]
        for server in servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()


def build_devices(
    count: int,
    *,
    base_port: int,
    signals: int = 20,
    units_per_port: int = 1,
    origin: float = 0.0,
    change_period: float | None = None,
    dead: float = 0.0,
    stall: float = 0.0,
    piece_seconds: float = 5.0,
) -> list[LoadDevice]:
    """``count`` devices named ``m0000``.., on ports from ``base_port``; the last ``dead`` and
    ``stall`` fractions (spread evenly) are dead or stalling."""
    if count < 1:
        raise ValueError("count must be >= 1")
    if not 1 <= units_per_port <= 247:
        raise ValueError("units_per_port must be 1..247")
    if not (0 <= dead <= 1 and 0 <= stall <= 1 and dead + stall <= 1):
        raise ValueError("dead and stall are fractions whose sum is at most 1")
    n_dead, n_stall = round(count * dead), round(count * stall)
    faulty = n_dead + n_stall
    # Spread the faulty devices over the range so they do not share ports with each other.
    step = count / faulty if faulty else 0.0
    chosen = [int(i * step) for i in range(faulty)]
    modes: dict[int, Mode] = {i: "dead" for i in chosen[:n_dead]}
    modes.update({i: "stall" for i in chosen[n_dead:]})
    if units_per_port > 1 and n_dead:
        raise ValueError("dead devices need their own port (units_per_port=1)")
    devices = []
    for i in range(count):
        port = base_port + i // units_per_port
        if port > 65535:
            raise ValueError(f"{count} devices do not fit above port {base_port}")
        devices.append(
            LoadDevice(
                name=f"m{i:04d}",
                port=port,
                unit_id=1 + i % units_per_port,
                signals=signals,
                mode=modes.get(i, "ok"),
                origin=origin,
                piece_seconds=piece_seconds * (1.0 + (i % 7) / 10),
                change_period=change_period,
                # Golden-ratio spacing: changes spread evenly over the period, any count.
                change_phase=(i * 0.6180339887) % 1.0,
            )
        )
    return devices


def signal_map(device: LoadDevice) -> dict[str, dict[str, object]]:
    """Gateway signal config (``signals:`` of a machine or profile) matching the register map."""
    out: dict[str, dict[str, object]] = {
        "state": {"address": ADDR_STATE, "type": "uint16", "map": {0: "idle", 1: "running"}},
        "good_count": {"address": ADDR_GOOD_COUNT, "type": "uint32"},
        "order_id": {"address": ADDR_ORDER_ID, "type": "string", "length": ORDER_ID_REGISTERS},
    }
    for i in range(device.signals - FIXED_SIGNALS):
        out[f"t{i:03d}"] = {"address": ADDR_TELEMETRY + i, "type": "uint16"}
    return out


async def serve(args: argparse.Namespace) -> dict[str, object]:
    """Run the load floor until SIGTERM/SIGINT or ``--duration``; return the stats."""
    devices = build_devices(
        args.devices,
        base_port=args.base_port,
        signals=args.signals,
        units_per_port=args.units_per_port,
        origin=time.time(),
        change_period=args.change_period,
        dead=args.dead,
        stall=args.stall,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with LoadFloor(devices, host=args.host) as floor:
        ready = {
            "ready": True,
            "devices": [
                {"name": d.name, "port": d.port, "unit_id": d.unit_id, "mode": d.mode}
                for d in devices
            ],
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration or None):
                await stop.wait()
    return {
        "devices": {
            d.name: {"mode": d.mode, "requests": floor.stats[d.name].requests} for d in devices
        }
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m simulators.load --devices 500 --signals 20``."""
    p = argparse.ArgumentParser(
        prog="shopfloor_gateway.simulators.load", description=__doc__.splitlines()[0]
    )
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--signals", type=int, default=20, help="mapped signals per device (3..115)")
    p.add_argument("--base-port", type=int, default=15000)
    p.add_argument("--units-per-port", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--change-period", type=float, default=None, help="latency probe period, s")
    p.add_argument("--dead", type=float, default=0.0, help="fraction of dead devices")
    p.add_argument("--stall", type=float, default=0.0, help="fraction of stalling devices")
    p.add_argument("--duration", type=float, default=0.0, help="stop after N s (0: on signal)")
    p.add_argument("--stats", default="", help="write request times here (JSON) at the end")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = p.parse_args(argv)
    # stdout carries the ready line; logs go to stderr.
    logs.configure("warning", json=True, stream=sys.stderr)
    try:
        if args.uvloop:
            import uvloop

            stats = uvloop.run(serve(args))
        else:
            stats = asyncio.run(serve(args))
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"shopfloor_gateway.simulators.load: {exc}\n")
        return 2
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
