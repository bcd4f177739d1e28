"""The command listener says why it cannot listen: each new cause once, repeats quietly.

Against a real Mosquitto: a rejected login ("Not authorized", as after a password rotation),
then the broker gone, then a client-id collision that takes the listener's session over and
over. Each cause is one warning per outage, however many attempts it takes; before, only the
first failure of an outage was a warning. Mosquitto 2.0 closes a taken-over session without
a DISCONNECT reason (paho reports "Unspecified error"), so a session that keeps dropping right
after it was made gets its own warning naming the client id.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiomqtt
import structlog

from gateway.contract.envelope import Topics
from gateway.core.backoff import Backoff
from gateway.core.tracker import AssignOrder, CancelOrder, CommandResult
from gateway.delivery.mqtt.publisher import BrokerSettings
from gateway.runtime.commands import CommandListener
from tests.brokers import MosquittoBroker


class Idle:
    """A runtime that is never asked anything in this test."""

    def apply_command(self, machine: str, command: AssignOrder | CancelOrder, now: float) -> Any:
        return CommandResult(False, "not here")

    def customer_of(self, machine: str, order_id: str) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class CountingBackoff(Backoff):
    """Short waits; counts the attempts so the test can wait for several."""

    calls: ClassVar[list[int]] = []

    def delay(self, attempt: int, rng: Any = None) -> float:
        self.calls.append(attempt)
        return 0.05


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for a condition that only a poll can see (log records)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - nothing to await but the listener's work
            await asyncio.sleep(0.02)


def warnings(logs: list[dict[str, Any]]) -> list[str]:
    return [
        str(e["error"])
        for e in logs
        if e["event"] == "command.listener_unreachable" and e["log_level"] == "warning"
    ]


async def test_each_cause_of_an_outage_is_one_warning(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    passwords.write_text("")
    passwords.chmod(0o600)
    broker = MosquittoBroker(
        tmp_path / "locked",
        extra_config=f"allow_anonymous false\npassword_file {passwords}",
    )
    await asyncio.to_thread(
        subprocess.run, ["mosquitto_passwd", "-b", str(passwords), "gw", "right"], check=True
    )
    broker.start()
    CountingBackoff.calls.clear()
    settings = BrokerSettings(
        host=broker.host, port=broker.port, client_id="gw-logs", username="gw", password="wrong"
    )
    with structlog.testing.capture_logs() as logs:
        listener = CommandListener(
            settings,
            Topics("logs", "plant-1", "gw-logs"),
            {},
            Idle(),
            backoff=CountingBackoff(),
        )
        task = asyncio.create_task(listener.run())
        try:
            # A rotated password: refused again and again, warned once.
            await until(lambda: len(CountingBackoff.calls) >= 5)
            assert len([w for w in warnings(logs) if "Not authorized" in w]) == 1, warnings(logs)
            # The broker goes away: a new cause, one more warning.
            broker.stop()
            seen = len(CountingBackoff.calls)
            await until(lambda: len(CountingBackoff.calls) >= seen + 5)
            assert len(warnings(logs)) == 2, warnings(logs)
            assert "Not authorized" not in warnings(logs)[1]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            broker.stop()


async def test_a_session_taken_over_again_and_again_is_one_warning(
    mosquitto: MosquittoBroker,
) -> None:
    CountingBackoff.calls.clear()
    settings = BrokerSettings(host=mosquitto.host, port=mosquitto.port, client_id="gw-twin")
    with structlog.testing.capture_logs() as logs:
        listener = CommandListener(
            settings,
            Topics("logs", "plant-1", "gw-twin"),
            {},
            Idle(),
            backoff=CountingBackoff(),
        )
        task = asyncio.create_task(listener.run())
        try:
            # A second installation with the same client id: each connect throws the other out.
            for _ in range(4):
                await asyncio.wait_for(listener.subscribed.wait(), 10)
                async with aiomqtt.Client(
                    mosquitto.host,
                    mosquitto.port,
                    identifier="gw-twin-cmd",
                    protocol=aiomqtt.ProtocolVersion.V5,
                ):
                    await until(lambda: not listener.subscribed.is_set())
            await asyncio.wait_for(listener.subscribed.wait(), 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # Mosquitto closes the taken-over session without a reason code: one warning for the
    # lost connection, and one that points at the likely cause and names the client id.
    assert len(warnings(logs)) == 1, warnings(logs)
    (unstable,) = [e for e in logs if e["event"] == "command.listener_unstable"]
    assert unstable["log_level"] == "warning" and unstable["client_id"] == "gw-twin-cmd"
    assert "this client id" in unstable["hint"]


async def test_the_end_of_a_flood_is_logged_with_its_count_without_a_next_command(
    mosquitto: MosquittoBroker,
) -> None:
    # A platform sends a burst far over the rate limit, then nothing: the end of the flood
    # (one line with the count) must not wait for a next command that may never come.
    settings = BrokerSettings(host=mosquitto.host, port=mosquitto.port, client_id="gw-burst")
    with structlog.testing.capture_logs() as logs:
        listener = CommandListener(
            settings, Topics("logs", "plant-1", "gw-burst"), {}, Idle(), rate=0.5, burst=2
        )
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.subscribed.wait(), 10)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as platform:
                for k in range(20):
                    await platform.publish(
                        "logs/plant-1/sewing/line-1/sew-01/cmd/assign-order",
                        b'{"order_id": "PO-%d", "target": 1}' % k,
                        qos=1,
                    )
            await until(lambda: listener.dropped + listener.handled >= 20)
            await until(lambda: any(e["event"] == "command.flood_ended" for e in logs))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    (flood,) = [e for e in logs if e["event"] == "command.flood"]
    (ended,) = [e for e in logs if e["event"] == "command.flood_ended"]
    assert flood["log_level"] == "warning" and ended["log_level"] == "info"
    assert ended["dropped"] == listener.dropped >= 17, (ended, listener.dropped)
