"""Modbus TCP adapter (the imperative shell): connect, poll the read plan, yield samples.

Every pymodbus call of the gateway's client side lives in this module. pymodbus' own
reconnects and retries are kept out of the way: the gateway's supervisor reconnects with
backoff, so a lost link surfaces at once as :class:`~adapters.base.ConnectionLost`.

Quality mapping, per cycle and per signal:

- value decoded: ``Quality.GOOD``;
- Modbus exception response for the signal's own request, or a :class:`DecodeError`:
  ``Quality.BAD`` with ``value=None`` (the other signals stay good);
- timeout, closed socket or garbled framing: the whole cycle fails with ``ConnectionLost``.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Self

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from adapters.base import ConnectError, ConnectionLost, DecodeError
from adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig, RegisterArea
from adapters.modbus.decode import decode
from adapters.modbus.plan import ReadRequest, next_deadline, plan_reads, split
from gateway.model import Quality, Sample, Value

log = structlog.get_logger(__name__)

#: Exception codes after which a block bridging several signals is split into one
#: request per signal, for good: the device refuses part of the range (illegal address,
#: illegal value when the count crosses a hole, and device failure, which some devices
#: answer for unimplemented registers). Busy, acknowledge and gateway codes are transient,
#: so they only mark the block's signals bad for the cycle.
SPLIT_CODES = frozenset({2, 3, 4})

#: Names of the exception codes (MODBUS Application Protocol v1.1b3, section 7).
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

# pymodbus reconnects on its own after a drop unless told otherwise. reconnect_delay=0 is
# avoided on purpose (a busy loop in some pymodbus releases); an hour means its reconnect
# task never fires before __aexit__ closes the client, which cancels the task.
_PYMODBUS_RECONNECT_DELAY = 3600.0

_Reader = Callable[..., Awaitable[ModbusPDU]]


def describe_exception(code: int) -> str:
    """``2 (illegal data address)``: an exception code with its name, for logs and samples."""
    return f"{code} ({EXCEPTION_NAMES.get(code, 'unknown exception')})"


def _describe(request: ReadRequest) -> str:
    """``holding 100..109``: the register range of a request, for messages."""
    return f"{request.area} {request.start}..{request.start + request.count - 1}"


class ModbusAdapter:
    """Polls one Modbus TCP device at a fixed rate and yields a batch of samples per cycle."""

    def __init__(
        self,
        machine: str,
        connection: ModbusConnectionConfig,
        signals: Mapping[str, ModbusSignalConfig],
        poll_interval: float,
        *,
        start_offset: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Compile the read plan; raise ``ValueError`` for an unusable interval or plan."""
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ValueError(f"poll_interval must be a positive number, got {poll_interval}")
        if not (math.isfinite(start_offset) and start_offset >= 0):
            raise ValueError(f"start_offset must be 0 or more, got {start_offset}")
        self._machine = machine
        self._connection = connection
        self._signals = dict(signals)
        self._interval = poll_interval
        self._start_offset = start_offset
        self._clock = clock
        self._where = f"{connection.host}:{connection.port}"
        self._plan = plan_reads(
            self._signals,
            max_registers=connection.max_registers_per_read,
            max_gap=connection.max_gap,
        )
        self._client: AsyncModbusTcpClient | None = None
        # Resolved by pymodbus' disconnect callback, so a read in flight ends at once
        # instead of waiting out its timeout.
        self._lost: asyncio.Future[None] | None = None
        # Signals currently bad, with the reason first seen: one warning per episode.
        self._bad: dict[str, str] = {}
        self._log = log.bind(machine=machine, device=self._where, unit_id=connection.unit_id)

    @property
    def machine(self) -> str:
        """The machine this adapter reads."""
        return self._machine

    @property
    def plan(self) -> tuple[ReadRequest, ...]:
        """The current read plan (blocks the device refused are split already)."""
        return self._plan

    async def __aenter__(self) -> Self:
        """Connect within ``timeout``; raise :class:`ConnectError` naming host, port, cause."""
        conn = self._connection
        self._lost = asyncio.get_running_loop().create_future()
        client = AsyncModbusTcpClient(
            conn.host,
            port=conn.port,
            name=f"modbus[{self._machine}]",
            # A backstop only: every call below runs under asyncio.timeout(conn.timeout),
            # which fires first and gives the clearer message.
            timeout=conn.timeout * 2,
            retries=0,
            reconnect_delay=_PYMODBUS_RECONNECT_DELAY,
            reconnect_delay_max=_PYMODBUS_RECONNECT_DELAY,
            trace_connect=self._on_connection_change,
        )
        self._client = client
        try:
            async with asyncio.timeout(conn.timeout):
                # Resolve first: pymodbus reports every failure as a bare False, and a
                # mistyped host name deserves its own message.
                await asyncio.get_running_loop().getaddrinfo(
                    conn.host, conn.port, type=socket.SOCK_STREAM
                )
                connected = await client.connect()
        except socket.gaierror as exc:
            self._close()
            raise ConnectError(
                f"cannot connect to {self._where}: cannot resolve host ({exc.strerror})"
            ) from exc
        except TimeoutError:
            self._close()
            raise ConnectError(
                f"cannot connect to {self._where}: no answer within {conn.timeout} s"
            ) from None
        except (OSError, ModbusException) as exc:
            self._close()
            raise ConnectError(f"cannot connect to {self._where}: {exc}") from exc
        except BaseException:
            self._close()
            raise
        if not connected:
            self._close()
            # pymodbus swallows the OSError and only reports False.
            raise ConnectError(
                f"cannot connect to {self._where}: connection refused or host unreachable"
            )
        self._log.debug("modbus.connected")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection, whatever happened."""
        self._close()
        self._log.debug("modbus.closed")

    def _close(self) -> None:
        """Drop the client; closing also cancels any pymodbus reconnect task."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._lost = None

    def _on_connection_change(self, connected: bool) -> None:
        """pymodbus callback: remember a drop so the read in flight fails fast."""
        if not connected and self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def samples(self) -> AsyncIterator[list[Sample]]:
        """Yield one batch per poll cycle until cancelled; raise :class:`ConnectionLost`."""
        if self._client is None:
            raise RuntimeError("ModbusAdapter.samples() needs 'async with adapter:' first")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_offset
        while True:
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            batch = await self._poll()
            yield batch
            # The consumer's time counts too: reads never overlap, missed ticks are skipped.
            deadline, skipped = next_deadline(deadline, loop.time(), self._interval)
            if skipped:
                self._log.debug("modbus.ticks_skipped", skipped=skipped)

    async def _poll(self) -> list[Sample]:
        """Run the plan once and turn the responses into one sample per signal."""
        values: dict[str, Value] = {}
        problems: dict[str, str] = {}
        plan = list(self._plan)
        index = sent = 0
        while index < len(plan):
            if sent and self._connection.request_delay:
                await asyncio.sleep(self._connection.request_delay)
            request = plan[index]
            result = await self._read(request)
            sent += 1
            if isinstance(result, int):
                if len(request.points) > 1 and result in SPLIT_CODES:
                    parts = split(request)
                    plan[index : index + 1] = parts
                    self._plan = tuple(plan)
                    self._log.info(
                        "modbus.block_split",
                        block=_describe(request),
                        exception=describe_exception(result),
                        requests=len(parts),
                    )
                    continue  # retry the same registers, one signal per request
                reason = f"device exception {describe_exception(result)} for {_describe(request)}"
                for point in request.points:
                    problems[point.signal] = reason
            elif len(result) != request.count:
                reason = f"device answered {len(result)} registers for {_describe(request)}"
                for point in request.points:
                    problems[point.signal] = reason
            else:
                for point in request.points:
                    registers = result[point.offset : point.offset + point.width]
                    try:
                        values[point.signal] = decode(registers, self._signals[point.signal])
                    except DecodeError as exc:
                        problems[point.signal] = str(exc)
            index += 1
        source_time = self._clock()
        self._track_problems(problems)
        return [
            Sample(self._machine, name, None, source_time, Quality.BAD)
            if name in problems
            else Sample(self._machine, name, values[name], source_time, Quality.GOOD)
            for name in self._signals
        ]

    async def _read(self, request: ReadRequest) -> list[int] | int:
        """Registers of one request, or the device's exception code.

        Raises :class:`ConnectionLost` on timeout, a closed socket or a broken reply.
        """
        client, lost = self._client, self._lost
        if client is None or lost is None:
            raise RuntimeError("ModbusAdapter is not connected: use 'async with adapter:'")
        if lost.done() or not client.connected:
            raise ConnectionLost(f"connection to {self._where} is closed")
        readers: dict[RegisterArea, _Reader] = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
        }
        read = asyncio.ensure_future(
            readers[request.area](
                request.start, count=request.count, device_id=self._connection.unit_id
            )
        )
        timeout = self._connection.timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait((read, lost), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise ConnectionLost(
                f"no response from {self._where} within {timeout} s reading {_describe(request)}"
            ) from None
        finally:
            if not read.done():
                read.cancel()
                # Let the cancellation land so pymodbus releases its request lock.
                await asyncio.wait((read,))
        if read.cancelled():
            raise ConnectionLost(
                f"connection to {self._where} closed by the device "
                f"while reading {_describe(request)}"
            )
        try:
            response = read.result()
        except (ModbusException, OSError) as exc:
            raise ConnectionLost(
                f"reading {_describe(request)} from {self._where} failed: {exc}"
            ) from exc
        if response.isError():
            return int(response.exception_code)
        return list(response.registers)

    def _track_problems(self, problems: Mapping[str, str]) -> None:
        """Warn once when a signal turns bad, note at info when it is good again."""
        for name, reason in problems.items():
            if name not in self._bad:
                self._log.warning("modbus.signal_bad", signal=name, reason=reason)
            elif self._bad[name] != reason:
                self._log.debug("modbus.signal_bad", signal=name, reason=reason)
        for name in self._bad.keys() - problems.keys():
            self._log.info("modbus.signal_recovered", signal=name)
        self._bad = dict(problems)


def create(
    machine: str,
    connection: ModbusConnectionConfig,
    signals: Mapping[str, ModbusSignalConfig],
    poll_interval: float,
    start_offset: float = 0.0,
) -> ModbusAdapter:
    """Factory for the protocol registry."""
    return ModbusAdapter(machine, connection, signals, poll_interval, start_offset=start_offset)
