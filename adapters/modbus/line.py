"""Shared Modbus lines: one connection per endpoint, shared by every unit id behind it.

A *line* is one TCP connection (Modbus TCP or RTU framed over TCP) or one serial port (RTU).
Several machines behind one serial-to-Ethernet converter or on one RS-485 bus are several
adapters with the same endpoint: they share one :class:`Line` from their owner's
:class:`LinePool` (:meth:`~LinePool.acquire` / :meth:`~LinePool.release`, reference counted),
whose slots serialise their requests as RS-485 requires. Different lines never wait for each
other. The pool is an object its owner creates and closes (the runtime's adapter factory,
a probe, a test), like Home Assistant's ``ModbusHub``: there is no module-level state.

The two TCP transports (Modbus TCP and RTU framed over TCP) use the gateway's own lean client
(:mod:`adapters.modbus.tcpclient`, frames from :mod:`adapters.modbus.wire`); serial RTU uses
pymodbus' serial client, and every pymodbus client call of the gateway lives here. A response
is only accepted when it belongs to the request on the wire:

- Modbus TCP: the transaction id must match a pending request; a response that matches none
  (a late answer to a request that already timed out) is dropped, and the connection stays.
- RTU has no transaction id: one request at a time per connection, and after a timeout on an
  RTU line (serial or over TCP) the connection is reopened before the next request, so a late
  answer still in flight is discarded with the old connection instead of being read as the
  answer to the next one.
- Both: the unit id, function code and item count of the response must match the request;
  otherwise the connection is reopened and the request sent once more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, RegisterArea
from shopfloor_gateway.adapters.modbus.tcpclient import NoResponse as NoResponse
from shopfloor_gateway.adapters.modbus.tcpclient import TcpClient, describe_read
from shopfloor_gateway.adapters.modbus.wire import FUNCTION_CODES as FUNCTION_CODES
from shopfloor_gateway.adapters.modbus.wire import ExceptionResponse as ExceptionResponse
from shopfloor_gateway.adapters.modbus.wire import MismatchError
from shopfloor_gateway.adapters.modbus.wire import ReadResult as ReadResult

log = structlog.get_logger(__name__)

# pymodbus reconnects on its own after a drop unless told otherwise. reconnect_delay=0 is
# avoided on purpose (a busy loop in some pymodbus releases); an hour means its reconnect
# task never fires before the line closes the client, which cancels the task.
_PYMODBUS_RECONNECT_DELAY = 3600.0

_Reader = Callable[..., Awaitable[ModbusPDU]]


class _SerialConn:
    """One pymodbus serial client plus a future that resolves when its port drops."""

    def __init__(
        self, client: AsyncModbusSerialClient, lost: asyncio.Future[None], where: str
    ) -> None:
        self.client = client
        self.lost = lost
        self.where = where
        # Set after a timeout: reopen before the next request (see module docstring).
        self.dirty = False

    @property
    def usable(self) -> bool:
        """True while connected and not marked for reopening."""
        return self.client.connected and not self.lost.done() and not self.dirty

    def close(self) -> None:
        """Close the port; closing also cancels any pymodbus reconnect task."""
        self.client.close()

    async def read(
        self, unit_id: int, area: RegisterArea, start: int, count: int, reply_within: float
    ) -> ReadResult:
        """One request and its response on this port (see :meth:`TcpClient.read`)."""
        client = self.client
        readers: dict[RegisterArea, _Reader] = {
            "coil": client.read_coils,
            "discrete_input": client.read_discrete_inputs,
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
        }
        where = self.where
        what = describe_read(unit_id, area, start, count)
        read = asyncio.ensure_future(readers[area](start, count=count, device_id=unit_id))
        try:
            async with asyncio.timeout(reply_within):
                await asyncio.wait((read, self.lost), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self.dirty = True
            raise NoResponse(
                f"no response from {where} within {reply_within} s reading {what}"
            ) from None
        finally:
            if not read.done():
                read.cancel()
                # Let the cancellation land so pymodbus releases its request lock.
                await asyncio.wait((read,))
        if read.cancelled():
            raise ConnectionLost(f"connection to {where} closed by the device while reading {what}")
        try:
            response = read.result()
        except ModbusException as exc:
            if "transaction id" in str(exc) or "device id" in str(exc):
                raise MismatchError(str(exc)) from exc
            raise ConnectionLost(f"reading {what} from {where} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectionLost(f"reading {what} from {where} failed: {exc}") from exc
        return _check(response, unit_id, area, count)


_Conn = TcpClient | _SerialConn


class _SlotPool:
    """The connection slots of a line, handed out first come, first served.

    A unit that re-enters at once after a failure queues behind the units already waiting,
    so it cannot starve them. Cheaper than ``asyncio.Semaphore`` plus a free list on the
    per-poll path: a free slot with nobody waiting is taken without a future.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        """``size`` slots, numbered 0..size-1, all free."""
        self._free = list(range(size))
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    async def take(self) -> int:
        """A free slot's number, waiting in line for one if needed."""
        if self._free and not self._waiters:
            return self._free.pop()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Handed a slot just as the wait was cancelled: pass it on.
                self.give(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def give(self, index: int) -> None:
        """Return slot ``index``: to the longest waiter, or to the free list."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(index)
                return
        self._free.append(index)


class Line:
    """One endpoint's connection(s) and the lock that serialises the units behind it."""

    def __init__(self, connection: ModbusConnectionConfig) -> None:
        """Remember the settings; nothing connects before :meth:`ensure_open`."""
        self.endpoint = connection.endpoint
        self.connection = connection
        self.refs = 0
        slots = connection.max_concurrent_requests
        self._conns: list[_Conn | None] = [None] * slots
        self._slots = _SlotPool(slots)
        self._connect_lock = asyncio.Lock()
        # Set by close(): an adapter still reading must not open a connection again.
        self._closed = False
        self._frame_gap = connection.serial.frame_gap() if connection.serial else 0.0
        self._last_io = 0.0

    @functools.cached_property
    def _log(self) -> Any:
        # Bound on first use: a line to a dead device is built and dropped on every
        # reconnect attempt and mostly never logs.
        return log.bind(endpoint=self.endpoint)

    @property
    def where(self) -> str:
        """``10.0.0.5:502`` or ``/dev/ttyUSB0``: the endpoint for messages."""
        return self.endpoint.split("://", 1)[1]

    @property
    def connected(self) -> bool:
        """True while at least one connection of the line is up."""
        return any(c is not None and c.usable for c in self._conns)

    async def ensure_open(self) -> None:
        """Open the first connection if none is up; raise :class:`ConnectError` on failure."""
        if self.connected:
            return
        # One slot of the line, fairly (in arrival order) like every read.
        slots = self._slots
        index = await slots.take()
        try:
            await self._open(index)
        finally:
            slots.give(index)

    async def _open(self, index: int) -> _Conn:
        """Connect slot ``index`` (closing what was there) within the timeout."""
        async with self._connect_lock:
            if self._closed:
                raise ConnectError(f"the line to {self.where} is closed")
            old = self._conns[index]
            if old is not None and old.usable:
                return old
            self._close_slot(index)
            conn = self.connection
            if conn.transport == "rtu":
                fresh: _Conn = await self._open_serial()
            else:
                assert conn.host is not None
                fresh = await TcpClient.connect(
                    conn.host,
                    conn.port,
                    framing="mbap" if conn.transport == "tcp" else "rtu",
                    connect_within=conn.timeout,
                    where=self.where,
                )
            self._conns[index] = fresh
            self._log.debug("modbus.line_open", slot=index)
            return fresh

    async def _open_serial(self) -> _SerialConn:
        """Open the serial port with pymodbus within the timeout."""
        conn = self.connection
        serial = conn.serial
        assert serial is not None
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()

        def on_change(connected: bool) -> None:
            if not connected and not lost.done():
                lost.set_result(None)

        client = AsyncModbusSerialClient(
            serial.port,
            framer=FramerType.RTU,
            baudrate=serial.baudrate,
            bytesize=serial.bytesize,
            parity=serial.parity,
            stopbits=serial.stopbits,
            name=f"modbus[{self.endpoint}]",
            # A backstop only: every call runs under asyncio.timeout(conn.timeout).
            timeout=conn.timeout * 2,
            retries=0,
            reconnect_delay=_PYMODBUS_RECONNECT_DELAY,
            reconnect_delay_max=_PYMODBUS_RECONNECT_DELAY,
            trace_connect=on_change,
        )
        try:
            # A stat of a device node: cheap, and worth the clearer message.
            if not os.path.exists(serial.port):  # noqa: ASYNC240
                raise ConnectError(
                    f"cannot open serial port {serial.port}: no such device "
                    "(check the cable / USB adapter and the port name)"
                )
            async with asyncio.timeout(conn.timeout):
                connected = await client.connect()
        except TimeoutError:
            client.close()
            raise ConnectError(
                f"cannot connect to {self.where}: no answer within {conn.timeout} s"
            ) from None
        except (OSError, ModbusException) as exc:
            client.close()
            raise ConnectError(f"cannot connect to {self.where}: {exc}") from exc
        except BaseException:
            client.close()
            raise
        if not connected:
            client.close()
            raise ConnectError(f"cannot open serial port {self.where}: permission denied or in use")
        return _SerialConn(client, lost, self.where)

    def _close_slot(self, index: int) -> None:
        """Close one connection."""
        old, self._conns[index] = self._conns[index], None
        if old is not None:
            old.close()

    def close(self) -> None:
        """Close every connection of the line, for good."""
        self._closed = True
        for index in range(len(self._conns)):
            self._close_slot(index)
        self._log.debug("modbus.line_closed")

    async def read(
        self, unit_id: int, area: RegisterArea, start: int, count: int, *, reply_within: float
    ) -> ReadResult:
        """Read ``count`` items of ``area`` from ``unit_id``: values or the device's exception.

        Holds one connection of the line for the whole exchange. Raises :class:`NoResponse`
        when the unit stays silent for ``reply_within`` seconds and :class:`ConnectionLost` when
        the line drops; a response to another request reconnects and retries once.
        """
        # Held for the whole exchange; the pool serves waiting units in arrival order.
        slots = self._slots
        index = await slots.take()
        try:
            conn = self._conns[index]
            if conn is not None and conn.usable and not self._frame_gap:
                try:
                    return await conn.read(unit_id, area, start, count, reply_within)
                except MismatchError as exc:
                    self._mismatch(conn, unit_id, exc, 1)
                    return await self._attempts(index, unit_id, area, start, count, reply_within, 2)
            return await self._attempts(index, unit_id, area, start, count, reply_within, 1)
        finally:
            slots.give(index)
            if self._frame_gap:
                self._last_io = asyncio.get_running_loop().time()

    def _mismatch(self, conn: _Conn, unit_id: int, exc: MismatchError, attempt: int) -> None:
        """Log a response to another request and mark its connection for reopening."""
        self._log.warning(
            "modbus.response_mismatch", unit_id=unit_id, reason=str(exc), attempt=attempt
        )
        conn.dirty = True

    async def _attempts(
        self,
        index: int,
        unit_id: int,
        area: RegisterArea,
        start: int,
        count: int,
        reply_within: float,
        first: int,
    ) -> ReadResult:
        """The exchange, once more on a fresh connection after a response to another request."""
        for attempt in range(first, 3):
            conn = self._conns[index]
            if conn is None or not conn.usable:
                if conn is not None and not conn.dirty:
                    # Dropped under us: fail this unit now; the next read reconnects.
                    self._close_slot(index)
                    raise ConnectionLost(f"connection to {self.where} is closed")
                try:
                    conn = await self._open(index)
                except ConnectError as exc:
                    raise ConnectionLost(str(exc)) from exc
            await self._quiet()
            try:
                return await conn.read(unit_id, area, start, count, reply_within)
            except MismatchError as exc:
                self._mismatch(conn, unit_id, exc, attempt)
        raise ConnectionLost(f"{self.where}: responses keep not matching the requests")

    async def _quiet(self) -> None:
        """Keep the RTU inter-frame silence since the last exchange on this line."""
        if self._frame_gap:
            wait = self._last_io + self._frame_gap - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)


def _check(response: ModbusPDU, unit_id: int, area: RegisterArea, count: int) -> ReadResult:
    """The values of a pymodbus response, after checking it answers this request."""
    function = FUNCTION_CODES[area]
    if unit_id and response.dev_id != unit_id:
        raise MismatchError(f"response from unit {response.dev_id}, asked unit {unit_id}")
    if response.function_code & 0x7F != function:
        raise MismatchError(
            f"response to function {response.function_code & 0x7F}, sent {function}"
        )
    if response.isError():
        return ExceptionResponse(int(response.exception_code))
    if area in ("coil", "discrete_input"):
        bits = list(response.bits)
        # Bits come in whole bytes, padded with zeros (6.1): anything else is another answer.
        if not count <= len(bits) < count + 8:
            raise MismatchError(f"response has {len(bits)} bits, asked {count}")
        return [bool(b) for b in bits[:count]]
    registers = list(response.registers)
    if len(registers) != count:
        raise MismatchError(f"response has {len(registers)} registers, asked {count}")
    return registers


# ---------------------------------------------------------------------------------- pool


class LinePool:
    """The Modbus lines of one owner: one :class:`Line` per endpoint, shared by reference.

    The owner (the runtime's adapter factory, a probe, a test) creates the pool and calls
    :meth:`close` when it is done; each machine's adapter takes its endpoint's line with
    :meth:`acquire` and gives it back with :meth:`release`, and the last one out closes it.
    A line's connections belong to the event loop they were made on: the pool serves one
    loop at a time and may move to another only while no line is open.
    """

    def __init__(self) -> None:
        """An empty pool; lines open on the first :meth:`acquire` of their endpoint."""
        self._lines: dict[str, Line] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def acquire(self, connection: ModbusConnectionConfig) -> Line:
        """The shared line of this endpoint, connected; raise :class:`ConnectError` if it cannot.

        Every successful call must be paired with :meth:`release`.
        """
        if self._closed:
            raise RuntimeError("this Modbus line pool is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._lines:
                raise RuntimeError("a Modbus line pool serves one event loop at a time")
            self._loop = loop
        endpoint = connection.endpoint
        line = self._lines.get(endpoint)
        if line is None:
            line = self._lines[endpoint] = Line(connection)
        elif _line_settings(line.connection) != _line_settings(connection):
            line._log.warning(
                "modbus.line_settings_differ",
                hint="machines on one endpoint share its first settings; make them equal",
            )
        line.refs += 1
        try:
            await line.ensure_open()
        except BaseException:
            self.release(line)
            raise
        return line

    def release(self, line: Line) -> None:
        """Drop one reference; the last one closes the line."""
        line.refs -= 1
        if line.refs <= 0:
            if self._lines.get(line.endpoint) is line:
                del self._lines[line.endpoint]
            line.close()

    def open_lines(self) -> dict[str, int]:
        """Endpoint -> references of the lines open now (for tests and probes)."""
        return {endpoint: line.refs for endpoint, line in self._lines.items()}

    def close(self) -> None:
        """Close every line still open and refuse new ones; adapters still in may release."""
        self._closed = True
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            line.close()


def _line_settings(connection: ModbusConnectionConfig) -> tuple[object, ...]:
    """The settings that belong to the line, not to one unit on it."""
    return (connection.serial, connection.max_concurrent_requests)
