"""Serve simulated sewing stations as Modbus devices (the imperative shell).

Every pymodbus call of the simulators lives here. :class:`SimulatedFloor` runs one Modbus
TCP server per station; :class:`SimulatedLine` puts several stations as unit ids behind one
server: an RS-485 bus (RTU on a serial port, e.g. one end of a
:class:`~simulators.serial_link.PtyLink`), a serial-to-Ethernet converter (RTU over TCP) or
a Modbus TCP gateway. :func:`start_server` is the shared way to serve any set of
:class:`SimDevice` on any of those transports (the PLC simulator uses it too).

On :class:`SimulatedFloor`, one pymodbus TCP server per station
serves the station's ``REGISTER_COUNT`` holding registers. Addresses outside the map answer
ILLEGAL DATA ADDRESS; writes and the other register kinds answer ILLEGAL FUNCTION (the
station is a read-only counter with holding registers only); an unknown unit id answers
GATEWAY TARGET DEVICE FAILED TO RESPOND, as a Modbus gateway in front of an absent device
would.

One task advances every model in scenario time (wall time since start times ``speed``) each
``tick`` and writes the registers that changed. A stopped station keeps producing in
scenario time, exactly like a device whose network link is cut.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from shopfloor_gateway.simulators.sewing import REGISTER_COUNT, UNIT_ID, StationModel
from shopfloor_gateway.simulators.ticker import check_pace, run_ticks, stop_task, wait_finished

log = structlog.get_logger(__name__)

_READ_HOLDING_REGISTERS = 3
_WRITE_MULTIPLE_REGISTERS = 16


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def _shutdown(server: ModbusTcpServer | ModbusSerialServer) -> None:
    # pymodbus 3.16 leaves shutdown() unannotated; this is the one place that calls it.
    await server.shutdown()  # type: ignore[no-untyped-call]


#: A pymodbus ``SimDevice`` action: called for every access that passed the address check.
Action = Callable[
    [int, int, int, int, list[int], list[int] | list[bool] | None],
    Coroutine[None, None, ExcCodes | None],
]


async def absent_device(
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    current: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    """``SimDevice`` action of unit id 0 (the catch-all): nobody there, as behind a gateway."""
    return ExcCodes.GATEWAY_NO_RESPONSE


def read_only_holding(updating: Callable[[], bool]) -> Action:
    """``SimDevice`` action of a station: holding registers only, read-only.

    pymodbus' datastore would also serve the block as coils and input registers; the device
    only has holding registers and only reads them. While ``updating()`` is true the
    simulator itself is writing, and that is let through.
    """

    async def guard(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if updating():
            return None
        if function_code != _READ_HOLDING_REGISTERS or set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        return None

    return guard


def changed_span(old: Sequence[int], new: Sequence[int]) -> tuple[int, list[int]] | None:
    """First changed address and the registers from there to the last change (or ``None``)."""
    changed = [i for i in range(REGISTER_COUNT) if new[i] != old[i]]
    if not changed:
        return None
    first, last = changed[0], changed[-1]
    return first, list(new[first : last + 1])


#: How a simulated device is reached.
SimTransport = Literal["tcp", "rtu_over_tcp", "rtu"]

#: Server object of :func:`start_server`.
Server = ModbusTcpServer | ModbusSerialServer


def _silence(units: frozenset[int], framer: FramerType) -> Callable[[bool, bytes], bytes]:
    """A packet tracer that drops every response of a unit id not in ``units``.

    On a serial bus an absent unit simply never answers (there is nobody to send an
    exception), and the client has to wait out its timeout: this reproduces that.
    """
    unit_at = 6 if framer == FramerType.SOCKET else 0

    def trace(sending: bool, packet: bytes) -> bytes:
        if sending and len(packet) > unit_at and packet[unit_at] not in units:
            return b""
        return packet

    return trace


async def start_server(
    devices: list[SimDevice],
    *,
    transport: SimTransport = "tcp",
    host: str = "127.0.0.1",
    port: int = 0,
    serial_port: str | None = None,
    baudrate: int = 19200,
    silent_units: frozenset[int] | None = None,
) -> tuple[Server, int]:
    """Serve ``devices``; return the server and its TCP port (0 for a serial line).

    ``silent_units``: only these unit ids ever answer (every other request goes
    unanswered, as on an RS-485 bus). Raises ``OSError`` when the port cannot be used.
    """
    framer = FramerType.SOCKET if transport == "tcp" else FramerType.RTU
    trace = _silence(silent_units, framer) if silent_units is not None else None
    server: Server
    if transport == "rtu":
        if serial_port is None:
            raise ValueError("transport rtu needs serial_port")
        server = ModbusSerialServer(
            context=devices,
            framer=framer,
            port=serial_port,
            baudrate=baudrate,
            trace_packet=trace,
        )
    else:
        server = ModbusTcpServer(
            context=devices, framer=framer, address=(host, port), trace_packet=trace
        )
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:
        await _shutdown(server)
        where = serial_port if transport == "rtu" else f"{host}:{port}"
        raise OSError(f"cannot serve on {where} (in use or not available)") from exc
    if transport == "rtu":
        return server, 0
    listener = server.transport
    bound = listener.sockets[0].getsockname()[1] if isinstance(listener, asyncio.Server) else port
    return server, int(bound)


@dataclass(slots=True)
class StationSpec:
    """One simulated station: its name, TCP port, model and Modbus unit id."""

    name: str
    port: int
    model: StationModel
    unit_id: int = UNIT_ID

    def __post_init__(self) -> None:
        """Validate port and unit id."""
        if not 1 <= self.port <= 65535:
            raise ValueError(f"station {self.name}: port must be 1..65535, got {self.port}")
        # Unit id 0 is the broadcast address and means "every device" to pymodbus' datastore.
        if not 1 <= self.unit_id <= 247:
            raise ValueError(f"station {self.name}: unit_id must be 1..247, got {self.unit_id}")


@dataclass(slots=True)
class _Station:
    spec: StationSpec
    server: ModbusTcpServer | None = None
    written: list[int] = field(default_factory=list)
    # True only while the floor itself writes registers; any other write is a client's.
    updating: bool = False

    def is_updating(self) -> bool:
        """True while the floor itself writes this station's registers."""
        return self.updating


class SimulatedFloor:
    """Async context manager running a set of simulated stations as Modbus TCP servers."""

    def __init__(
        self,
        stations: Sequence[StationSpec],
        *,
        host: str = "127.0.0.1",
        speed: float = 1.0,
        tick: float = 0.05,
    ) -> None:
        """Check the set-up; nothing starts before ``async with``."""
        check_pace(speed, tick)
        names = [spec.name for spec in stations]
        ports = [spec.port for spec in stations]
        if len(set(names)) != len(names):
            raise ValueError(f"station names must be unique: {names}")
        if len(set(ports)) != len(ports):
            raise ValueError(f"station ports must be unique: {ports}")
        self.stations: tuple[StationSpec, ...] = tuple(stations)
        self.host = host
        self.speed = speed
        self.tick = tick
        self._by_name = {spec.name: _Station(spec) for spec in self.stations}
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start every station's server, then the tick task."""
        try:
            for station in self._by_name.values():
                await self._start(station)
        except BaseException:
            await self._stop_all()
            raise
        self._check_finished()
        # Scenario time starts now; models advanced before the floor started continue
        # from where they are.
        offsets = {name: st.spec.model.time for name, st in self._by_name.items()}
        started = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(started, offsets), name="simulated-floor-tick")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the tick task first (nothing writes while servers close), then the servers."""
        task, self._task = self._task, None
        try:
            await stop_task(task)  # re-raises a failure of the tick task, after cleanup below
        finally:
            await self._stop_all()

    async def stop_station(self, name: str) -> None:
        """Close one station's listener and its client connections (the device goes dark)."""
        station = self._station(name)
        await self._stop(station)

    async def start_station(self, name: str) -> None:
        """Serve a stopped station again on its port, with its current registers."""
        station = self._station(name)
        if station.server is None:
            await self._start(station)

    def is_serving(self, name: str) -> bool:
        """True while the named station's server is listening."""
        return self._station(name).server is not None

    async def wait_finished(self, timeout: float) -> None:  # noqa: ASYNC109 (agreed API)
        """Return once every scripted station has run its script and its registers show it.

        Stations on the endless generated day are not waited for. Raises ``TimeoutError``.
        """
        if self._task is None:
            raise RuntimeError("the floor is not running; use it with 'async with'")
        await wait_finished(
            self._finished,
            self._task,
            timeout,
            name="simulated-floor-wait",
            stopped="the simulated floor stopped before the scenarios finished",
        )

    # ---- internals -------------------------------------------------------------------

    def _station(self, name: str) -> _Station:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no station named {name!r}; have {sorted(self._by_name)}") from None

    async def _start(self, station: _Station) -> None:
        spec = station.spec
        registers = spec.model.registers()

        def block() -> SimData:
            return SimData(address=0, count=1, values=list(registers), datatype=DataType.REGISTERS)

        devices = [
            SimDevice(
                id=spec.unit_id, simdata=[block()], action=read_only_holding(station.is_updating)
            ),
            # Device id 0 is pymodbus' catch-all for unit ids nobody else claims.
            SimDevice(id=0, simdata=[block()], action=absent_device),
        ]
        server = ModbusTcpServer(context=devices, address=(self.host, spec.port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            await _shutdown(server)
            raise OSError(
                f"station {spec.name}: cannot listen on {self.host}:{spec.port} "
                "(port in use or address not available)"
            ) from exc
        station.server = server
        station.written = registers
        log.info(
            "station serving",
            station=spec.name,
            address=f"{self.host}:{spec.port}",
            unit_id=spec.unit_id,
        )

    async def _stop(self, station: _Station) -> None:
        server, station.server = station.server, None
        if server is not None:
            await _shutdown(server)
            log.info(
                "station stopped",
                station=station.spec.name,
                address=f"{self.host}:{station.spec.port}",
            )

    async def _stop_all(self) -> None:
        for station in self._by_name.values():
            await self._stop(station)

    async def _run(self, started: float, offsets: dict[str, float]) -> None:
        async def step(elapsed: float) -> None:
            for name, station in self._by_name.items():
                station.spec.model.advance(offsets[name] + elapsed)
                await self._write(station)
            self._check_finished()

        await run_ticks(started, tick=self.tick, speed=self.speed, step=step)

    async def _write(self, station: _Station) -> None:
        registers = station.spec.model.registers()
        span = changed_span(station.written, registers)
        station.written = registers
        if span is None or station.server is None:
            return
        station.updating = True
        try:
            # One write of the changed span: a client never sees half an update.
            await station.server.async_setValues(
                station.spec.unit_id, _WRITE_MULTIPLE_REGISTERS, *span
            )
        finally:
            station.updating = False

    def _check_finished(self) -> None:
        if all(st.spec.model.finished for st in self._by_name.values() if st.spec.model.scripted):
            self._finished.set()


# ---------------------------------------------------------------------------- shared line


@dataclass(slots=True)
class LineStation:
    """One station on a shared line: its name, unit id and model."""

    name: str
    unit_id: int
    model: StationModel

    def __post_init__(self) -> None:
        """Validate the unit id (1..247; 0 is broadcast)."""
        if not 1 <= self.unit_id <= 247:
            raise ValueError(f"station {self.name}: unit_id must be 1..247, got {self.unit_id}")


class SimulatedLine:
    """Several stations as unit ids behind one Modbus server (an RS-485 bus or a converter).

    ``transport="rtu"`` serves RTU frames on ``serial_port`` (a tty path); ``"rtu_over_tcp"``
    and ``"tcp"`` listen on ``host:port`` (``port=0`` picks a free one, see :attr:`port`).
    On RTU transports a unit id that no station has never answers, like an empty bus
    address; on ``tcp`` it answers exception 11, like a Modbus TCP gateway.
    """

    def __init__(
        self,
        stations: Sequence[LineStation],
        *,
        transport: SimTransport = "rtu",
        serial_port: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        baudrate: int = 19200,
        speed: float = 1.0,
        tick: float = 0.05,
    ) -> None:
        """Check the set-up; nothing starts before ``async with``."""
        check_pace(speed, tick)
        units = [s.unit_id for s in stations]
        if len(set(units)) != len(units):
            raise ValueError(f"unit ids on one line must be unique: {units}")
        if transport == "rtu" and serial_port is None:
            raise ValueError("transport rtu needs serial_port (a tty path)")
        self.stations = tuple(stations)
        self.transport: SimTransport = transport
        self.serial_port = serial_port
        self.host = host
        self.port = port
        self.baudrate = baudrate
        self.speed = speed
        self.tick = tick
        self._server: Server | None = None
        self._written: dict[int, list[int]] = {}
        self._updating = False
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()

    async def __aenter__(self) -> Self:
        """Start the server and the tick task."""

        devices = []
        for station in self.stations:
            registers = station.model.registers()
            self._written[station.unit_id] = registers
            block = SimData(address=0, count=1, values=list(registers), datatype=DataType.REGISTERS)
            # Same device as on SimulatedFloor: holding registers only, read-only.
            action = read_only_holding(self._is_updating)
            devices.append(SimDevice(id=station.unit_id, simdata=[block], action=action))
        catch_all = SimData(address=0, count=1, values=[0], datatype=DataType.REGISTERS)
        devices.append(SimDevice(id=0, simdata=[catch_all], action=absent_device))
        silent = None if self.transport == "tcp" else frozenset(self._written)
        self._server, self.port = await start_server(
            devices,
            transport=self.transport,
            host=self.host,
            port=self.port,
            serial_port=self.serial_port,
            baudrate=self.baudrate,
            silent_units=silent,
        )
        log.info(
            "line serving",
            transport=self.transport,
            where=self.serial_port if self.transport == "rtu" else f"{self.host}:{self.port}",
            units=sorted(self._written),
        )
        offsets = {s.unit_id: s.model.time for s in self.stations}
        started = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(started, offsets), name="simulated-line-tick")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the tick task, then the server."""
        task, self._task = self._task, None
        try:
            await stop_task(task)
        finally:
            server, self._server = self._server, None
            if server is not None:
                await _shutdown(server)

    async def wait_finished(self, timeout: float) -> None:  # noqa: ASYNC109 (as SimulatedFloor)
        """Return once every scripted station has run its script and its registers show it."""
        if self._task is None:
            raise RuntimeError("the line is not running; use it with 'async with'")
        await wait_finished(
            self._finished,
            self._task,
            timeout,
            name="simulated-line-wait",
            stopped="the simulated line stopped before the scenarios finished",
        )

    def _is_updating(self) -> bool:
        return self._updating

    async def _run(self, started: float, offsets: dict[int, float]) -> None:
        async def step(elapsed: float) -> None:
            for station in self.stations:
                station.model.advance(offsets[station.unit_id] + elapsed)
                await self._write(station)
            if all(s.model.finished for s in self.stations if s.model.scripted):
                self._finished.set()

        await run_ticks(started, tick=self.tick, speed=self.speed, step=step)

    async def _write(self, station: LineStation) -> None:
        registers = station.model.registers()
        span = changed_span(self._written[station.unit_id], registers)
        self._written[station.unit_id] = registers
        if span is None or self._server is None:
            return
        self._updating = True
        try:
            await self._server.async_setValues(station.unit_id, _WRITE_MULTIPLE_REGISTERS, *span)
        finally:
            self._updating = False
