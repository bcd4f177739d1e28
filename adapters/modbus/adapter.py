"""Modbus adapter (the imperative shell): join a shared line, poll the read plan, yield samples.

The wire lives in :mod:`adapters.modbus.line`: the adapter of each machine takes a reference
to its endpoint's line from the owner's :class:`~adapters.modbus.line.LinePool` on enter and
releases it on exit, so machines behind one converter or on one RS-485 bus share one
connection transparently. The clients retry and
reconnect nothing on their own: the gateway's supervisor reconnects with backoff, so a
lost link or a silent unit surfaces at once as :class:`~adapters.base.ConnectionLost`
(one timeout per cycle at most: the cycle stops at the first request left unanswered).

Quality mapping, per cycle and per signal:

- value decoded: ``Quality.GOOD``;
- Modbus exception response for the signal's own request, or a :class:`DecodeError`:
  ``Quality.BAD`` with ``value=None`` (the other signals stay good);
- timeout, closed socket or garbled framing: the whole cycle fails with ``ConnectionLost``;
- every request of a cycle answered with an exception response: the device answers but
  delivers nothing (a PLC in STOP, a converter whose serial side is dead). The cycle's
  samples are all ``BAD`` (the runtime counts such a poll as a read error), and after
  :data:`REFUSED_POLLS_OFFLINE` such cycles in a row the cycle fails with ``ConnectionLost``
  naming the exception, so the machine goes offline; it stays offline across reconnects
  (the first refused cycle fails at once) until a read is answered again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Self

import structlog

from gateway.core.model import Quality, Sample, Value
from shopfloor_gateway.adapters.base import (
    Acquisition,
    ConnectionLost,
    check_timing,
    first_deadline,
    next_deadline,
)
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig
from shopfloor_gateway.adapters.modbus.decode import BlockDecoder
from shopfloor_gateway.adapters.modbus.line import (
    ExceptionResponse,
    Line,
    LinePool,
    NoResponse,
    ReadResult,
)
from shopfloor_gateway.adapters.modbus.plan import (
    ReadRequest,
    compile_decoder,
    plan_for,
    split,
    split_gaps,
)

log = structlog.get_logger(__name__)

_new = tuple.__new__
_GOOD = Quality.GOOD

#: Exception codes after which a block bridging several signals is split, for good: the
#: device refuses part of the range (illegal address, illegal value when the count crosses
#: a hole, and device failure, which some devices answer for unimplemented registers).
#: Busy, acknowledge and gateway codes are transient, so they only mark the block's signals
#: bad for the cycle.
SPLIT_CODES = frozenset({2, 3, 4})

#: Polls in a row in which the device refused every read before the machine counts as
#: offline: one busy or acknowledge answer must not flap the machine's state.
REFUSED_POLLS_OFFLINE = 3

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
        lines: LinePool | None = None,
    ) -> None:
        """Compile the read plan; raise ``ValueError`` for an unusable interval or plan.

        ``lines`` is the owner's pool, shared with the other machines on the same
        endpoint; without one the adapter has a line of its own.
        """
        check_timing(poll_interval, start_offset)
        self._lines = lines if lines is not None else LinePool()
        self._machine = machine
        self._connection = connection
        self._signals = dict(signals)
        self._interval = poll_interval
        self._start_offset = start_offset
        self._clock = clock
        self._where = connection.endpoint.split("://", 1)[1]
        self._signals = resolve_word_orders(connection, self._signals)
        self._plan = plan_for(connection, self._signals)
        # One compiled decoder per request: the per-value work is a struct unpack. Keyed by
        # the request object's id (hashing a request hashes all its points, every poll); the
        # entry keeps the request alive so the id cannot be reused.
        self._decoders: dict[int, tuple[ReadRequest, BlockDecoder]] = {}
        self._line: Line | None = None
        # Signals currently bad, with the reason first seen: one warning per episode.
        self._bad: dict[str, str] = {}
        # Polls in a row in which every read was refused; kept across reconnects.
        self._refused_polls = 0
        self._log = log.bind(machine=machine, device=self._where, unit_id=connection.unit_id)
        #: The latest poll's duration and the deadlines missed (read by the metrics).
        self.acquisition = Acquisition()

    @property
    def machine(self) -> str:
        """The machine this adapter reads."""
        return self._machine

    @property
    def plan(self) -> tuple[ReadRequest, ...]:
        """The current read plan (blocks the device refused are split already)."""
        return self._plan

    async def __aenter__(self) -> Self:
        """Join the endpoint's shared line; raise :class:`ConnectError` naming it and the cause."""
        self._line = await self._lines.acquire(self._connection)
        self._log.debug("modbus.connected")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the line (the last machine on it closes it), whatever happened."""
        line, self._line = self._line, None
        if line is not None:
            self._lines.release(line)
        self._log.debug("modbus.closed")

    async def samples(self) -> AsyncIterator[list[Sample]]:
        """Yield one batch per poll cycle until cancelled; raise :class:`ConnectionLost`."""
        if self._line is None:
            raise RuntimeError("ModbusAdapter.samples() needs 'async with adapter:' first")
        loop = asyncio.get_running_loop()
        interval = self._interval
        # The first read at once: a device that is back (or a hung one that takes TCP but
        # never answers) is known within one round trip, and the reconnect attempts of many
        # devices, which end on the same whole second, read and time out together.
        # Yielded without a local name: a batch kept alive by this frame until the next poll
        # would sit in the collector's youngest generation (15,000 samples at 500 devices)
        # and make each of its passes a 10 ms pause of the loop.
        yield await self._timed_poll(loop)
        # Then on the device's phase grid of the loop clock (adapters.base.poll_phase), at
        # least half an interval after that first read.
        deadline = first_deadline(loop.time() + interval / 2, interval, self._start_offset)
        while True:
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield await self._timed_poll(loop)
            # The consumer's time counts too: reads never overlap, missed ticks are skipped.
            deadline, skipped = next_deadline(deadline, loop.time(), interval)
            if skipped:
                self.acquisition.missed_deadlines += skipped
                self._log.debug("modbus.ticks_skipped", skipped=skipped)

    async def _timed_poll(self, loop: asyncio.AbstractEventLoop) -> list[Sample]:
        """One poll, its duration kept in :attr:`acquisition` for the metrics."""
        # perf_counter, not loop.time(): uvloop's clock is cached per loop turn in whole
        # milliseconds, which makes a fast poll on the loopback last 0 s.
        started = time.perf_counter()
        try:
            return await self._poll()
        finally:
            self.acquisition.seconds = time.perf_counter() - started

    async def _poll(self) -> list[Sample]:
        """Run the plan once and turn the responses into one sample per signal."""
        values: dict[str, Value] = {}
        problems: dict[str, str] = {}
        plan = self._plan
        pending = list(plan)
        sent = 0
        answered = False
        refusals: set[int] = set()
        while pending:
            if self._connection.max_concurrent_requests > 1 and not self._connection.request_delay:
                results = await self._read_all(pending)
            else:
                results = []
                for request in pending:
                    if sent and self._connection.request_delay:
                        await asyncio.sleep(self._connection.request_delay)
                    results.append(await self._read(request))
                    sent += 1
            retry: list[ReadRequest] = []
            for request, result in zip(pending, results, strict=True):
                if isinstance(result, ExceptionResponse):
                    refusals.add(result.code)
                else:
                    answered = True
                parts = self._maybe_split(request, result)
                if parts:
                    retry.extend(parts)
                    continue
                self._collect(request, result, values, problems)
            pending = retry
        if answered or not plan:
            self._refused_polls = 0
        else:
            self._refused(plan, refusals)
        source_time = self._clock()
        self._track_problems(problems)
        machine = self._machine
        if not problems:
            # The usual poll. tuple.__new__ builds the named tuple without the call through
            # its generated __new__: 7 instead of 16 us for 30 signals.
            return [
                _new(Sample, (machine, name, values[name], source_time, _GOOD))
                for name in self._signals
            ]
        return [
            Sample(machine, name, None, source_time, Quality.BAD)
            if name in problems
            else Sample(machine, name, values[name], source_time, Quality.GOOD)
            for name in self._signals
        ]

    def _refused(self, plan: tuple[ReadRequest, ...], codes: set[int]) -> None:
        """Every read of this poll was refused: undo its splits; offline after a few polls.

        A split is for a device that refuses part of a range. One that refuses everything
        says nothing about the range, and splitting would leave a one-register-per-read
        plan behind once it answers again.
        """
        if self._plan != plan:
            self._plan = plan
            self._log.debug("modbus.block_split_undone", reason="every read refused")
        self._refused_polls += 1
        if self._refused_polls >= REFUSED_POLLS_OFFLINE:
            names = ", ".join(describe_exception(c) for c in sorted(codes))
            raise ConnectionLost(
                f"the device answers every read with exception {names} "
                f"({self._refused_polls} polls in a row)"
            )

    async def _read_all(self, requests: list[ReadRequest]) -> list[ReadResult]:
        """Read concurrently (the line bounds how many are in flight)."""
        tasks = [asyncio.ensure_future(self._read(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    def _maybe_split(self, request: ReadRequest, result: ReadResult) -> tuple[ReadRequest, ...]:
        """Split a refused block (remembered in the plan); empty when nothing to split."""
        if not isinstance(result, ExceptionResponse) or result.code not in SPLIT_CODES:
            return ()
        if len(request.points) < 2:
            return ()
        # First drop the bridged gaps (the usual hole); a gap-free block still refused is
        # read one signal per request.
        parts = split_gaps(request)
        if len(parts) == 1:
            parts = split(request)
        plan = list(self._plan)
        if request in plan:
            at = plan.index(request)
            plan[at : at + 1] = parts
            self._plan = tuple(plan)
            self._decoders.pop(id(request), None)
        self._log.info(
            "modbus.block_split",
            block=_describe(request),
            exception=describe_exception(result.code),
            requests=len(parts),
        )
        return parts

    def _collect(
        self,
        request: ReadRequest,
        result: ReadResult,
        values: dict[str, Value],
        problems: dict[str, str],
    ) -> None:
        """Decode one response into ``values`` or note why its signals are bad."""
        if isinstance(result, ExceptionResponse):
            reason = f"device exception {describe_exception(result.code)} for {_describe(request)}"
            for point in request.points:
                problems[point.signal] = reason
            return
        entry = self._decoders.get(id(request))
        if entry is None or entry[0] is not request:
            entry = self._decoders[id(request)] = (request, compile_decoder(request, self._signals))
        entry[1].decode_into(result, values, problems)

    async def _read(self, request: ReadRequest) -> ReadResult:
        """Items of one request, or the device's exception, with the configured retries.

        Raises :class:`ConnectionLost` on timeout, a closed line or a broken reply.
        """
        line = self._line
        if line is None:
            raise RuntimeError("ModbusAdapter is not connected: use 'async with adapter:'")
        conn = self._connection
        for attempt in range(conn.retries + 1):
            try:
                return await line.read(
                    conn.unit_id,
                    request.area,
                    request.start,
                    request.count,
                    reply_within=conn.timeout,
                )
            except NoResponse:
                if attempt == conn.retries:
                    raise
                self._log.debug("modbus.retry", block=_describe(request), attempt=attempt + 1)
        raise ConnectionLost("unreachable")  # pragma: no cover (the loop returns or raises)

    def _track_problems(self, problems: Mapping[str, str]) -> None:
        """Warn once when a signal turns bad, note at info when it is good again."""
        if not problems and not self._bad:
            return  # the usual poll: nothing bad before or now
        for name, reason in problems.items():
            if name not in self._bad:
                self._log.warning("modbus.signal_bad", signal=name, reason=reason)
            elif self._bad[name] != reason:
                self._log.debug("modbus.signal_bad", signal=name, reason=reason)
        for name in self._bad.keys() - problems.keys():
            self._log.info("modbus.signal_recovered", signal=name)
        self._bad = dict(problems)


def resolve_word_orders(
    connection: ModbusConnectionConfig, signals: Mapping[str, ModbusSignalConfig]
) -> dict[str, ModbusSignalConfig]:
    """Signals that do not set ``word_order`` take the connection's default."""
    if connection.word_order == "ABCD":
        return dict(signals)
    return {
        name: sig
        if "word_order" in sig.model_fields_set
        else sig.model_copy(update={"word_order": connection.word_order})
        for name, sig in signals.items()
    }


def create(
    machine: str,
    connection: ModbusConnectionConfig,
    signals: Mapping[str, ModbusSignalConfig],
    poll_interval: float,
    start_offset: float = 0.0,
    *,
    lines: LinePool | None = None,
) -> ModbusAdapter:
    """Factory for the protocol registry; ``lines`` is the pool shared by the owner's machines."""
    return ModbusAdapter(
        machine, connection, signals, poll_interval, start_offset=start_offset, lines=lines
    )
