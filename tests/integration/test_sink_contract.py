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

An output without a sink runner (a Sparkplug B edge node, ``format: sparkplug``) runs its own
session and is fed through its :class:`~gateway.delivery.registry.Observer`; the
``observed`` fixture runs the cases of the contract that apply to it, built through the
registry from a config: values fed in order arrive in order; an outage of the destination
loses nothing (what was held comes afterwards, flagged historical, in order); it reports its
state; close ends within its grace, with the broker up (announcing its end) or down. There
is no acknowledgement to check: Sparkplug B publishes BIRTH and DATA at QoS 0.
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
from gateway.config.loader import load_config
from gateway.contract.envelope import Topics
from gateway.core.backoff import Backoff
from gateway.core.model import Sample
from gateway.delivery import registry
from gateway.delivery.influx.sink import InfluxSink, history_runner
from gateway.delivery.mqtt.publisher import BrokerSettings, Message, MqttPublisher
from gateway.delivery.outbox import Outbox
from gateway.delivery.sendqueue import MemorySinkQueue
from gateway.delivery.sink import RunnerSettings, SinkRunner
from gateway.delivery.sparkplug import codec
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


#: Kinds whose outputs have no sink runner: fed through their observer (``observed``).
OBSERVED = ("sparkplug",)


def test_every_registered_kind_is_covered() -> None:
    assert set(registry.kinds()) == set(HARNESSES) | set(OBSERVED)


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


# ---------------------------------------------------------------- outputs fed by observers


class ObservedDestination(Protocol):
    """A real destination and an output of the registry that has only an observer."""

    kind: str
    output: registry.Output

    def feed(self, i: int) -> None:
        """Value number ``i`` of one machine's poll, handed to the output's observer."""
        ...

    def state(self) -> dict[str, Any]:
        """What the output reports about itself (at least ``connected``)."""
        ...

    async def changed(self) -> None:
        """Wait until the output's state may have changed."""
        ...

    async def received(self) -> list[tuple[int, bool]]:
        """The values the destination took, in order, each with whether it came as history."""
        ...

    async def ended(self) -> None:
        """Wait until the destination saw the output announce its end."""
        ...

    def stop(self) -> None:
        """Take the destination away."""
        ...

    def restart(self) -> None:
        """Bring it back on the same address."""
        ...


class SparkplugDestination:
    """Mosquitto, a ``format: sparkplug`` destination built by the registry, and a watcher.

    The broker queues QoS 0 for the watcher's persistent session, so it also sees what the
    node sends right after a restart, before the watcher is back.
    """

    kind = "sparkplug"
    T0 = 1_700_000_000.0

    def __init__(self, broker: MosquittoBroker, watcher: Subscriber, tmp_path: Path) -> None:
        self.broker = broker
        self.watcher = watcher
        # The runtime's state directory exists (the outbox lives there): bdSeq is kept there.
        (tmp_path / "state").mkdir()
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "gateway: {id: gw-1, site: plant-1}\n"
            f"state_dir: {tmp_path / 'state'}\n"
            "health: {listen: null}\n"
            "destinations:\n"
            f"  - {{name: cloud, host: {broker.host}, port: {broker.port}}}\n"
            f"  - {{name: spb, host: {broker.host}, port: {broker.port}, format: sparkplug,"
            " group_id: g, edge_node_id: e}\n"
            "machines:\n"
            "  - {id: m1, area: a, line: l, profile: sewing-station,"
            " connection: {protocol: modbus, host: 127.0.0.1, port: 5020}}\n"
        )
        self.plan = load_config(cfg, env={})
        assert self.plan.outbox is not None
        wiring = registry.Wiring(
            plan=self.plan,
            outbox=Outbox(self.plan.outbox.path, ["cloud"]),
            topics=Topics(prefix="shopfloor", site="plant-1", gateway_id="gw-1"),
            started_at=time.time(),
            clock=time.time,
            secret=None,
            delayed_after=60.0,
            outbox_limit=1000,
        )
        (self.output,) = registry.kinds()["sparkplug"].build(wiring)
        assert self.output.runner is None and self.output.observer is not None
        self.observer = self.output.observer
        ((_, self.node),) = self.observer.nodes.nodes  # type: ignore[attr-defined]

    def feed(self, i: int) -> None:
        (machine,) = self.plan.machines
        self.observer.samples(machine, [Sample("m1", "n", i, self.T0 + i)], self.T0 + i)

    def state(self) -> dict[str, Any]:
        health: dict[str, Any] = self.node.health()
        return health

    async def changed(self) -> None:
        self.node.changed.clear()
        await self.node.changed.wait()

    async def received(self) -> list[tuple[int, bool]]:
        # The first DBIRTH's value, then every DDATA's (aliases from the births).
        values: list[tuple[int, bool]] = []
        alias: int | None = None
        for m in self.watcher.messages:
            kind = m.topic.split("/")[2]
            if kind == "DBIRTH":
                (n,) = [x for x in codec.decode(m.payload).metrics if x.name == "n"]
                alias = n.alias
                if not values:
                    values.append((int(n.value), n.is_historical))  # type: ignore[arg-type]
            elif kind == "DDATA":
                for x in codec.decode(m.payload).metrics:
                    if x.name == "n" or (x.alias is not None and x.alias == alias):
                        values.append((int(x.value), x.is_historical))  # type: ignore[arg-type]
        return values

    async def ended(self) -> None:
        await self.watcher.wait_for(lambda ms: any(m.topic == "spBv1.0/g/NDEATH/e" for m in ms))

    def stop(self) -> None:
        self.broker.stop()

    def restart(self) -> None:
        self.broker.start()


@pytest.fixture(params=OBSERVED)
async def observed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ObservedDestination]:
    """Each kind of output fed by its observer, with its real destination (stopped after)."""
    assert request.param == "sparkplug"
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config="queue_qos0_messages true")
    broker.start()
    try:
        async with Subscriber(
            broker.host, broker.port, "spBv1.0/#", session=f"contract-watch-{broker.port}"
        ) as watcher:
            yield SparkplugDestination(broker, watcher, tmp_path)
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def observing(dest: ObservedDestination, grace: float = 3.0) -> AsyncIterator[None]:
    """Run the output's own tasks, as the runtime does, and close it afterwards."""
    assert dest.output.observer is not None
    tasks = dest.output.observer.start()
    try:
        await observed_until(dest, lambda: dest.state()["connected"], "connected")
        yield
    finally:
        await dest.output.observer.close(grace)
        async with asyncio.timeout(grace + 2):
            await asyncio.gather(*tasks, return_exceptions=True)


async def observed_until(
    dest: ObservedDestination,
    cond: Callable[[], object],
    what: str,
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound for the test
) -> None:
    """Wait until ``cond()`` holds, woken by the output's own change notification."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await dest.changed()
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}; state {dest.state()}") from None


async def values(dest: ObservedDestination, count: int) -> list[tuple[int, bool]]:
    """What the destination took, once it holds at least ``count`` values."""
    async with asyncio.timeout(10):
        while len(got := await dest.received()) < count:  # noqa: ASYNC110 - as holds()
            await asyncio.sleep(0.02)
    return got


async def test_observed_delivers_in_order(observed: ObservedDestination) -> None:
    async with observing(observed):
        for i in range(50):
            observed.feed(i)
        got = await values(observed, 50)
    assert got == [(i, False) for i in range(50)]


async def test_observed_loses_nothing_in_an_outage(observed: ObservedDestination) -> None:
    async with observing(observed):
        for i in range(20):
            observed.feed(i)
        await values(observed, 20)
        observed.stop()
        await observed_until(observed, lambda: not observed.state()["connected"], "link lost")
        for i in range(20, 40):
            observed.feed(i)
        observed.restart()
        got = await values(observed, 40)
    # Live values first, then what was held while the destination was away, as history.
    assert got == [(i, False) for i in range(20)] + [(i, True) for i in range(20, 40)]


async def test_observed_reports_its_state(observed: ObservedDestination) -> None:
    async with observing(observed):
        observed.feed(0)
        await values(observed, 1)
        state = observed.state()
        assert state["connected"] is True and state["published"] >= 2
        assert state["feed_errors"] == 0 and state["last_error"] is None
        observed.stop()
        await observed_until(observed, lambda: not observed.state()["connected"], "link lost")
        observed.feed(1)
        assert observed.state()["held"] == 1
        assert observed.state()["last_error"]
        observed.restart()
        await observed_until(
            observed, lambda: observed.state()["connected"] and not observed.state()["held"], "back"
        )


async def test_observed_announces_its_close(observed: ObservedDestination) -> None:
    async with observing(observed):
        observed.feed(0)
        await values(observed, 1)
    await observed.ended()


async def test_observed_closes_within_grace(observed: ObservedDestination) -> None:
    assert observed.output.observer is not None
    tasks = observed.output.observer.start()
    await observed_until(observed, lambda: observed.state()["connected"], "connected")
    observed.stop()
    await observed_until(observed, lambda: not observed.state()["connected"], "link lost")
    observed.feed(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        await observed.output.observer.close(0.5)
        await asyncio.gather(*tasks, return_exceptions=True)
    assert loop.time() - started < 0.5 + 0.5
    assert all(t.done() for t in tasks)
