"""systemd service notifications (``sd_notify``) without a dependency.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a filesystem path or, with a leading
``@``, an abstract AF_UNIX address) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``). The gateway sends ``READY=1`` once it runs, ``WATCHDOG=1`` from a task on
the event loop (so a hung loop stops the pings and systemd restarts the service),
``STATUS=...`` with a one-line summary, and ``STOPPING=1`` on shutdown.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the same entry point runs
in a terminal, a container and under systemd. A failed send is logged once and never raised:
notifications are advisory, the gateway's work is not.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)


def notify_address(env: Mapping[str, str]) -> str | bytes | None:
    """The socket address from ``$NOTIFY_SOCKET``; ``None`` when unset or unusable."""
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte (sd_notify(3)).
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # vsock: addresses and relative paths are not for a service on a PC; ignore them.
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or ``None`` if off.

    ``$WATCHDOG_PID``, when set, must name this process: a child that inherited the
    environment must not ping on the parent's behalf (sd_watchdog_enabled(3)).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    # Half the timeout, as systemd recommends, so one late tick is not yet a restart.
    return value / 1_000_000 / 2


def format_message(**fields: str | int) -> bytes:
    """``KEY=value`` lines for one datagram; newlines in values would forge keys."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notifications to systemd; a no-op when not started by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        """Read the socket and watchdog settings from ``env`` (default: the process's)."""
        env = os.environ if env is None else env
        self._pid = os.getpid() if pid is None else pid
        self.address = notify_address(env)
        self.watchdog = watchdog_interval(env, self._pid) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False
        self._failures = 0

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when off or it failed."""
        if self.address is None:
            return False
        message = format_message(**fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            self._failures += 1
            if not self._failing:
                self._failing = True
                log.warning("systemd.notify_failed", error=str(exc))
            return False
        if self._failing:
            log.info("systemd.notify_recovered", failures=self._failures)
            self._failing = False
            self._failures = 0
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up finished (with an optional status line)."""
        if status is None:
            return self.send(READY=1, MAINPID=self._pid)
        return self.send(READY=1, MAINPID=self._pid, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=...``: the line ``systemctl status`` shows."""
        return self.send(STATUS=text)

    def ping(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.send(WATCHDOG=1)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        """``RELOADING=1``: a config reload has begun (send ``ready()`` when done)."""
        return self.send(RELOADING=1)

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def keepalive(
        self,
        status: Callable[[], str] | None = None,
        *,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        """Ping the watchdog (and refresh the status line) until cancelled.

        Runs on the event loop on purpose: if the loop hangs, the pings stop and systemd
        restarts the service. ``healthy`` gates each ping too: a loop that turns but
        lags by seconds, or a gateway whose core task died, is not fed either. Returns at
        once when the watchdog is off and there is no status to refresh.
        """
        interval = self.watchdog
        if interval is None and (status is None or not self.enabled):
            return
        period = interval if interval is not None else 10.0
        last_status = ""
        withheld = False
        while True:
            if interval is not None:
                if healthy is None or _safe_healthy(healthy):
                    self.ping()
                    if withheld:
                        log.info("systemd.watchdog_resumed")
                    withheld = False
                elif not withheld:
                    # Once per episode; systemd restarts the service if it lasts.
                    withheld = True
                    log.warning("systemd.watchdog_withheld", reason="gateway not healthy")
            if status is not None:
                text = _safe_status(status)
                if text and text != last_status:
                    self.status(text)
                    last_status = text
            await asyncio.sleep(period)


def _safe_healthy(healthy: Callable[[], bool]) -> bool:
    # A bug in the check must not look like a hung gateway.
    try:
        return bool(healthy())
    except Exception:
        log.exception("systemd.health_check_failed")
        return True


def _safe_status(status: Callable[[], str]) -> str:
    # A bug in the status line must not stop the watchdog pings.
    try:
        return status()
    except Exception:
        log.exception("systemd.status_failed")
        return ""
