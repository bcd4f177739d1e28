"""The lean Modbus TCP / RTU-over-TCP client on real loopback sockets.

Peers: the pymodbus simulator (answers compared with pymodbus' own client), the load
simulator, and scripted devices that misbehave on purpose (wrong transaction ids, split or
merged segments, truncated and garbled frames, stalls, hang-ups).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.framer import FramerType
from pymodbus.simulator import DataType, SimData, SimDevice
from structlog.testing import capture_logs

from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.modbus import line as lines
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, RegisterArea, Transport
from shopfloor_gateway.adapters.modbus.line import ExceptionResponse, Line, NoResponse
from shopfloor_gateway.adapters.modbus.tcpclient import TcpClient
from shopfloor_gateway.adapters.modbus.wire import crc16
from shopfloor_gateway.simulators import load
from shopfloor_gateway.simulators.modbus_server import free_port, start_server

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


# --------------------------------------------------------------------- scripted devices


@dataclass(frozen=True, slots=True)
class Req:
    """A read request as a scripted device received it."""

    tid: int
    unit: int
    function: int
    start: int
    count: int


async def read_mbap(reader: asyncio.StreamReader) -> Req:
    """The next Modbus TCP read request off the stream."""
    tid, _, _, unit, function, start, count = struct.unpack(
        ">HHHBBHH", await reader.readexactly(12)
    )
    return Req(tid, unit, function, start, count)


async def read_rtu(reader: asyncio.StreamReader) -> Req:
    """The next RTU read request (8 bytes, CRC checked)."""
    frame = await reader.readexactly(8)
    assert crc16(frame[:6]) == frame[6] | frame[7] << 8
    unit, function, start, count = struct.unpack(">BBHH", frame[:6])
    return Req(-1, unit, function, start, count)


def mbap_answer(req: Req, words: list[int], *, tid: int | None = None) -> bytes:
    """The Modbus TCP answer to ``req`` carrying ``words`` (another ``tid`` if given)."""
    body = struct.pack(f">BB{len(words)}H", req.function, 2 * len(words), *words)
    header = struct.pack(">HHHB", req.tid if tid is None else tid, 0, len(body) + 1, req.unit)
    return header + body


def rtu_answer(unit: int, function: int, words: list[int]) -> bytes:
    """An RTU answer carrying ``words`` (CRC appended)."""
    body = struct.pack(f">BBB{len(words)}H", unit, function, 2 * len(words), *words)
    crc = crc16(body)
    return body + bytes((crc & 0xFF, crc >> 8))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass(slots=True)
class Device:
    """A scripted device: its port and how many connections it accepted."""

    port: int
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@asynccontextmanager
async def device(handler: Handler) -> AsyncIterator[Device]:
    """Serve ``handler(reader, writer, connection_number)`` on a free port; all closed on exit."""
    dev = Device(0)

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dev.connections += 1
        dev.writers.append(writer)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The client hanging up ends a handler: that is how these devices stop.
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await handler(reader, writer, dev.connections)
        writer.close()

    server = await asyncio.start_server(run, HOST, 0)
    dev.port = server.sockets[0].getsockname()[1]
    try:
        yield dev
    finally:
        server.close()
        for writer in dev.writers:
            writer.close()
        await server.wait_closed()


@asynccontextmanager
async def line_to(
    port: int, transport: Transport = "tcp", wait: float = 0.3, **kw: int
) -> AsyncIterator[Line]:
    """A shared line to a loopback port (``wait``: its timeout), released on exit."""
    conn = ModbusConnectionConfig(transport=transport, host=HOST, port=port, timeout=wait, **kw)
    pool = lines.LinePool()
    line = await pool.acquire(conn)
    try:
        yield line
    finally:
        pool.close()


async def holding(line: Line, start: int = 0, count: int = 1, *, within: float = 0.3) -> object:
    """Read holding registers of unit 1."""
    return await line.read(1, "holding", start, count, reply_within=within)


# -------------------------------------------------- the same answers as pymodbus' client

RANGES: list[tuple[RegisterArea, int, int]] = [
    ("holding", 0, 10),
    ("holding", 3, 1),
    ("input", 0, 10),
    ("coil", 0, 16),
    ("coil", 3, 5),
    ("discrete_input", 1, 9),
]


@pytest.mark.parametrize("transport", ["tcp", "rtu_over_tcp"])
async def test_answers_match_pymodbus_against_the_pymodbus_simulator(transport: Transport) -> None:
    coils = [SimData(0, values=[i % 3 == 0 for i in range(16)], datatype=DataType.BITS)]
    inputs = [SimData(0, values=[i % 2 == 1 for i in range(16)], datatype=DataType.BITS)]
    sim = SimDevice(
        id=1,
        simdata=(
            coils,
            inputs,
            [SimData(0, values=[7 * i + 1 for i in range(10)], datatype=DataType.REGISTERS)],
            [SimData(0, values=[65535 - i for i in range(10)], datatype=DataType.REGISTERS)],
        ),
    )
    server, port = await start_server([sim], transport=transport)
    oracle = AsyncModbusTcpClient(
        HOST, port=port, framer=FramerType.SOCKET if transport == "tcp" else FramerType.RTU
    )
    try:
        assert await oracle.connect()
        async with line_to(port, transport) as line:
            for area, start, count in RANGES:
                ours = await line.read(1, area, start, count, reply_within=2.0)
                if area in ("coil", "discrete_input"):
                    reader = oracle.read_coils if area == "coil" else oracle.read_discrete_inputs
                    theirs: object = (await reader(start, count=count, device_id=1)).bits[:count]
                else:
                    reader = (
                        oracle.read_holding_registers
                        if area == "holding"
                        else oracle.read_input_registers
                    )
                    theirs = (await reader(start, count=count, device_id=1)).registers
                assert ours == theirs, (area, start, count)
            # Beyond the defined registers: the device's exception, not a failure.
            assert await line.read(1, "holding", 50, 2, reply_within=2.0) == ExceptionResponse(2)
    finally:
        oracle.close()
        await server.shutdown()  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------ the load simulator


async def test_load_simulator_values_exceptions_and_concurrency() -> None:
    ports = [free_port() for _ in range(3)]
    devices = [
        load.LoadDevice("a", ports[0], unit_id=1, signals=30),
        load.LoadDevice("b", ports[0], unit_id=2, signals=30),
        load.LoadDevice("stall", ports[1], mode="stall"),
        load.LoadDevice("dead", ports[2], mode="dead"),
    ]
    now = 1_000_000.0
    async with load.LoadFloor(devices, clock=lambda: now):
        expected = {d.unit_id: load.registers(d, now) for d in devices[:2]}
        async with line_to(ports[0], max_concurrent_requests=4) as line:
            assert await holding(line, 0, 30) == expected[1][:30]
            assert await line.read(2, "input", 5, 8, reply_within=1.0) == expected[2][5:13]
            # No unit 3 behind this port: the load gateway answers "target failed to respond".
            assert await line.read(3, "holding", 0, 1, reply_within=1.0) == ExceptionResponse(11)
            assert await holding(line, 35, 10) == ExceptionResponse(2)
            # Many reads at once over the line's four connections: each gets its own answer.
            spans = [(1 + i % 2, i % 20, 1 + i % 17) for i in range(60)]
            results = await asyncio.gather(
                *(line.read(u, "holding", s, n, reply_within=2.0) for u, s, n in spans)
            )
            for (unit, start, count), got in zip(spans, results, strict=True):
                assert got == expected[unit][start : start + count]
        async with line_to(ports[1], wait=0.2) as line:
            with pytest.raises(NoResponse, match=r"no response from .* within 0.2 s"):
                await holding(line, within=0.2)
        with pytest.raises(ConnectError, match=rf"{HOST}:{ports[2]}: connection refused"):
            async with line_to(ports[2]):
                pass


# ---------------------------------------------------------------- transaction ids


async def test_wrong_transaction_id_is_dropped_and_the_right_one_taken() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        req = await read_mbap(reader)
        # A stray answer with someone else's transaction id, then the real one.
        writer.write(mbap_answer(req, [111], tid=req.tid ^ 0x5555))
        await writer.drain()
        writer.write(mbap_answer(req, [222]))
        req = await read_mbap(reader)
        writer.write(mbap_answer(req, [333], tid=req.tid + 1))  # only a wrong one this time
        req = await read_mbap(reader)
        writer.write(mbap_answer(req, [444]))
        await reader.read()

    async with device(answer) as dev, line_to(dev.port) as line:
        assert await holding(line) == [222]
        with pytest.raises(NoResponse):
            await holding(line, within=0.2)
        assert await holding(line) == [444]  # the connection stayed usable
        assert dev.connections == 1


async def test_transaction_ids_count_up_and_wrap_at_16_bits() -> None:
    seen: list[int] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            req = await read_mbap(reader)
            seen.append(req.tid)
            writer.write(mbap_answer(req, [req.tid]))

    async with device(echo) as dev:
        client = await TcpClient.connect(HOST, dev.port, framing="mbap", connect_within=1.0)
        try:
            client._transaction = 0xFFFD  # skip ahead to the wrap
            for _ in range(4):
                await client.read(1, "holding", 0, 1, 1.0)
        finally:
            client.close()
    assert seen == [0xFFFE, 0xFFFF, 0, 1]


# --------------------------------------------------------------- TCP segmentation


@pytest.mark.parametrize("transport", ["tcp", "rtu_over_tcp"])
async def test_response_split_across_segments(transport: Transport) -> None:
    words = [(i * 263) & 0xFFFF for i in range(125)]

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            if transport == "tcp":
                frame = mbap_answer(await read_mbap(reader), words)
            else:
                req = await read_rtu(reader)
                frame = rtu_answer(req.unit, req.function, words)
            # One byte per segment for the header, then uneven pieces.
            pieces = [frame[i : i + 1] for i in range(9)] + [frame[9:100], frame[100:]]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)  # the fault under test: separate TCP segments

    async with device(trickle) as dev, line_to(dev.port, transport, wait=2.0) as line:
        for _ in range(2):
            assert await holding(line, 0, 125, within=2.0) == words


async def test_two_responses_in_one_segment_answer_two_requests_out_of_order() -> None:
    async def both(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        first, second = await read_mbap(reader), await read_mbap(reader)
        writer.write(mbap_answer(second, [2, 2]) + mbap_answer(first, [1]))
        await reader.read()

    async with device(both) as dev:
        client = await TcpClient.connect(HOST, dev.port, framing="mbap", connect_within=1.0)
        try:
            a = asyncio.create_task(client.read(1, "holding", 0, 1, 2.0))
            b = asyncio.create_task(client.read(1, "input", 0, 2, 2.0))
            results: list[object] = list(await asyncio.gather(a, b))
            assert results == [[1], [2, 2]]
            assert client.pending == 0
        finally:
            client.close()


async def test_late_answer_and_current_answer_in_one_segment() -> None:
    async def laggard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        stale = await read_mbap(reader)  # left unanswered until the next request arrives
        current = await read_mbap(reader)
        writer.write(mbap_answer(stale, [111]) + mbap_answer(current, [222]))
        await reader.read()

    async with device(laggard) as dev, line_to(dev.port) as line:
        with pytest.raises(NoResponse):
            await holding(line, within=0.1)
        assert await holding(line) == [222]  # the stale 111 is never the answer
        assert dev.connections == 1


# --------------------------------------------------------------- exceptions, stalls


@pytest.mark.parametrize("transport", ["tcp", "rtu_over_tcp"])
async def test_exception_response(transport: Transport) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            if transport == "tcp":
                req = await read_mbap(reader)
                writer.write(struct.pack(">HHHBBB", req.tid, 0, 3, req.unit, 0x83, 6))
            else:
                req = await read_rtu(reader)
                body = bytes((req.unit, 0x83, 6))
                crc = crc16(body)
                writer.write(body + bytes((crc & 0xFF, crc >> 8)))

    async with device(refuse) as dev, line_to(dev.port, transport) as line:
        assert await holding(line, 0, 4) == ExceptionResponse(6)
        assert await holding(line, 0, 4) == ExceptionResponse(6)
        assert dev.connections == 1


async def test_stall_then_recovery_on_the_same_tcp_connection() -> None:
    async def hiccup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_mbap(reader)  # swallowed: a PLC busy with something else
        while True:
            writer.write(mbap_answer(await read_mbap(reader), [42]))

    async with device(hiccup) as dev, line_to(dev.port) as line:
        started = time.monotonic()
        with pytest.raises(NoResponse, match=r"within 0.2 s reading holding 0..0 of unit 1"):
            await holding(line, within=0.2)
        assert 0.15 < time.monotonic() - started < 3.0  # loose: the machine may be busy
        assert await holding(line) == [42]
        assert dev.connections == 1


async def test_rtu_over_tcp_stall_reopens_so_a_late_answer_dies_with_the_old_connection() -> None:
    second = asyncio.Event()

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            req = await read_rtu(reader)
            await second.wait()  # answer only once the client has moved on
            writer.write(rtu_answer(req.unit, req.function, [111]))
            await writer.drain()
            await reader.read()
            return
        second.set()
        while True:
            req = await read_rtu(reader)
            writer.write(rtu_answer(req.unit, req.function, [222]))

    async with device(late) as dev, line_to(dev.port, "rtu_over_tcp") as line:
        with pytest.raises(NoResponse):
            await holding(line, within=0.15)
        assert await holding(line) == [222]
        assert await holding(line) == [222]
        assert dev.connections == 2


async def test_rtu_over_tcp_answer_from_another_unit_reconnects_and_retries() -> None:
    async def confused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            req = await read_rtu(reader)
            unit = 9 if n == 1 else req.unit  # the first connection answers for unit 9
            writer.write(rtu_answer(unit, req.function, [n]))

    async with device(confused) as dev, line_to(dev.port, "rtu_over_tcp") as line:
        with capture_logs() as logs:
            assert await holding(line) == [2]
        assert dev.connections == 2
    mismatch = [e for e in logs if e["event"] == "modbus.response_mismatch"]
    assert mismatch and "unit 9, asked unit 1" in mismatch[0]["reason"]


# -------------------------------------------------------------- broken connections


async def test_truncated_frame_then_close_is_connection_lost() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(mbap_answer(await read_mbap(reader), [1, 2, 3])[:9])
        await writer.drain()
        writer.close()

    async with device(cut) as dev, line_to(dev.port, wait=5.0) as line:
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="closed by the device while reading holding"):
            await holding(line, 0, 3, within=5.0)
        assert time.monotonic() - started < 4.0  # the hang-up, not the 5 s timeout, ends it


async def test_peer_closing_mid_request_fails_it_at_once_and_the_line_reconnects() -> None:
    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        req = await read_mbap(reader)
        if n == 1:
            return  # hangs up with the request unanswered
        writer.write(mbap_answer(req, [7]))
        await reader.read()

    async with device(flaky) as dev, line_to(dev.port, wait=5.0) as line:
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="closed by the device"):
            await holding(line, within=5.0)
        assert time.monotonic() - started < 4.0  # well before the 5 s timeout
        # The unit that saw the drop is told at once; the read after that reconnects.
        with pytest.raises(ConnectionLost, match="is closed"):
            await holding(line)
        assert await holding(line) == [7]
        assert dev.connections == 2


@pytest.mark.parametrize(
    ("transport", "reply", "message"),
    [
        ("tcp", bytes.fromhex("0001 0007 0005 01 03 02 0001"), "protocol id 7"),
        ("tcp", bytes.fromhex("0001 0000 0005 01 03 04 0001"), "announces 4 bytes"),
        ("rtu_over_tcp", bytes.fromhex("01 03 02 0001 0000"), "CRC mismatch"),
    ],
)
async def test_garbled_response_drops_the_connection(
    transport: Transport, reply: bytes, message: str
) -> None:
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            if transport == "tcp":
                req = await read_mbap(reader)
                writer.write(reply if n == 1 else mbap_answer(req, [5]))
            else:
                req = await read_rtu(reader)
                writer.write(reply if n == 1 else rtu_answer(1, 3, [5]))

    async with device(garble) as dev, line_to(dev.port, transport) as line:
        with pytest.raises(ConnectionLost, match=rf"garbled response \(.*{message}"):
            await holding(line)
        with pytest.raises(ConnectionLost, match="is closed"):
            await holding(line)
        assert await holding(line) == [5]
        assert dev.connections == 2


# ----------------------------------------------------------------- connect errors


async def test_refused_connection_reads_well() -> None:
    with socket.socket() as blocker:
        blocker.bind((HOST, 0))
        port = blocker.getsockname()[1]
        with pytest.raises(
            ConnectError, match=rf"^cannot connect to {HOST}:{port}: connection refused$"
        ):
            await TcpClient.connect(HOST, port, framing="mbap", connect_within=1.0)


@pytest.mark.parametrize(
    "host",
    [
        ".".join(["x" * 60] * 5),  # longer than any DNS name: refused without a query
        "x" * 64 + ".example",  # a label too long for the IDNA codec
    ],
)
async def test_unresolvable_host_reads_well(host: str) -> None:
    with pytest.raises(ConnectError, match=r"cannot resolve host"):
        await TcpClient.connect(host, 502, framing="mbap", connect_within=1.0)


async def test_connect_timeout_reads_well() -> None:
    # A listener whose accept queue is full and never drained: further SYNs go unanswered.
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((HOST, port))
                fillers.append(filler)
            with pytest.raises(ConnectError, match=r"no answer within 0.3 s"):
                await TcpClient.connect(HOST, port, framing="mbap", connect_within=0.3)
        finally:
            for filler in fillers:
                filler.close()
