"""The publisher's socket reader: every read is acknowledged at once (TCP_QUICKACK).

A broker with Nagle's algorithm on holds each PUBACK until TCP acknowledged the one
before; without an immediate ACK from the gateway that costs up to 40 ms per event
(``bench.scale_modbus``: sample -> PUBACK p99 91 ms before, 15 ms after). The paho client
is a stand-in here; the socket is a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

from gateway.delivery.mqtt.publisher import _Client

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux only"
)


class RecordingSocket(socket.socket):
    """A real TCP socket that remembers the options set on it."""

    options: list[tuple[int, int, int]]

    def setsockopt(self, *args: Any) -> None:  # type: ignore[override]
        self.options.append(args)  # type: ignore[arg-type]
        super().setsockopt(*args)


class FakePaho:
    """What the reader calls on paho: loop_read() and socket()."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.reads = 0
        self.read = asyncio.Event()

    def loop_read(self) -> int:
        self.reads += 1
        self.read.set()
        if self.fail:
            raise ConnectionResetError("broker went away")
        self.sock.recv(4096)
        return 0

    def socket(self) -> socket.socket:
        return self.sock


@contextlib.asynccontextmanager
async def tcp_pair() -> Any:
    """A connected loopback TCP pair: (gateway side as RecordingSocket, broker side)."""
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    rec = RecordingSocket(a.family, a.type, a.proto, a.detach())
    rec.options = []
    rec.setblocking(False)
    try:
        yield rec, b
    finally:
        rec.close()
        b.close()


async def reader_of(paho: FakePaho) -> _Client:
    client = _Client("127.0.0.1", 1)
    client._on_socket_open(paho, None, paho.sock)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # the registration is handed over with call_soon_threadsafe
    return client


async def test_each_read_is_acknowledged_at_once() -> None:
    async with tcp_pair() as (gw, broker):
        paho = FakePaho(gw)
        client = await reader_of(paho)
        try:
            for _ in range(3):
                paho.read.clear()
                broker.send(b"\x40\x02\x00\x01")  # a PUBACK
                async with asyncio.timeout(2):
                    await paho.read.wait()
            assert paho.reads == 3
            quick = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            assert gw.options.count(quick) == 3, gw.options
        finally:
            asyncio.get_running_loop().remove_reader(gw.fileno())
            client._misc_task.cancel()


async def test_a_failed_read_ends_the_connection_without_touching_the_socket() -> None:
    async with tcp_pair() as (gw, broker):
        paho = FakePaho(gw, fail=True)
        client = await reader_of(paho)
        try:
            broker.send(b"\x40")
            async with asyncio.timeout(2):
                with pytest.raises(ConnectionResetError):
                    await client._disconnected
            assert gw.options == []
        finally:
            asyncio.get_running_loop().remove_reader(gw.fileno())
            client._misc_task.cancel()
