"""A local MQTT broker for the demo: Mosquitto when installed, amqtt in-process otherwise.

``make demo`` needs a broker on the loopback interface and must work on a laptop where
nobody installed Mosquitto. :class:`EmbeddedBroker` starts Mosquitto as a child process
with a generated config when the binary is found (it is the broker the tests trust, it
speaks MQTT 5 and keeps retained QoS 1 at QoS 1); otherwise it runs amqtt 0.12 inside this
process (pure Python, MQTT 3.1.1 only, retained messages are delivered at QoS 0: fine for
a demo, not for production).

Either way the context manager returns only once the broker answers an MQTT CONNECT, and
stops the broker on exit, also when the enclosing task is cancelled.

::

    async with EmbeddedBroker(port=0) as broker:      # port 0: pick a free port
        print(broker.kind, broker.host, broker.port)  # "mosquitto" or "embedded"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import structlog

log = structlog.get_logger(__name__)

#: Where Debian puts the binary; ``/usr/sbin`` is often not on a normal user's PATH.
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")

Kind = Literal["mosquitto", "embedded"]


class BrokerStartError(RuntimeError):
    """The broker did not come up (port taken, binary failed, not ready in time)."""


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary, or ``None`` when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if MOSQUITTO_FALLBACK.is_file() and os.access(MOSQUITTO_FALLBACK, os.X_OK):
        return str(MOSQUITTO_FALLBACK)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def mosquitto_config(host: str, port: int, *, as_root: bool) -> str:
    """Text of a minimal Mosquitto 2.x config: one anonymous listener, no persistence."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        # PUBACKs and events leave at once, not after Nagle's wait for the previous ACK.
        "set_tcp_nodelay true",
        # Errors and warnings only: the file is read back when start-up fails.
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if as_root:
        # As root, Mosquitto drops privileges to user `mosquitto` unless told otherwise;
        # it then cannot read a config or write a log in a root-owned temp directory.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def _connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT packet with a clean session and a 60 s keep-alive."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + (60).to_bytes(2, "big")
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    # Remaining length < 128 here, so it fits the one-byte form of the varint.
    return bytes([0x10, len(body)]) + body


async def probe(host: str, port: int, *, within: float = 1.0) -> bool:
    """True if an MQTT broker at host:port accepts a CONNECT (CONNACK return code 0)."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_connect_packet("shopfloor-probe"))
                await writer.drain()
                connack = await reader.readexactly(4)
                ok = connack[0] == 0x20 and connack[3] == 0
                writer.write(b"\xe0\x00")  # DISCONNECT, so the broker logs no error
                await writer.drain()
                return ok
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


class EmbeddedBroker:
    """Async context manager running a local MQTT broker for the demo and the tests.

    ``prefer="mosquitto"`` (the default) uses Mosquitto when it is installed and amqtt
    otherwise; ``prefer="amqtt"`` always runs amqtt in-process. ``port=0`` picks a free
    port; :attr:`port` holds the real one after entering. :attr:`kind` says which broker
    runs: ``"mosquitto"`` or ``"embedded"``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        prefer: Literal["mosquitto", "amqtt"] = "mosquitto",
        mosquitto: str | None = None,
        ready_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ready_timeout = ready_timeout
        binary = mosquitto or (find_mosquitto() if prefer == "mosquitto" else None)
        self._binary = binary
        self.kind: Kind = "mosquitto" if binary else "embedded"
        self._proc: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._amqtt: Any = None

    @property
    def pid(self) -> int | None:
        """Process id of the Mosquitto child while it runs; ``None`` for amqtt."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the running broker."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        """Start the broker and wait until it answers; raise :class:`BrokerStartError`."""
        if self.port == 0:
            self.port = free_port(self.host)
        try:
            if self.kind == "mosquitto":
                await self._start_mosquitto()
            else:
                await self._start_amqtt()
        except BaseException:
            # Also on cancellation: whatever was started must not outlive this call.
            await self._stop()
            raise
        log.info("broker started", kind=self.kind, url=self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker, whatever happened inside the block."""
        await self._stop()
        log.info("broker stopped", kind=self.kind, url=self.url)

    async def _start_mosquitto(self) -> None:
        assert self._binary is not None
        self._tmp = tempfile.TemporaryDirectory(prefix="shopfloor-mosquitto-")
        tmp = Path(self._tmp.name)
        conf = tmp / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.host, self.port, as_root=os.geteuid() == 0))
        # A file rather than a pipe: nobody reads a pipe while the broker runs, and a full
        # pipe buffer would block the broker.
        with (tmp / "mosquitto.log").open("wb") as out:
            self._proc = await asyncio.create_subprocess_exec(
                self._binary,
                "-c",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                # Its own session: Ctrl-C in the terminal reaches only the demo, which then
                # stops the broker last, after the gateway said goodbye through it.
                start_new_session=True,
            )
        await self._wait_ready()

    async def _start_amqtt(self) -> None:
        # Imported here: amqtt is an optional dependency (extra "demo") and slow to import.
        from amqtt.broker import Broker

        # amqtt logs every connection at info through stdlib logging; the demo's terminal
        # belongs to the live view.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        host = f"[{self.host}]" if ":" in self.host else self.host
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self.port}"}},
            # Only anonymous auth: the default plugin set adds $SYS publishing and packet
            # logging, which the demo does not need.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerStartError(f"amqtt could not start on {self.url}: {exc}") from exc
        self._amqtt = broker
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise BrokerStartError(
                    f"mosquitto exited with code {self._proc.returncode} on {self.url}: "
                    f"{self._mosquitto_log()}"
                )
            if await probe(self.host, self.port, within=0.5):
                return
            if loop.time() >= deadline:
                raise BrokerStartError(
                    f"{self.kind} broker not ready on {self.url} after {self.ready_timeout} s"
                )
            # Polling is the only readiness signal a plain listener gives; Mosquitto is
            # usually up within ~25 ms, so the first or second probe succeeds.
            await asyncio.sleep(0.02)

    def _mosquitto_log(self) -> str:
        if self._tmp is None:
            return ""
        try:
            text = (Path(self._tmp.name) / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-5:])

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        broker, self._amqtt = self._amqtt, None
        try:
            if proc is not None:
                await _terminate(proc)
            if broker is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5.0):
                        await broker.shutdown()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, wait up to 3 s, then SIGKILL; never leaves the child running."""
    if proc.returncode is not None:
        return
    try:
        proc.terminate()
        try:
            async with asyncio.timeout(3.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    except ProcessLookupError:  # exited between the check and the signal
        pass
    except BaseException:
        # Cancelled while waiting: kill synchronously so no orphan survives, then let the
        # cancellation propagate.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        raise
