"""Shared Modbus lines: one connection per endpoint, shared by every unit id behind it.

A *line* is one TCP connection (Modbus TCP or RTU framed over TCP) or one serial port (RTU).
Several machines behind one serial-to-Ethernet converter or on one RS-485 bus are several
adapters with the same endpoint: they share one :class:`Line` from the module-level pool
(:func:`acquire` / :func:`release`, reference counted), whose lock serialises their requests
as RS-485 requires. Different lines never wait for each other.

Every pymodbus client call of the gateway lives here. A response is only accepted when it
belongs to the request on the wire:

- Modbus TCP: pymodbus compares the transaction id; a mismatch (a late answer to a request
  that already timed out) drops the connection, reconnects and sends the request again.
- RTU has no transaction id: the unit id, function code and item count of the response must
  match the request, otherwise the same happens. After a timeout on an RTU line the
  connection is reopened before the next request, so a late answer still in flight is
  discarded with the old connection instead of being read as the answer to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from adapters.base import ConnectError, ConnectionLost
from adapters.modbus.config import ModbusConnectionConfig, RegisterArea

log = structlog.get_logger(__name__)

#: Function codes of the four reads (MODBUS Application Protocol v1.1b3, 6.1 to 6.4).
FUNCTION_CODES: dict[RegisterArea, int] = {
    "coil": 1,
    "discrete_input": 2,
    "holding": 3,
    "input": 4,
}

# pymodbus reconnects on its own after a drop unless told otherwise. reconnect_delay=0 is
# avoided on purpose (a busy loop in some pymodbus releases); an hour means its reconnect
# task never fires before the line closes the client, which cancels the task.
_PYMODBUS_RECONNECT_DELAY = 3600.0

_Client = AsyncModbusTcpClient | AsyncModbusSerialClient
_Reader = Callable[..., Awaitable[ModbusPDU]]


class NoResponse(ConnectionLost):
    """The unit did not answer within the timeout (the line itself may be fine)."""


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """The device answered a Modbus exception (its code, 1..255)."""

    code: int


#: A read's outcome: registers, bits, or the device's exception.
ReadResult = list[int] | list[bool] | ExceptionResponse


class _Mismatch(Exception):
    """A response that does not belong to the request on the wire."""


class _Conn:
    """One pymodbus client plus a future that resolves when its transport drops."""

    def __init__(self, client: _Client, lost: asyncio.Future[None]) -> None:
        self.client = client
        self.lost = lost
        # Set after a timeout on RTU: reopen before the next request (see module docstring).
        self.dirty = False

    @property
    def usable(self) -> bool:
        """True while connected and not marked for reopening."""
        return self.client.connected and not self.lost.done() and not self.dirty


class Line:
    """One endpoint's connection(s) and the lock that serialises the units behind it."""

    def __init__(self, connection: ModbusConnectionConfig) -> None:
        """Remember the settings; nothing connects before :meth:`ensure_open`."""
        self.endpoint = connection.endpoint
        self.connection = connection
        self.refs = 0
        slots = connection.max_concurrent_requests
        self._conns: list[_Conn | None] = [None] * slots
        # A semaphore, not a queue: its waiters are served first come, first served, so a
        # unit that re-enters at once after a failure cannot starve the others of the line.
        self._slots = asyncio.Semaphore(slots)
        self._free = list(range(slots))
        self._connect_lock = asyncio.Lock()
        self._frame_gap = connection.serial.frame_gap() if connection.serial else 0.0
        self._last_io = 0.0
        self._log = log.bind(endpoint=self.endpoint)

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
        async with self._slot() as index:
            await self._open(index)

    async def _open(self, index: int) -> _Conn:
        """Connect slot ``index`` (closing what was there) within the timeout."""
        async with self._connect_lock:
            old = self._conns[index]
            if old is not None and old.usable:
                return old
            self._close_slot(index)
            conn = self.connection
            loop = asyncio.get_running_loop()
            lost: asyncio.Future[None] = loop.create_future()

            def on_change(connected: bool) -> None:
                if not connected and not lost.done():
                    lost.set_result(None)

            client = self._client(on_change)
            try:
                async with asyncio.timeout(conn.timeout):
                    if conn.transport == "rtu":
                        assert conn.serial is not None
                        # A stat of a device node: cheap, and worth the clearer message.
                        if not os.path.exists(conn.serial.port):  # noqa: ASYNC240
                            raise ConnectError(
                                f"cannot open serial port {conn.serial.port}: no such device "
                                "(check the cable / USB adapter and the port name)"
                            )
                    else:
                        # Resolve first: pymodbus reports every failure as a bare False, and
                        # a mistyped host name deserves its own message.
                        await loop.getaddrinfo(conn.host, conn.port, type=socket.SOCK_STREAM)
                    connected = await client.connect()
            except socket.gaierror as exc:
                client.close()
                raise ConnectError(
                    f"cannot connect to {self.where}: cannot resolve host ({exc.strerror})"
                ) from exc
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
                if conn.transport == "rtu":
                    raise ConnectError(
                        f"cannot open serial port {self.where}: permission denied or in use"
                    )
                # pymodbus swallows the OSError and only reports False.
                raise ConnectError(
                    f"cannot connect to {self.where}: connection refused or host unreachable"
                )
            fresh = _Conn(client, lost)
            self._conns[index] = fresh
            self._log.debug("modbus.line_open", slot=index)
            return fresh

    def _client(self, on_change: Callable[[bool], None]) -> _Client:
        """A pymodbus client for this line with its own retries and reconnects switched off."""
        conn = self.connection
        common: dict[str, Any] = {
            "name": f"modbus[{self.endpoint}]",
            # A backstop only: every call runs under asyncio.timeout(conn.timeout).
            "timeout": conn.timeout * 2,
            "retries": 0,
            "reconnect_delay": _PYMODBUS_RECONNECT_DELAY,
            "reconnect_delay_max": _PYMODBUS_RECONNECT_DELAY,
            "trace_connect": on_change,
        }
        if conn.transport == "rtu":
            serial = conn.serial
            assert serial is not None
            return AsyncModbusSerialClient(
                serial.port,
                framer=FramerType.RTU,
                baudrate=serial.baudrate,
                bytesize=serial.bytesize,
                parity=serial.parity,
                stopbits=serial.stopbits,
                **common,
            )
        assert conn.host is not None
        framer = FramerType.SOCKET if conn.transport == "tcp" else FramerType.RTU
        return AsyncModbusTcpClient(conn.host, port=conn.port, framer=framer, **common)

    def _close_slot(self, index: int) -> None:
        """Close one connection; closing also cancels any pymodbus reconnect task."""
        old, self._conns[index] = self._conns[index], None
        if old is not None:
            old.client.close()

    def close(self) -> None:
        """Close every connection of the line."""
        for index in range(len(self._conns)):
            self._close_slot(index)
        self._log.debug("modbus.line_closed")

    async def read(
        self, unit_id: int, area: RegisterArea, start: int, count: int, *, reply_within: float
    ) -> ReadResult:
        """Read ``count`` items of ``area`` from ``unit_id``: values or the device's exception.

        Holds one connection of the line for the whole exchange. Raises :class:`NoResponse`
        when the unit stays silent for ``reply_within`` seconds and :class:`ConnectionLost` when the
        line drops; a late or foreign response reconnects and retries once.
        """
        async with self._slot() as index:
            try:
                return await self._attempts(index, unit_id, area, start, count, reply_within)
            finally:
                self._last_io = asyncio.get_running_loop().time()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[int]:
        """Hold one connection slot of the line (fairly, in arrival order)."""
        async with self._slots:
            index = self._free.pop()
            try:
                yield index
            finally:
                self._free.append(index)

    async def _attempts(
        self,
        index: int,
        unit_id: int,
        area: RegisterArea,
        start: int,
        count: int,
        reply_within: float,
    ) -> ReadResult:
        """The exchange, once more on a fresh connection after a foreign response."""
        for attempt in (1, 2):
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
                return await self._exchange(conn, unit_id, area, start, count, reply_within)
            except _Mismatch as exc:
                self._log.warning(
                    "modbus.response_mismatch",
                    unit_id=unit_id,
                    reason=str(exc),
                    attempt=attempt,
                )
                conn.dirty = True
        raise ConnectionLost(f"{self.where}: responses keep not matching the requests")

    async def _quiet(self) -> None:
        """Keep the RTU inter-frame silence since the last exchange on this line."""
        if self._frame_gap:
            wait = self._last_io + self._frame_gap - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _exchange(
        self,
        conn: _Conn,
        unit_id: int,
        area: RegisterArea,
        start: int,
        count: int,
        reply_within: float,
    ) -> ReadResult:
        """One request and its response on ``conn``."""
        client = conn.client
        readers: dict[RegisterArea, _Reader] = {
            "coil": client.read_coils,
            "discrete_input": client.read_discrete_inputs,
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
        }
        what = f"{area} {start}..{start + count - 1} of unit {unit_id}"
        timeout = reply_within
        read = asyncio.ensure_future(readers[area](start, count=count, device_id=unit_id))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait((read, conn.lost), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            if self.connection.transport != "tcp":
                conn.dirty = True
            raise NoResponse(
                f"no response from {self.where} within {timeout} s reading {what}"
            ) from None
        finally:
            if not read.done():
                read.cancel()
                # Let the cancellation land so pymodbus releases its request lock.
                await asyncio.wait((read,))
        if read.cancelled():
            raise ConnectionLost(
                f"connection to {self.where} closed by the device while reading {what}"
            )
        try:
            response = read.result()
        except ModbusException as exc:
            if "transaction id" in str(exc) or "device id" in str(exc):
                raise _Mismatch(str(exc)) from exc
            raise ConnectionLost(f"reading {what} from {self.where} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectionLost(f"reading {what} from {self.where} failed: {exc}") from exc
        return _check(response, unit_id, area, count)


def _check(response: ModbusPDU, unit_id: int, area: RegisterArea, count: int) -> ReadResult:
    """The response's values, after checking it answers this request."""
    function = FUNCTION_CODES[area]
    if unit_id and response.dev_id != unit_id:
        raise _Mismatch(f"response from unit {response.dev_id}, asked unit {unit_id}")
    if response.function_code & 0x7F != function:
        raise _Mismatch(f"response to function {response.function_code & 0x7F}, sent {function}")
    if response.isError():
        return ExceptionResponse(int(response.exception_code))
    if area in ("coil", "discrete_input"):
        bits = list(response.bits)
        # Bits come in whole bytes, padded with zeros (6.1): anything else is another answer.
        if not count <= len(bits) < count + 8:
            raise _Mismatch(f"response has {len(bits)} bits, asked {count}")
        return [bool(b) for b in bits[:count]]
    registers = list(response.registers)
    if len(registers) != count:
        raise _Mismatch(f"response has {len(registers)} registers, asked {count}")
    return registers


# ---------------------------------------------------------------------------------- pool

_LINES: dict[tuple[int, str], Line] = {}


def _key(connection: ModbusConnectionConfig) -> tuple[int, str]:
    # Keyed by event loop too: a client belongs to the loop it was created on.
    return id(asyncio.get_running_loop()), connection.endpoint


async def acquire(connection: ModbusConnectionConfig) -> Line:
    """The shared line of this endpoint, connected; raise :class:`ConnectError` if it cannot.

    Every successful call must be paired with :func:`release`.
    """
    key = _key(connection)
    line = _LINES.get(key)
    if line is None:
        line = _LINES[key] = Line(connection)
    elif _line_settings(line.connection) != _line_settings(connection):
        line._log.warning(
            "modbus.line_settings_differ",
            hint="machines on one endpoint share its first settings; make them equal",
        )
    line.refs += 1
    try:
        await line.ensure_open()
    except BaseException:
        release(line)
        raise
    return line


def release(line: Line) -> None:
    """Drop one reference; the last one closes the line."""
    line.refs -= 1
    if line.refs <= 0:
        with contextlib.suppress(KeyError):
            for key, value in list(_LINES.items()):
                if value is line:
                    del _LINES[key]
        line.close()


def _line_settings(connection: ModbusConnectionConfig) -> tuple[object, ...]:
    """The settings that belong to the line, not to one unit on it."""
    return (connection.serial, connection.max_concurrent_requests)


def open_lines() -> dict[str, int]:
    """Endpoint -> references of the lines open on the running loop (for tests and probes)."""
    loop_id = id(asyncio.get_running_loop())
    return {ep: line.refs for (lid, ep), line in _LINES.items() if lid == loop_id}
