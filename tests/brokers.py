"""Test helpers: a private Mosquitto broker on a free loopback port, and a subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import aiomqtt

_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerNotFoundError(RuntimeError):
    """Mosquitto is not installed where the tests look for it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a clear error saying how to get it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _SEARCH:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerNotFoundError(
        "mosquitto not found on PATH or in /usr/sbin: the integration tests need a real "
        "broker. Run `make test` (it checks the set-up) or `apt-get install mosquitto`."
    )


class MosquittoBroker:
    """A Mosquitto process with its own config, data and log in ``directory``.

    ``stop()`` and ``start()`` again keep the port and the persistence file, so a
    test can restart the broker under a connected client.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        ready_timeout: float = 5.0,
    ) -> None:
        """Prepare the config; nothing runs until ``start()``."""
        self.binary = find_mosquitto()
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_file = self.directory / "mosquitto.conf"
        self.log_file = self.directory / "mosquitto.log"
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.directory}/",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # Tests publish bursts to slow subscribers; the default 1000 would drop some.
            "max_queued_messages 0",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops to user `mosquitto` and then cannot write here.
            lines.append("user root")
        if extra_config:
            lines.append(extra_config)
        self.config_file.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait (bounded) until it accepts TCP connections."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise RuntimeError(
                    f"mosquitto exited at start on port {self.port}: {err.strip()}\n{self.log()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"mosquitto did not accept connections on port {self.port} "
                        f"within {self.ready_timeout} s\n{self.log()}"
                    ) from None
                # Polling a socket state; there is no readiness notification to wait on.
                time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """Kill the broker at once, without saving anything (a crash)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def log(self) -> str:
        """The broker's log so far (for failure messages)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return "(no mosquitto log)"

    def __enter__(self) -> Self:
        """Start the broker."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker."""
        self.stop()


class Received(NamedTuple):
    """One message a :class:`Subscriber` got."""

    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """Async context manager that collects every message matching ``topic_filter``.

    With ``session`` set it uses a persistent session under that client id and
    reconnects by itself, so it also receives what was published while the broker
    restarted (QoS 1 messages are queued for it by the broker).
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str,
        *,
        qos: int = 1,
        session: str | None = None,
    ) -> None:
        """Prepare; nothing connects until ``async with``."""
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.qos = qos
        self.session = session
        self.messages: list[Received] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._error: BaseException | None = None

    async def __aenter__(self) -> Self:
        """Connect and subscribe (SUBACK received before this returns)."""
        self._task = asyncio.create_task(self._run(), name=f"subscriber[{self.topic_filter}]")
        waiter = asyncio.create_task(self._subscribed.wait())
        try:
            async with asyncio.timeout(5):
                await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._subscribed.is_set():
            await self._shutdown()
            raise RuntimeError(f"subscriber could not subscribe: {self._error!r}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Disconnect."""
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        try:
            while True:
                try:
                    await self._session_once()
                except aiomqtt.MqttError as exc:
                    self._error = exc
                    if self.session is None:
                        return
                # Reconnect pause while the broker restarts; not synchronisation.
                await asyncio.sleep(0.02)
        finally:
            self._changed.set()

    async def _session_once(self) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.session,
            clean_session=self.session is None,
            timeout=5,
            # Nagle would hold back PUBACKs and cap delivery at a few hundred msg/s.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        async with client:
            # A persistent session keeps the subscription across reconnects; subscribing
            # again would replay retained messages as duplicates.
            if not self._subscribed.is_set():
                await client.subscribe(self.topic_filter, qos=self.qos)
                self._subscribed.set()
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                self.messages.append(Received(str(m.topic), payload, bool(m.retain)))
                self._changed.set()

    async def wait_for(
        self,
        pred: Callable[[list[Received]], object],
        timeout: float = 5.0,  # noqa: ASYNC109 - the helper API the suite shares
    ) -> list[Received]:
        """Wait until ``pred(messages)`` is truthy; returns the messages so far."""
        try:
            async with asyncio.timeout(timeout):
                while not pred(self.messages):
                    if self._task is not None and self._task.done():
                        raise AssertionError(f"subscriber stopped: {self._error!r}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = [(m.topic, m.payload[:80]) for m in self.messages[-5:]]
            raise AssertionError(
                f"condition not met within {timeout} s; {len(self.messages)} messages, last: {tail}"
            ) from None
        return list(self.messages)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        """Payloads received so far, optionally for one topic only."""
        return [m.payload for m in self.messages if topic is None or m.topic == topic]


class VictoriaMetrics:
    """A private victoria-metrics on a loopback port, storing under ``directory``."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        binary = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
        if not Path(binary).exists():
            raise RuntimeError(
                "victoria-metrics not found: `make test` installs it (Debian package "
                "victoria-metrics), or run `apt-get install victoria-metrics`"
            )
        self.binary = binary
        self.port = port or free_port()
        self.directory = directory
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.directory}",
                "-search.latencyOffset=0s",
                "-retentionPeriod=100y",
                "-loggerLevel=ERROR",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited with {self._proc.returncode}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/health", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            # Polling the port: victoria-metrics has no readiness notification.
            time.sleep(0.02)
        raise RuntimeError("victoria-metrics did not become ready in 10 s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def export(self, match: str = '{__name__=~"shopfloor_.*"}') -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/internal/force_flush", timeout=5):
            pass
        data = f"match[]={urllib.parse.quote(match)}".encode()
        with urllib.request.urlopen(self.url + "/api/v1/export", data=data, timeout=5) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]
