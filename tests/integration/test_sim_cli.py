"""`shopfloor simulate sewing --transport ...`: stations as unit ids behind one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
from collections.abc import AsyncIterator

from shopfloor_gateway.adapters import probe
from shopfloor_gateway.simulators import cli
from shopfloor_gateway.simulators.modbus_server import free_port


@contextlib.asynccontextmanager
async def simulating(*argv: str) -> AsyncIterator[None]:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    task = asyncio.create_task(cli.run(parser.parse_args(list(argv))))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def scan(url: str, units: str) -> str:
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    out = io.StringIO()
    args = parser.parse_args(["modbus", url, "--scan-units", units, "--timeout", "0.3"])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        # The simulator task binds its port in the background; retry until it listens.
        code = await probe.run(args, out)
        if code == 0 or loop.time() > deadline:
            return out.getvalue()
        out = io.StringIO()
        await asyncio.sleep(0.05)


async def test_stations_behind_one_converter_answer_as_unit_ids() -> None:
    port = free_port()
    async with simulating("--stations", "3", "--transport", "rtu_over_tcp", "--port", str(port)):
        text = await scan(f"rtu+tcp://127.0.0.1:{port}", "1-4")
    for unit in (1, 2, 3):
        assert f"unit {unit}: answers" in text, text
    assert "unit 4: answers" not in text


async def test_rtu_needs_a_serial_device() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert await cli.run(parser.parse_args(["--transport", "rtu"])) == 2
