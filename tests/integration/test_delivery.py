"""Delivery guarantees end to end: real stations, the gateway process, real Mosquitto brokers.

* a broker outage mid-scenario loses nothing and keeps per-machine order;
* SIGKILL of the gateway mid-order loses nothing, sequences continue, counts stay right;
* two destinations with different routing each get exactly their share, and one broker
  being down does not hold back the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shopfloor_gateway.simulators.faultproxy import FaultProxy
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Changeover, Idle, RunOrder, Step
from shopfloor_gateway.simulators.sewing import OrderTruth, StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import by_machine, events, gateway_process, short
from tests.held import HeldStation

PREFIX = "dlv"
SITE = "plant-1"

SCRIPTS: dict[str, Sequence[Step]] = {
    "sew-01": [
        Idle(3.0),
        RunOrder("PO-1", target=24, piece_seconds=0.12, scrap_every=5),
        Changeover(0.5),
        RunOrder("PO-2", target=10, piece_seconds=0.1),
        Idle(1.0),
    ],
    "sew-02": [
        Idle(3.0),
        RunOrder("PO-3", target=30, piece_seconds=0.1),
        Changeover(0.5),
        Idle(1.0),
    ],
    "sew-03": [
        Idle(3.0),
        RunOrder("PO-4", target=16, piece_seconds=0.15, scrap_every=4),
        Idle(1.0),
    ],
}


def write_config(path: Path, destinations: Sequence[dict[str, Any]], ports: dict[str, int]) -> Path:
    """A gateway config with explicit destinations and a private state directory."""
    lines = [
        f"gateway: {{id: gw-dlv, site: {SITE}, topic_prefix: {PREFIX}}}",
        "health: {listen: null}",  # 9108 may be taken: run would refuse
        f"state_dir: {path.parent / 'state'}",
        # Live events go out within milliseconds; an outage of seconds makes them late.
        "outbox: {delayed_after: 1.0}",
        "logging: {level: debug, format: json}",
        "tracker: {progress_step_percent: 10, progress_interval: 5}",
        "destinations:",
    ]
    lines += [f"  - {json.dumps(d)}" for d in destinations]
    lines.append("machines:")
    for i, (name, port) in enumerate(ports.items()):
        lines += [
            f"  - id: {name}",
            "    area: sewing",
            f"    line: line-{1 + i % 2}",
            "    profile: sewing-station",
            "    poll_interval: 0.1",
            f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {port}, timeout: 0.5}}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def dest(name: str, broker: MosquittoBroker, **extra: Any) -> dict[str, Any]:
    return {"name": name, "host": broker.host, "port": broker.port, "keepalive": 5, **extra}


def stations(ports: dict[str, int]) -> list[StationSpec]:
    return [
        StationSpec(name, ports[name], StationModel(SCRIPTS[name], seed=1, name=name))
        for name in ports
    ]


def unique(evs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """First occurrence of every event id, and how many duplicates there were."""
    seen: set[str] = set()
    out = []
    for e in evs:
        if e["id"] not in seen:
            seen.add(e["id"])
            out.append(e)
    return out, len(evs) - len(out)


def check_stream(evs: Sequence[dict[str, Any]], truth: dict[str, dict[str, OrderTruth]]) -> None:
    """Per machine: no gap, no reordering (first occurrences), every order right."""
    for machine, stream in by_machine(evs).items():
        seqs = [e["sequence"] for e in stream]
        assert seqs == list(range(1, len(seqs) + 1)), f"{machine}: {seqs}"
        for order_id, t in truth[machine].items():
            mine = [e for e in stream if e["data"].get("order_id") == order_id]
            kinds = [short(e) for e in mine]
            assert kinds.count("order.started") == 1, (machine, order_id, kinds)
            assert kinds.count("order.completed") == 1, (machine, order_id, kinds)
            done = next(e["data"] for e in mine if short(e) == "order.completed")
            assert (done["good"], done["scrap"]) == (t.good, t.scrap), (machine, order_id)


def completed(truth: dict[str, dict[str, OrderTruth]]) -> Any:
    want = {(m, o) for m, orders in truth.items() for o in orders}

    def pred(ms: list[Received]) -> bool:
        done = {
            (e["subject"], e["data"]["order_id"])
            for e in events(ms)
            if short(e) == "order.completed"
        }
        return done >= want

    return pred


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (at most 30 s) for what only a poll can see (simulator and proxy state)."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 - the models and proxies have no events
            await asyncio.sleep(0.01)


def progress_seen(ms: list[Received]) -> bool:
    return sum(1 for e in events(ms) if short(e) == "order.progress") >= 3


async def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto")
    ports = {name: free_port() for name in SCRIPTS}
    config = write_config(tmp_path / "gw.yaml", [dest("default", broker)], ports)
    broker.start()
    try:
        async with (
            Subscriber(broker.host, broker.port, f"{PREFIX}/#", session="platform") as sub,
            SimulatedFloor(stations(ports)) as floor,
            gateway_process(config, tmp_path / "gw.log"),
        ):
            await sub.wait_for(progress_seen, timeout=20)
            broker.stop()
            # The outage itself: production goes on for this long with no broker.
            await asyncio.sleep(2.5)
            broker.start()
            await floor.wait_finished(timeout=40)
            truth = {s.name: dict(s.model.truth) for s in floor.stations}
            await sub.wait_for(completed(truth), timeout=30)
            evs, dups = unique(events(sub.messages))
            check_stream(evs, truth)
            delayed = [e for e in evs if e.get("delayed")]
            print(f"broker outage: {len(evs)} events, {dups} duplicates, {len(delayed)} delayed")
            assert delayed, "events sent after the outage carry the delayed flag"
            assert dups <= 100 * len(SCRIPTS), "duplicates only within the in-flight window"
    finally:
        broker.stop()
    log = (tmp_path / "gw.log").read_text()
    assert "Traceback" not in log


async def test_sigkill_and_restart_loses_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in SCRIPTS}
    models = {name: HeldStation(SCRIPTS[name], seed=1, name=name) for name in ports}
    specs = [StationSpec(name, ports[name], models[name]) for name in ports]
    async with contextlib.AsyncExitStack() as stack:
        sub = await stack.enter_async_context(
            Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#")
        )
        floor = await stack.enter_async_context(SimulatedFloor(specs))
        # The gateway reads each station through a proxy that notes its requests: the test
        # can see when the restarted gateway is reading again.
        proxies = {
            name: await stack.enter_async_context(
                FaultProxy("127.0.0.1", ports[name], framing="modbus")
            )
            for name in ports
        }
        via = {name: proxy.port for name, proxy in proxies.items()}
        config = write_config(tmp_path / "gw.yaml", [dest("default", mosquitto)], via)
        loop = asyncio.get_running_loop()
        async with gateway_process(config, tmp_path / "gw1.log") as proc:
            # The scripts start when the gateway reads the stations, however slow its start.
            await _until(lambda: all(p.request_times for p in proxies.values()))
            for m in models.values():
                m.release()
            await sub.wait_for(progress_seen, timeout=20)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        before = unique(events(sub.messages))[0]
        # The stations stand still until the new process reads again: however slow its
        # start on a loaded machine, it comes back in the middle of the orders it was killed
        # in (what they made between its last poll and the kill is still new to it).
        for m in models.values():
            m.hold()
        restarted = loop.time()
        async with gateway_process(config, tmp_path / "gw2.log") as proc:
            await _until(
                lambda: all(
                    p.request_times and p.request_times[-1] > restarted for p in proxies.values()
                )
            )
            for m in models.values():
                m.release()
            await floor.wait_finished(timeout=40)
            truth = {s.name: dict(s.model.truth) for s in floor.stations}
            await sub.wait_for(completed(truth), timeout=30)
            evs, dups = unique(events(sub.messages))
            print(f"SIGKILL: {len(before)} events before the kill, {len(evs)} in all, {dups} dup")
            check_stream(evs, truth)
            # Nothing the platform saw before the kill is contradicted after it.
            ids = {e["id"] for e in evs}
            assert all(e["id"] in ids for e in before)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    log2 = (tmp_path / "gw2.log").read_text()
    assert "tracker.restored" in log2
    assert "Traceback" not in log2


async def test_two_destinations_get_their_share(tmp_path: Path) -> None:
    full = MosquittoBroker(tmp_path / "full")
    only1 = MosquittoBroker(tmp_path / "only1")
    orders = MosquittoBroker(tmp_path / "orders")
    ports = {name: free_port() for name in SCRIPTS}
    config = write_config(
        tmp_path / "gw.yaml",
        [
            dest("full", full),
            dest("only1", only1, routing={"machines": ["sew-01"]}),
            dest(
                "orders",
                orders,
                routing={"machines": ["sew-02", "sew-03"], "event_types": ["order.*"]},
                batch=True,
            ),
        ],
        ports,
    )
    full.start()
    only1.start()
    # The "orders" platform subscribed once with a persistent session; its broker goes down
    # before the gateway starts. The others must not wait for it, and what the gateway sends
    # once it is back reaches the platform through its session, whenever the gateway's
    # reconnect (backoff capped at 30 s) gets there.
    orders.start()
    try:
        async with Subscriber(orders.host, orders.port, f"{PREFIX}/#", session="orders") as sub_o:
            orders.stop()
            async with (
                Subscriber(full.host, full.port, f"{PREFIX}/#") as sub_full,
                Subscriber(only1.host, only1.port, f"{PREFIX}/#") as sub_1,
                SimulatedFloor(stations(ports)) as floor,
                gateway_process(config, tmp_path / "gw.log"),
            ):
                await floor.wait_finished(timeout=40)
                truth = {s.name: dict(s.model.truth) for s in floor.stations}
                await sub_full.wait_for(completed(truth), timeout=20)
                await sub_1.wait_for(completed({"sew-01": truth["sew-01"]}), timeout=20)
                orders.start()
                want = {
                    e["id"]
                    for e in unique(events(sub_full.messages))[0]
                    if e["subject"] != "sew-01" and short(e).startswith("order.")
                }

                def batched(ms: list[Received]) -> list[dict[str, Any]]:
                    out: list[dict[str, Any]] = []
                    for m in ms:
                        if m.topic.endswith("/batch"):
                            out += json.loads(m.payload)
                        elif "/event/" in m.topic:
                            out.append(json.loads(m.payload))
                    return out

                await sub_o.wait_for(lambda ms: {e["id"] for e in batched(ms)} >= want, 45)
                got = unique(batched(sub_o.messages))[0]
                assert {e["id"] for e in got} == want
                assert any(m.topic.endswith("/batch") for m in sub_o.messages)
                assert not any("/sew-01/" in m.topic for m in sub_o.messages)
                all_evs = unique(events(sub_full.messages))[0]
                check_stream(all_evs, truth)
                mine = unique(events(sub_1.messages))[0]
                assert [e["id"] for e in mine] == [
                    e["id"] for e in all_evs if e["subject"] == "sew-01"
                ]
                states_1 = {m.topic for m in sub_1.messages if m.topic.endswith("/state")}
                assert states_1 == {f"{PREFIX}/{SITE}/sewing/line-1/sew-01/state"}
    finally:
        for b in (full, only1, orders):
            b.stop()
