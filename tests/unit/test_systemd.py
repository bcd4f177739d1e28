"""sd_notify over a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.runtime.systemd import Notifier, format_message, notify_address, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket like systemd's, and its path."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()


async def _receive(sock: socket.socket, within: float = 2.0) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        data = await loop.sock_recv(sock, 4096)
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 1, None),
        ({"WATCHDOG_USEC": "30000000"}, 1, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 8, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, 1, None),
        ({"WATCHDOG_USEC": "-5"}, 1, None),
        ({"WATCHDOG_USEC": "soon"}, 1, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, 1, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    env: dict[str, str], pid: int, expected: float | None
) -> None:
    assert watchdog_interval(env, pid) == expected


def test_notify_address_forms() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abstract"}) == b"\0abstract"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_message_lines_cannot_be_forged_by_newlines() -> None:
    assert format_message(STATUS="a\nREADY=1") == b"STATUS=a READY=1"


def test_without_systemd_everything_is_a_noop() -> None:
    n = Notifier(env={}, pid=1)
    assert not n.enabled
    assert n.watchdog is None
    assert not n.ready()
    assert not n.ping()
    n.close()


async def test_ready_status_and_stopping_reach_the_socket(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    n = Notifier(env={"NOTIFY_SOCKET": path}, pid=os.getpid())
    try:
        assert n.ready("3/3 devices online")
        assert await _receive(sock) == {
            "READY": "1",
            "MAINPID": str(os.getpid()),
            "STATUS": "3/3 devices online",
        }
        assert n.status("2/3 devices online")
        assert await _receive(sock) == {"STATUS": "2/3 devices online"}
        assert n.stopping()
        assert await _receive(sock) == {"STOPPING": "1"}
    finally:
        n.close()


async def test_abstract_socket_address_works() -> None:
    name = f"shopfloor-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    n = Notifier(env={"NOTIFY_SOCKET": "@" + name}, pid=1)
    try:
        assert n.ping()
        assert await _receive(sock) == {"WATCHDOG": "1"}
    finally:
        n.close()
        sock.close()


async def test_keepalive_pings_the_watchdog_from_the_event_loop(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    # 40 ms watchdog: pings every 20 ms.
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"}, pid=os.getpid())
    assert n.watchdog == pytest.approx(0.02)
    lines = iter(["1/2 devices online", "1/2 devices online", "2/2 devices online"])
    task = asyncio.create_task(n.keepalive(lambda: next(lines, "2/2 devices online")))
    try:
        received = [await _receive(sock) for _ in range(6)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        n.close()
    pings = [m for m in received if m.get("WATCHDOG") == "1"]
    statuses = [m["STATUS"] for m in received if "STATUS" in m]
    assert len(pings) >= 3
    # The status line is sent when it changes, not with every ping.
    assert statuses[:2] == ["1/2 devices online", "2/2 devices online"]


async def test_keepalive_returns_at_once_without_watchdog_or_status() -> None:
    n = Notifier(env={}, pid=1)
    async with asyncio.timeout(1):
        await n.keepalive()


async def test_a_status_callback_bug_does_not_stop_the_pings(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"}, pid=os.getpid())

    def broken() -> str:
        raise RuntimeError("bug")

    with capture_logs() as logs:
        task = asyncio.create_task(n.keepalive(broken))
        try:
            for _ in range(2):
                assert await _receive(sock) == {"WATCHDOG": "1"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            n.close()
    assert any(e["event"] == "systemd.status_failed" for e in logs)


def test_send_failures_are_logged_once_per_episode(tmp_path: Path) -> None:
    path = str(tmp_path / "gone")
    n = Notifier(env={"NOTIFY_SOCKET": path}, pid=1)
    with capture_logs() as logs:
        assert not n.ping()
        assert not n.ping()
        assert not n.ping()
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        try:
            assert n.ping()
            assert receiver.recv(100) == b"WATCHDOG=1"
        finally:
            receiver.close()
            n.close()
    events = [(e["event"], e.get("failures")) for e in logs]
    assert events == [("systemd.notify_failed", None), ("systemd.notify_recovered", 3)]
