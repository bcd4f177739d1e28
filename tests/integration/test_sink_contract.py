"""One contract, every sink: the same test bodies run over each kind of output in the registry.

Parametrised the way asyncua's ``tests/conftest.py`` runs one test body over both of its
history backends: the ``destination`` fixture is a real Mosquitto (the MQTT sink) or a real
victoria-metrics (the InfluxDB history sink, through its v2 write API), wrapped in a small
harness that makes records, reads back what the destination stored, and stops and restarts
it. A kind added to :mod:`gateway.delivery.registry` without a harness here fails
:func:`test_every_registered_kind_is_covered`.

The contract: a batch is delivered in order; a record is acknowledged to the queue only once
the destination took it; the destination going away and coming back loses nothing; the
runner reports its state; close ends within its grace, keeping what it could not send.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from gateway.config.influx import InfluxConfig
from gateway.core.backoff import Backoff
from gateway.delivery import registry
from gateway.delivery.influx.sink import InfluxSink, history_runner
from gateway.delivery.mqtt.publisher import BrokerSettings, Message, MqttPublisher
from gateway.delivery.sendqueue import MemorySinkQueue
from gateway.delivery.sink import RunnerSettings, SinkRunner
from tests.brokers import MosquittoBroker, Subscriber, VictoriaMetrics

pytestmark = pytest.mark.integration

FAST = Backoff(base=0.01, cap=0.05, floor=0.005)
_clients = itertools.count()


class RecordingQueue(MemorySinkQueue[Any]):
    """A memory queue that remembers which keys were acknowledged, in order."""

    def __init__(self) -> None:
        super().__init__(100_000)
        self.acked: list[int] = []

    def ack(self, key: int) -> None:
        if key in self._inflight:
            self.acked.append(key)
        super().ack(key)


class Destination(Protocol):
    """A real destination and the sink that writes to it."""

    kind: str

    def runner(self, queue: RecordingQueue) -> SinkRunner[Any]:
        """The runner with this kind's sink, draining ``queue``."""
        ...

    def record(self, i: int) -> Any:
        """Record number ``i`` as this sink takes it."""
        ...

    async def received(self) -> list[int]:
        """The record numbers the destination holds, in the order it took them."""
        ...

    def stop(self) -> None:
        """Take the destination away."""
        ...

    def restart(self) -> None:
        """Bring it back on the same address, with what it had stored."""
        ...


class MqttDestination:
    """Mosquitto, with a persistent subscriber that sees every message the broker took."""

    kind = "mqtt"

    def __init__(self, broker: MosquittoBroker, subscriber: Subscriber) -> None:
        self.broker = broker
        self.subscriber = subscriber

    def runner(self, queue: RecordingQueue) -> SinkRunner[Any]:
        settings = BrokerSettings(
            host=self.broker.host,
            port=self.broker.port,
            client_id=f"contract-{next(_clients)}",
            status_topic="contract/status",
            online_payload=b"online",
            will_payload=b"offline",
            offline_payload=b"offline",
            backoff=FAST,
            connect_timeout=2.0,
            window=20,
        )
        return MqttPublisher(settings, name="contract", queue=queue)

    def record(self, i: int) -> Any:
        return Message("contract/records", str(i).encode(), 1, False)

    async def received(self) -> list[int]:
        # At least once: a message resent after a lost PUBACK may arrive twice; its first
        # arrival is where it belongs in the order.
        seen: dict[int, None] = {}
        for payload in self.subscriber.payloads("contract/records"):
            seen.setdefault(int(payload), None)
        return list(seen)

    def stop(self) -> None:
        self.broker.stop()

    def restart(self) -> None:
        self.broker.start()


class InfluxDestination:
    """victoria-metrics taking InfluxDB v2 writes; records read back ordered by their time."""

    kind = "influxdb"

    def __init__(self, vm: VictoriaMetrics) -> None:
        self.vm = vm
        # Whole seconds apart from other runs; one millisecond apart from each other.
        self.t0 = int(time.time()) * 1000

    def runner(self, queue: RecordingQueue) -> SinkRunner[Any]:
        config = InfluxConfig(
            url=self.vm.url, org="factory", bucket="shopfloor", token="secret", timeout=2.0
        )
        settings = RunnerSettings(
            batch_size=7, flush_interval=0.02, backoff=FAST, write_timeout=5.0
        )
        return history_runner(InfluxSink(config), name="contract", settings=settings, queue=queue)

    def record(self, i: int) -> Any:
        # A finished line, as the telemetry path hands the sink.
        return f"contract_record,machine=m1 n={float(i)!r} {self.t0 + i}"

    async def received(self) -> list[int]:
        rows = await asyncio.to_thread(self.vm.export, '{__name__="contract_record_n"}')
        pairs = sorted(
            (t, int(v)) for r in rows for t, v in zip(r["timestamps"], r["values"], strict=True)
        )
        return [v for _, v in pairs]

    def stop(self) -> None:
        self.vm.stop()

    def restart(self) -> None:
        self.vm.start()


HARNESSES = ("mqtt", "influxdb")


@pytest.fixture(params=HARNESSES)
async def destination(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Destination]:
    """Each kind of sink with its real destination (stopped after the test)."""
    if request.param == "mqtt":
        broker = MosquittoBroker(tmp_path / "mosquitto")
        broker.start()
        try:
            async with Subscriber(
                broker.host, broker.port, "contract/#", session=f"contract-sub-{broker.port}"
            ) as sub:
                yield MqttDestination(broker, sub)
        finally:
            broker.stop()
    else:
        vm = VictoriaMetrics(tmp_path / "vm")
        vm.start()
        try:
            yield InfluxDestination(vm)
        finally:
            vm.stop()


def test_every_registered_kind_is_covered() -> None:
    assert set(registry.kinds()) == set(HARNESSES)


@contextlib.asynccontextmanager
async def running(runner: SinkRunner[Any], grace: float = 3.0) -> AsyncIterator[None]:
    task = asyncio.create_task(runner.run(), name="contract-runner")
    try:
        yield
    finally:
        await runner.close(timeout=grace)
        async with asyncio.timeout(grace + 2):
            await task


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until ``cond()`` holds (runner state has no change notification)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def holds(dest: Destination, want: list[int], timeout: float = 10.0) -> list[int]:  # noqa: ASYNC109
    """What the destination holds, once it holds at least ``want`` (stores may lag a write)."""
    async with asyncio.timeout(timeout):
        while True:
            got = await dest.received()
            if len(got) >= len(want):
                return got
            await asyncio.sleep(0.02)


class States:
    """A :class:`~gateway.delivery.reporting.DestinationStates` that keeps the last report."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def destination_state(self, name: str, **fields: Any) -> None:
        self.last = {"name": name, **fields}


async def test_delivers_a_batch_in_order(destination: Destination) -> None:
    queue = RecordingQueue()
    runner = destination.runner(queue)
    async with running(runner):
        for i in range(50):
            runner.submit(destination.record(i))
        assert await runner.flush(10)
    assert await holds(destination, list(range(50))) == list(range(50))
    assert queue.acked == sorted(queue.acked) and len(set(queue.acked)) == 50
    assert len(queue) == 0 and runner.written >= 50


async def test_acknowledges_only_what_the_destination_took(destination: Destination) -> None:
    queue = RecordingQueue()
    runner = destination.runner(queue)
    destination.stop()
    async with running(runner):
        for i in range(10):
            runner.submit(destination.record(i))
        await until(lambda: runner.failures >= 2)
        # Tried and failed: nothing is acknowledged, everything is still held.
        assert queue.acked == []
        assert len(queue) == 10
        destination.restart()
        assert await runner.flush(15)
    assert sorted(queue.acked) == list(range(1, 11))
    assert await holds(destination, list(range(10))) == list(range(10))


async def test_survives_the_destination_going_away_and_coming_back(
    destination: Destination,
) -> None:
    queue = RecordingQueue()
    runner = destination.runner(queue)
    async with running(runner):
        for i in range(20):
            runner.submit(destination.record(i))
        assert await runner.flush(10)
        failures = runner.failures
        destination.stop()
        for i in range(20, 40):
            runner.submit(destination.record(i))
        await until(lambda: runner.failures > failures)
        destination.restart()
        assert await runner.flush(15)
    assert await holds(destination, list(range(40))) == list(range(40))


async def test_reports_its_state(destination: Destination) -> None:
    queue = RecordingQueue()
    runner = destination.runner(queue)
    states = States()
    async with running(runner):
        for i in range(5):
            runner.submit(destination.record(i))
        assert await runner.flush(10)
        runner.report(states)
        assert states.last["name"] == "contract"
        assert states.last["connected"] is True
        assert (states.last["backlog"], states.last["oldest_age"]) == (0, None)
        assert states.last["published_total"] >= 5
        assert states.last["required"] is runner.sink.required
        destination.stop()
        runner.submit(destination.record(5))
        await until(lambda: not runner.connected)
        runner.report(states)
        assert states.last["connected"] is False
        assert states.last["backlog"] == 1
        assert states.last["oldest_age"] is not None and states.last["oldest_age"] >= 0
        assert runner.last_error
        destination.restart()
        assert await runner.flush(15)
        runner.report(states)
        assert states.last["connected"] is True and states.last["backlog"] == 0


async def test_closes_within_grace(destination: Destination) -> None:
    queue = RecordingQueue()
    runner = destination.runner(queue)
    task = asyncio.create_task(runner.run())
    for i in range(3):
        runner.submit(destination.record(i))
    assert await runner.flush(10)
    destination.stop()
    for i in range(3, 8):
        runner.submit(destination.record(i))
    await until(lambda: runner.failures >= 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        await runner.close(timeout=0.5)
        await task
    assert loop.time() - started < 0.5 + 0.5
    # Not sent, not lost: still in the queue (an outbox keeps it for the next start).
    assert len(queue) == 5 and queue.in_flight == 0
    assert [queue.take() for _ in range(5)] == [(k, destination.record(k - 1)) for k in range(4, 9)]
    destination.restart()
