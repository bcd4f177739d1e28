"""A "PLC" with a mixed Modbus layout: every decoder and the read planner get exercised.

Pure model (:class:`PlcModel`, :func:`encode_image`) plus a server (:class:`SimulatedPlc`).
The encoder here is written independently of the gateway's decoder (plain :mod:`struct`
and hand-built nibbles), so round-trip tests compare two implementations.

Holding registers (zero-based, unit id 1):

====  =====  ===============  ====================================================
addr  count  signal           encoding
====  =====  ===============  ====================================================
0     2      temperature      float32, word order CDAB (low word first), deg C
2     2      pressure         float32 CDAB, bar
4     1      status           bits: 0 running, 1 fault, 2 door_open, 3 estop
5     1      part_count       BCD, 4 digits (wraps at 9999)
6     2      total_count      BCD, 8 digits, ABCD
8     4      energy_wh        uint64 ABCD
12    4      runtime_s        float64 DCBA (little-endian)
16    4      (hole)           not implemented: any read touching 16..19 answers exception 2
20    8      program          ASCII, 16 chars, bytes swapped in each register (BADC)
28    1      setpoint         int16 (negative in the default state: -25)
29    2      order_number     uint32 CDAB
====  =====  ===============  ====================================================

Input registers: 0..1 spindle_speed float32 ABCD (rpm), 2 alarm_code uint16.
Coils: 0 lamp_green, 1 lamp_red. Discrete inputs: 0 part_present, 1 door_closed.
Anything else answers exception 2 (ILLEGAL DATA ADDRESS).
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from pymodbus.simulator import DataType, SimData, SimDevice

from shopfloor_gateway.simulators.modbus_server import (
    Server,
    SimTransport,
    _shutdown,
    absent_device,
    start_server,
)
from shopfloor_gateway.simulators.ticker import run_ticks, stop_task

log = structlog.get_logger(__name__)

UNIT_ID = 1
HOLDING_COUNT = 31
HOLE = range(16, 20)

#: The gateway signal map of this PLC (what ``shopfloor probe ... --emit-config`` should
#: arrive at, and what the tests poll).
PLC_SIGNALS: Mapping[str, Mapping[str, Any]] = {
    "temperature": {"address": 0, "type": "float32", "word_order": "CDAB"},
    "pressure": {"address": 2, "type": "float32", "word_order": "CDAB"},
    "running": {"ref": "40005.0"},
    "fault": {"ref": "40005.1"},
    "door_open": {"ref": "40005.2"},
    "estop": {"ref": "40005.3"},
    "part_count": {"address": 5, "type": "bcd16"},
    "total_count": {"address": 6, "type": "bcd32"},
    "energy_wh": {"address": 8, "type": "uint64"},
    "runtime_s": {"address": 12, "type": "float64", "word_order": "DCBA"},
    "program": {"address": 20, "type": "string", "length": 8, "word_order": "BADC"},
    "setpoint": {"address": 28, "type": "int16"},
    "order_number": {"address": 29, "type": "uint32", "word_order": "CDAB"},
    "spindle_speed": {"area": "input", "address": 0, "type": "float32"},
    "alarm_code": {"area": "input", "address": 2, "type": "uint16"},
    "lamp_green": {"area": "coil", "address": 0},
    "lamp_red": {"area": "coil", "address": 1},
    "part_present": {"area": "discrete_input", "address": 0},
    "door_closed": {"area": "discrete_input", "address": 1},
}


@dataclass(frozen=True, slots=True)
class PlcValues:
    """Every value the PLC shows at one moment."""

    temperature: float
    pressure: float
    running: bool
    fault: bool
    door_open: bool
    estop: bool
    part_count: int
    total_count: int
    energy_wh: int
    runtime_s: float
    program: str
    setpoint: int
    order_number: int
    spindle_speed: float
    alarm_code: int
    lamp_green: bool
    lamp_red: bool
    part_present: bool
    door_closed: bool


@dataclass(frozen=True, slots=True)
class PlcImage:
    """The four data areas as the server serves them."""

    holding: dict[int, int]
    input: list[int]
    coils: list[bool]
    discrete: list[bool]


class PlcModel:
    """Deterministic PLC values as a function of scenario time (seconds)."""

    def __init__(self, *, cycle_seconds: float = 2.0, start_total: int = 99_999_990) -> None:
        """A part every ``cycle_seconds``; the lifetime counter starts near its 8-digit end."""
        if not math.isfinite(cycle_seconds) or cycle_seconds <= 0:
            raise ValueError(f"cycle_seconds must be > 0, got {cycle_seconds!r}")
        self.cycle_seconds = cycle_seconds
        self.start_total = start_total

    def at(self, t: float) -> PlcValues:
        """The values at scenario time ``t``: runs for 60 s, faults for 10 s, and so on."""
        phase = t % 70.0
        fault = phase >= 60.0
        parts = int(t // self.cycle_seconds)
        return PlcValues(
            temperature=round(40.0 + 5.0 * math.sin(t / 10.0), 3),
            pressure=round(6.0 + 0.5 * math.cos(t / 7.0), 3),
            running=not fault,
            fault=fault,
            door_open=False,
            estop=False,
            part_count=parts % 10_000,
            total_count=(self.start_total + parts) % 100_000_000,
            energy_wh=5_000_000_000 + int(t * 1_000),
            runtime_s=float(t),
            program="PRG-4711-FLANGE",
            setpoint=-25,
            order_number=4_200_017,
            spindle_speed=0.0 if fault else 1450.5,
            alarm_code=310 if fault else 0,
            lamp_green=not fault,
            lamp_red=fault,
            part_present=parts % 2 == 1,
            door_closed=True,
        )


def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f">{len(data) // 2}H", data))


def _bcd(value: int, digits: int) -> list[int]:
    nibbles = 0
    for ch in f"{value:0{digits}d}":
        nibbles = nibbles << 4 | int(ch)
    return _words(nibbles.to_bytes(digits // 2, "big"))


def encode_image(v: PlcValues) -> PlcImage:
    """The registers and bits of ``v``, laid out as the module docstring says."""
    holding: dict[int, int] = {}

    def put(address: int, words: list[int]) -> None:
        for i, word in enumerate(words):
            holding[address + i] = word

    temp = _words(struct.pack(">f", v.temperature))
    put(0, [temp[1], temp[0]])  # CDAB: low word first
    press = _words(struct.pack(">f", v.pressure))
    put(2, [press[1], press[0]])
    put(4, [v.running | v.fault << 1 | v.door_open << 2 | v.estop << 3])
    put(5, _bcd(v.part_count, 4))
    put(6, _bcd(v.total_count, 8))
    put(8, _words(struct.pack(">Q", v.energy_wh)))
    put(12, _words(struct.pack("<d", v.runtime_s)))  # DCBA: every byte reversed
    text = v.program.encode("ascii").ljust(16, b"\x00")
    swapped = bytes(b for pair in zip(text[1::2], text[0::2], strict=True) for b in pair)
    put(20, _words(swapped))  # BADC: bytes swapped inside each register
    put(28, _words(struct.pack(">h", v.setpoint)))
    order = _words(struct.pack(">I", v.order_number))
    put(29, [order[1], order[0]])
    return PlcImage(
        holding=holding,
        input=[*_words(struct.pack(">f", v.spindle_speed)), v.alarm_code],
        coils=[v.lamp_green, v.lamp_red],
        discrete=[v.part_present, v.door_closed],
    )


def _holding_blocks(image: PlcImage) -> list[SimData]:
    """Holding registers as two blocks around the hole (the hole is not served)."""
    low = [image.holding[a] for a in range(HOLE.start)]
    high = [image.holding[a] for a in range(HOLE.stop, HOLDING_COUNT)]
    return [
        SimData(0, values=low, datatype=DataType.REGISTERS),
        SimData(HOLE.stop, values=high, datatype=DataType.REGISTERS),
    ]


def _bits(values: list[bool]) -> list[SimData]:
    # pymodbus' datastore keeps bits in 16-bit words; the unused ones read as False.
    return [SimData(0, values=[*values, *([False] * (16 - len(values)))], datatype=DataType.BITS)]


class SimulatedPlc:
    """Serves a :class:`PlcModel` over Modbus TCP, RTU over TCP or RTU on a serial port."""

    def __init__(
        self,
        model: PlcModel | None = None,
        *,
        transport: SimTransport = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
        serial_port: str | None = None,
        baudrate: int = 19200,
        unit_id: int = UNIT_ID,
        speed: float = 1.0,
        tick: float = 0.05,
    ) -> None:
        """Nothing starts before ``async with``; ``port=0`` picks a free port (:attr:`port`)."""
        self.model = model or PlcModel()
        self.transport: SimTransport = transport
        self.host = host
        self.port = port
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.unit_id = unit_id
        self.speed = speed
        self.tick = tick
        self.time = 0.0
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def values(self) -> PlcValues:
        """What the PLC shows now."""
        return self.model.at(self.time)

    async def __aenter__(self) -> Self:
        """Start serving and the tick task."""
        image = encode_image(self.values)
        device = SimDevice(
            id=self.unit_id,
            simdata=(
                _bits(image.coils),
                _bits(image.discrete),
                _holding_blocks(image),
                [SimData(0, values=image.input, datatype=DataType.REGISTERS)],
            ),
        )
        # Unit ids nobody has: exception 11 on TCP (as a gateway would), silence on RTU.
        nobody = SimDevice(
            id=0,
            simdata=[SimData(0, values=[0], datatype=DataType.REGISTERS)],
            action=absent_device,
        )
        self._server, self.port = await start_server(
            [device, nobody],
            transport=self.transport,
            host=self.host,
            port=self.port,
            serial_port=self.serial_port,
            baudrate=self.baudrate,
            silent_units=None if self.transport == "tcp" else frozenset({self.unit_id}),
        )
        log.info("plc serving", transport=self.transport, port=self.port, unit_id=self.unit_id)
        self._task = asyncio.create_task(self._run(), name="simulated-plc-tick")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop ticking, then serving."""
        task, self._task = self._task, None
        await stop_task(task)
        server, self._server = self._server, None
        if server is not None:
            await _shutdown(server)

    async def set_time(self, t: float) -> None:
        """Jump to scenario time ``t`` and write the registers (for tests)."""
        self.time = t
        await self._write()

    async def _run(self) -> None:
        async def step(elapsed: float) -> None:
            self.time = elapsed
            await self._write()

        # Scenario time continues from where set_time() left it.
        started = asyncio.get_running_loop().time() - self.time / self.speed
        await run_ticks(started, tick=self.tick, speed=self.speed, step=step)

    async def _write(self) -> None:
        server = self._server
        if server is None:
            return
        image = encode_image(self.values)
        low = [image.holding[a] for a in range(HOLE.start)]
        high = [image.holding[a] for a in range(HOLE.stop, HOLDING_COUNT)]
        await server.async_setValues(self.unit_id, 16, 0, low)
        await server.async_setValues(self.unit_id, 16, HOLE.stop, high)
        await server.async_setValues(self.unit_id, 4, 0, image.input)
        await server.async_setValues(self.unit_id, 15, 0, image.coils)
        await server.async_setValues(self.unit_id, 2, 0, image.discrete)
