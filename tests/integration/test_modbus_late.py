"""A late response is never taken for the answer to a later request."""

from __future__ import annotations

import asyncio
import struct

import pytest
from structlog.testing import capture_logs

from gateway.core.model import Quality
from shopfloor_gateway.adapters.modbus.adapter import ModbusAdapter
from shopfloor_gateway.adapters.modbus.config import ModbusConnectionConfig, ModbusSignalConfig

pytestmark = pytest.mark.integration


async def test_late_tcp_response_is_dropped_not_misattributed() -> None:
    requests = 0

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A slow device: the very first request is answered late, with a stale value; every
        # later request at once with the current one.
        nonlocal requests
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", header)
                await reader.readexactly(length - 1)
                requests += 1
                value = 222
                if requests == 1:
                    await asyncio.sleep(0.3)
                    value = 111
                body = struct.pack(">BBH", 3, 2, value)
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
        except asyncio.CancelledError:
            # server.close() at the end cancels an idle handler; ending quietly keeps
            # asyncio from logging the cancelled connection task as an error.
            writer.close()

    server = await asyncio.start_server(device, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = ModbusConnectionConfig(host="127.0.0.1", port=port, timeout=0.2, retries=2)
        signals = {"value": ModbusSignalConfig(address=0, type="uint16")}
        adapter = ModbusAdapter("slow", conn, signals, 0.05)
        seen: list[object] = []
        with capture_logs():
            async with adapter, asyncio.timeout(5):
                async for batch in adapter.samples():
                    (sample,) = batch
                    assert sample.quality is Quality.GOOD
                    seen.append(sample.value)
                    if len(seen) == 3:
                        break
        assert seen == [222, 222, 222]  # the stale 111 never surfaced
        assert requests >= 4  # the timed-out request was retried
    finally:
        server.close()
        await server.wait_closed()
