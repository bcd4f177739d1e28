"""The gateway as its own process, as in production, and helpers to read what it published."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.brokers import Received

ROOT = Path(__file__).resolve().parents[1]


async def start_gateway(
    config: Path, log: Path, env: Mapping[str, str] | None = None, *, module: str = "gateway"
) -> asyncio.subprocess.Process:
    """``python -m gateway run -c CONFIG`` with stdout and stderr into ``log``.

    ``module``: another entry point with the same command line (a wrapped gateway).
    """
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "run",
            "-c",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


async def kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the process if it still runs, and reap it."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def stop(proc: asyncio.subprocess.Process, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``grace`` seconds."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
    except TimeoutError:
        await kill(proc)


@contextlib.asynccontextmanager
async def gateway_process(
    config: Path, log: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``shopfloor run`` in its own process; killed at the end whatever happened."""
    proc = await start_gateway(config, log, env)
    try:
        yield proc
    finally:
        await kill(proc)


def events(messages: Sequence[Received]) -> list[dict[str, Any]]:
    """Decoded CloudEvents in arrival order."""
    return [json.loads(m.payload) for m in messages if "/event/" in m.topic]


def by_machine(evs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped by machine (the CloudEvents subject), in arrival order."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evs:
        out[e["subject"]].append(e)
    return out


def short(e: dict[str, Any]) -> str:
    """The contract's short event type (``order.started``)."""
    return str(e["type"]).removeprefix("io.shopfloor.")
