"""A lean Modbus client for TCP connections: Modbus TCP (MBAP) and RTU frames over TCP.

One :class:`TcpClient` is one TCP connection, an :class:`asyncio.Protocol`. A read writes one
frame (built by :mod:`adapters.modbus.wire`), parks one future in a dict keyed by transaction
id and awaits it under one ``asyncio.timeout``; ``data_received`` splits the stream into
frames and resolves the future whose id a frame carries. That is the whole per-request cost:
no transaction manager, no extra task, no second wait.

A response is only accepted when it belongs to the request:

- MBAP: a frame whose transaction id matches no pending request (typically a late answer to a
  request that timed out) is dropped and logged at debug, and the connection stays up. Ids
  count up and wrap at 16 bits, so a late answer would have to be 65,536 requests late to be
  confused with a current one.
- RTU over TCP has no transaction id: one request at a time, and after a timeout the client
  marks itself :attr:`~TcpClient.dirty`, so its owner opens a fresh connection before the next
  request and a late answer still in flight dies with the old one.
- In both, the answering unit, function code and item count must match the request, otherwise
  :class:`~adapters.modbus.wire.MismatchError` is raised for the owner to handle.

Garbled framing (bad protocol id or length, CRC mismatch, inconsistent byte count) fails every
pending request with :class:`ConnectionLost` and drops the connection: nothing read after it
could be trusted. So does the device closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Literal, cast

import structlog

from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.modbus.config import RegisterArea
from shopfloor_gateway.adapters.modbus.wire import (
    FUNCTION_CODES,
    MBAP_READ,
    FrameError,
    MbapReader,
    ReadResult,
    Response,
    RtuReader,
    decode_response,
    mbap_request,
    rtu_request,
)

log = structlog.get_logger(__name__)

Framing = Literal["mbap", "rtu"]

#: The key of the one pending request on an RTU connection (MBAP keys are 0..65535).
_RTU_KEY = -1


class NoResponse(ConnectionLost):
    """The unit did not answer within the timeout (the line itself may be fine)."""


class _Broken(Exception):
    """Set on pending futures when the connection fails; turned into ConnectionLost."""


class _Expired(Exception):
    """Set on a request's future when its reply time ran out; turned into NoResponse."""


def _expire(future: asyncio.Future[Response]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def describe_read(unit_id: int, area: RegisterArea, start: int, count: int) -> str:
    """``holding 0..9 of unit 1``: a read for messages."""
    return f"{area} {start}..{start + count - 1} of unit {unit_id}"


def _refusal(exc: OSError) -> str:
    """Why a connect failed, in words: ``connection refused``, ``no route to host``."""
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        return "connection refused"
    if exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


class TcpClient(asyncio.Protocol):
    """One Modbus TCP or RTU-over-TCP connection: reads out, responses matched back."""

    def __init__(self, where: str, framing: Framing) -> None:
        """A client not yet connected; use :meth:`connect`."""
        self.where = where
        self._rtu = framing == "rtu"
        self._reader: MbapReader | RtuReader = RtuReader() if self._rtu else MbapReader()
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._transaction = 0
        #: (unit, function, start, count) of reads whose request was validated once.
        self._checked: set[tuple[int, int, int, int]] = set()
        self._transport: asyncio.Transport | None = None
        # Why the connection is unusable: None while it is fine.
        self._broken: str | None = None
        self._garbled = False
        #: Set after a timeout on RTU: reopen before the next request (module docstring).
        self.dirty = False

    @classmethod
    async def connect(
        cls, host: str, port: int, *, framing: Framing, connect_within: float, where: str = ""
    ) -> TcpClient:
        """Open a connection within ``connect_within`` s; raise :class:`ConnectError` if not."""
        where = where or f"{host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_within):
                _, client = await loop.create_connection(lambda: cls(where, framing), host, port)
        except socket.gaierror as exc:
            raise ConnectError(
                f"cannot connect to {where}: cannot resolve host ({exc.strerror})"
            ) from exc
        except UnicodeError as exc:
            # The IDNA codec refuses a name with an empty or over-long label before any lookup.
            raise ConnectError(
                f"cannot connect to {where}: cannot resolve host (invalid host name: {exc})"
            ) from exc
        except TimeoutError:
            raise ConnectError(
                f"cannot connect to {where}: no answer within {connect_within} s"
            ) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {where}: {_refusal(exc)}") from exc
        return client

    @property
    def usable(self) -> bool:
        """True while connected and not marked for reopening."""
        return self._transport is not None and self._broken is None and not self.dirty

    @property
    def pending(self) -> int:
        """Requests waiting for their response."""
        return len(self._pending)

    # ------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; small frames go out at once (no Nagle delay)."""
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        """Split the stream into frames and hand each to the request it answers."""
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            self._fail(f"garbled response ({exc})", garbled=True)
            return
        pending = self._pending
        for frame in frames:
            future = pending.pop(frame.transaction, None)
            if future is None or future.done():
                # A late answer to a request that timed out, or one nobody asked for.
                log.debug(
                    "modbus.response_unmatched",
                    endpoint=self.where,
                    transaction=frame.transaction,
                    unit_id=frame.unit_id,
                    function=frame.function,
                )
                continue
            future.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every pending request: the device (or the network) closed the connection."""
        self._fail("closed by the device" if exc is None else f"closed ({exc})")

    # ------------------------------------------------------------------ requests

    async def read(
        self, unit_id: int, area: RegisterArea, start: int, count: int, reply_within: float
    ) -> ReadResult:
        """Read ``count`` items of ``area`` from ``unit_id``: values or the device's exception.

        Raises :class:`NoResponse` after ``reply_within`` seconds of silence,
        :class:`ConnectionLost` when the connection drops or the framing is garbled, and
        :class:`~adapters.modbus.wire.MismatchError` for a response to another request.
        """
        transport = self._transport
        if transport is None or self._broken is not None:
            raise ConnectionLost(f"connection to {self.where} is closed")
        function = FUNCTION_CODES[area]
        if self._rtu:
            key = _RTU_KEY
            frame = rtu_request(unit_id, function, start, count)
            if key in self._pending:
                raise RuntimeError("an RTU connection carries one request at a time")
        else:
            key = self._transaction = (self._transaction + 1) & 0xFFFF
            read = (unit_id, function, start, count)
            if read in self._checked:
                # Checked once by mbap_request already; a poll repeats the same reads.
                frame = MBAP_READ.pack(key, 0, 6, unit_id, function, start, count)
            else:
                frame = mbap_request(key, unit_id, function, start, count)
                if len(self._checked) < 1024:
                    self._checked.add(read)
        future: asyncio.Future[Response] = self._loop.create_future()
        pending = self._pending
        pending[key] = future
        transport.write(frame)
        # A timer that fails the future, not asyncio.timeout(): the same outcome without
        # cancelling and un-cancelling the task, at a third of the cost per request.
        timer = self._loop.call_later(reply_within, _expire, future)
        try:
            response = await future
        except _Expired:
            if self._rtu:
                self.dirty = True
            what = describe_read(unit_id, area, start, count)
            raise NoResponse(
                f"no response from {self.where} within {reply_within} s reading {what}"
            ) from None
        except _Broken:
            what = describe_read(unit_id, area, start, count)
            if self._garbled:
                raise ConnectionLost(
                    f"reading {what} from {self.where} failed: {self._broken}"
                ) from None
            raise ConnectionLost(
                f"connection to {self.where} {self._broken} while reading {what}"
            ) from None
        finally:
            timer.cancel()
            if pending.get(key) is future:
                del pending[key]
        try:
            return decode_response(response, unit_id, function, count)
        except FrameError as exc:
            self._fail(f"garbled response ({exc})", garbled=True)
            what = describe_read(unit_id, area, start, count)
            raise ConnectionLost(
                f"reading {what} from {self.where} failed: garbled response ({exc})"
            ) from exc

    # ------------------------------------------------------------------- closing

    def _fail(self, reason: str, *, garbled: bool = False) -> None:
        """Mark the connection broken, fail its pending requests, drop it."""
        # Abort, not close: after garbage, nothing more should be read or written.
        self._end(reason, garbled=garbled, abort=True)

    def close(self) -> None:
        """Close the connection; pending requests fail with :class:`ConnectionLost`."""
        self._end("closed by the gateway", garbled=False, abort=False)

    def _end(self, reason: str, *, garbled: bool, abort: bool) -> None:
        if self._broken is None:
            self._broken = reason
            self._garbled = garbled
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_Broken())
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()
