"""End to end: simulated stations over Modbus TCP → the gateway process → real Mosquitto.

The gateway runs as in production (``python -m gateway run -c FILE`` in its own process);
the test is a platform: it subscribes to the topic tree and checks the exact event stream
against what the simulator really produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Sequence
from pathlib import Path

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Changeover, Fault, Idle, RunOrder, Step, Stop
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.contract_check import assert_valid
from tests.gatewayproc import by_machine, events, gateway_process, short
from tests.held import HeldStation, state_read

PREFIX = "e2e"
SITE = "plant-1"
ROOT = Path(__file__).resolve().parents[2]

# Every script starts idle long enough for the gateway process to start and connect
# (a cold start imports pymodbus and pydantic); counts would still be right if it were
# late, because the stations count per order.
LEAD_IN = Idle(seconds=4.0)

SCRIPTS: dict[str, Sequence[Step]] = {
    "sew-01": [
        LEAD_IN,
        RunOrder("PO-1001", target=6, piece_seconds=0.15, scrap_every=4),
        Changeover(1.0),
        RunOrder("PO-1002", target=4, piece_seconds=0.15, pieces=2),
        Stop(0.8),
        RunOrder("PO-1002", target=4, piece_seconds=0.15),
        Changeover(1.0),
        Idle(1.0),
    ],
    "sew-02": [
        LEAD_IN,
        RunOrder("PO-2001", target=5, piece_seconds=0.2, pieces=3),
        Fault(0.8, alarm_code=12),
        RunOrder("PO-2001", target=5, piece_seconds=0.2),
        Changeover(1.0),
        Idle(1.0),
    ],
    "sew-03": [
        LEAD_IN,
        RunOrder("PO-3001", target=8, piece_seconds=0.1, scrap_every=3),
        Changeover(1.0),
        RunOrder("PO-3002", target=3, piece_seconds=0.2),
        Changeover(1.0),
        Idle(1.0),
    ],
}


def write_config(
    path: Path,
    broker_port: int,
    ports: dict[str, int],
    extra_machines: str = "",
    poll: float = 0.1,
) -> Path:
    """A gateway config for the stations, as a user would write it."""
    lines = [
        f"gateway: {{id: gw-e2e, site: {SITE}, topic_prefix: {PREFIX}}}",
        "health: {listen: null}",  # 9108 may be taken: run would refuse
        f"broker: {{host: 127.0.0.1, port: {broker_port}, keepalive: 5}}",
        "logging: {level: debug, format: json}",
        "tracker: {progress_step_percent: 20, progress_interval: 5}",
        "machines:",
    ]
    for i, (name, port) in enumerate(ports.items()):
        lines += [
            f"  - id: {name}",
            "    area: sewing",
            f"    line: line-{1 + i % 2}",
            "    profile: sewing-station",
            f"    poll_interval: {poll}",
            f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {port}, timeout: 0.5}}",
        ]
        if name == "sew-03":
            # A register the station does not have: the device answers ILLEGAL ADDRESS for
            # it; that one signal must go bad while the rest of the station keeps flowing.
            lines += ["    signals:", "      spindle_temp: {address: 45, type: int16}"]
    path.write_text("\n".join(lines) + "\n" + extra_machines)
    return path


async def test_scripted_floor_end_to_end(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    ports = {name: free_port() for name in SCRIPTS}
    config = write_config(tmp_path / "gateway.yaml", mosquitto.port, ports)
    stations = [
        StationSpec(name, ports[name], StationModel(script, seed=1, name=name))
        for name, script in SCRIPTS.items()
    ]
    status_topic = f"{PREFIX}/{SITE}/gateway/gw-e2e/status"
    async with (
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
        SimulatedFloor(stations) as floor,
        gateway_process(config, tmp_path / "gateway.log") as proc,
    ):
        # All three stations connected (and the gateway online) before the orders start.
        await sub.wait_for(
            lambda ms: (
                {
                    e["subject"]
                    for e in events(ms)
                    if short(e) == "machine.connection.changed" and e["data"]["connected"]
                }
                == set(SCRIPTS)
            ),
            timeout=15,
        )
        await floor.wait_finished(timeout=30)
        truth = {s.name: s.model.truth for s in floor.stations}

        def all_completed(ms: list[Received]) -> bool:
            done = {
                (e["subject"], e["data"]["order_id"])
                for e in events(ms)
                if short(e) == "order.completed"
            }
            return done == {(m, o) for m, orders in truth.items() for o in orders}

        await sub.wait_for(all_completed, timeout=10)

        # Let the last state snapshots (idle) arrive.
        def all_idle(ms: list[Received]) -> bool:
            latest = {m.topic: json.loads(m.payload) for m in ms if m.topic.endswith("/state")}
            return len(latest) == 3 and all(v["state"] == "idle" for v in latest.values())

        await sub.wait_for(all_idle, timeout=10)
        received = list(sub.messages)

        # ---- every message follows the published contract (docs/contract/*.json)
        assert assert_valid(received) > 50

        # ---- the event stream, per machine
        evs = events(received)
        assert len({e["id"] for e in evs}) == len(evs), "event ids are unique"
        for machine, stream in by_machine(evs).items():
            seqs = [e["sequence"] for e in stream]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{machine}: gaps {seqs}"
            assert seqs[0] == 1, f"{machine}: the subscriber saw the gateway's first event"
            for e in stream:
                assert e["specversion"] == "1.0"
                assert e["source"].endswith(f"/{machine}")
                assert e["time"].endswith("Z")
            for order_id, t in truth[machine].items():
                mine = [e for e in stream if e["data"].get("order_id") == order_id]
                kinds = [short(e) for e in mine]
                assert kinds.count("order.started") == 1, (machine, order_id, kinds)
                assert kinds.count("order.completed") == 1, (machine, order_id, kinds)
                started = kinds.index("order.started")
                completed = kinds.index("order.completed")
                assert started < completed
                done = mine[completed]["data"]
                assert done["reason"] == "target_reached"
                assert (done["good"], done["scrap"]) == (t.good, t.scrap), (machine, order_id)
                assert done["target"] == t.target
                progress = [e["data"] for e in mine if short(e) == "order.progress"]
                assert progress, f"{machine}/{order_id}: no progress events"
                goods = [p["good"] for p in progress]
                scraps = [p["scrap"] for p in progress]
                assert goods == sorted(goods) and scraps == sorted(scraps)
                assert all(p["good"] <= t.good for p in progress)
            states = [e["data"]["state"] for e in stream if short(e) == "machine.state.changed"]
            assert "running" in states and states[-1] == "idle", (machine, states)
        sew1 = [e["data"]["state"] for e in by_machine(evs)["sew-01"] if "state" in short(e)]
        assert "stopped" in sew1, "the operator stop of sew-01 was reported"
        sew2 = by_machine(evs)["sew-02"]
        assert "fault" in [e["data"].get("state") for e in sew2]
        assert any(short(e) == "machine.alarm.raised" and e["data"]["code"] == 12 for e in sew2), (
            "the fault's alarm code was reported"
        )

        # ---- the operator badge is personal data and never leaves the gateway
        badge_values = {s.model.snapshot().operator for s in floor.stations} - {""}
        for m in received:
            for badge in badge_values:
                assert badge.encode() not in m.payload, f"operator badge leaked on {m.topic}"

        # ---- a late subscriber gets the retained state of every machine and the status
        async with Subscriber(
            mosquitto.host, mosquitto.port, f"{PREFIX}/{SITE}/+/+/+/state"
        ) as late:
            await late.wait_for(lambda ms: len(ms) == 3, timeout=5)
            snapshots = {
                json.loads(m.payload)["machine"]: json.loads(m.payload) for m in late.messages
            }
        assert all(m.retain for m in late.messages)
        for machine, snap in snapshots.items():
            last_order = list(truth[machine])[-1]
            assert snap["state"] == "idle"
            assert snap["connected"] is True
            assert snap["order"]["order_id"] == last_order
            assert snap["order"]["good"] == truth[machine][last_order].good
            assert snap["location"] == {
                "site": SITE,
                "area": "sewing",
                "line": snap["location"]["line"],
                "machine": machine,
            }
        async with Subscriber(mosquitto.host, mosquitto.port, status_topic) as st:
            await st.wait_for(lambda ms: len(ms) == 1, timeout=5)
            assert json.loads(st.messages[0].payload)["status"] == "online"

        # ---- killed without a goodbye: the broker's last will flips the status
        async with Subscriber(mosquitto.host, mosquitto.port, status_topic) as st:
            await st.wait_for(lambda ms: len(ms) == 1, timeout=5)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await st.wait_for(
                lambda ms: json.loads(ms[-1].payload)["status"] == "offline", timeout=10
            )
            assert json.loads(st.messages[-1].payload)["reason"] == "connection lost"


async def _silent_device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Accepts the TCP connection and reads requests, but never answers: a hung PLC.
    with contextlib.suppress(ConnectionError):
        while await reader.read(1024):
            pass
    writer.close()


async def test_bad_devices_do_not_stop_the_others(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ports = {"sew-01": free_port()}
    silent = await asyncio.start_server(_silent_device, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    dead_port = free_port()  # nothing listens here
    extra = (
        f"  - {{id: hung-01, area: sewing, line: line-9, profile: sewing-station,"
        f" poll_interval: 0.1, connection: {{protocol: modbus, host: 127.0.0.1,"
        f" port: {silent_port}, timeout: 0.3}}}}\n"
        f"  - {{id: dead-01, area: sewing, line: line-9, profile: sewing-station,"
        f" poll_interval: 0.1, connection: {{protocol: modbus, host: 127.0.0.1,"
        f" port: {dead_port}, timeout: 0.3}}}}\n"
    )
    config = write_config(tmp_path / "gateway.yaml", mosquitto.port, ports, extra)
    script = [Idle(0.5), RunOrder("PO-9", target=10, piece_seconds=0.1), Idle(1.0)]
    # The order starts once the gateway has read the idle station, however long its start.
    station = HeldStation(script, seed=1, name="sew-01")
    stations = [StationSpec("sew-01", ports["sew-01"], station)]
    async with (
        silent,
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
        SimulatedFloor(stations) as floor,
        gateway_process(config, tmp_path / "gateway.log"),
    ):
        await sub.wait_for(state_read("sew-01"), timeout=30)
        station.release()
        await floor.wait_finished(timeout=30)

        def done(ms: list[Received]) -> bool:
            # The order's end, and both bad devices reported: the three machines are
            # polled independently, so on a loaded machine either may come last.
            evs = by_machine(events(ms))
            return any(short(e) == "order.completed" for e in evs["sew-01"]) and all(
                any(short(e) == "machine.connection.changed" for e in evs[bad])
                for bad in ("hung-01", "dead-01")
            )

        await sub.wait_for(done, timeout=15)
        evs = by_machine(events(sub.messages))
        done = next(e for e in evs["sew-01"] if short(e) == "order.completed")
        assert done["data"]["good"] == 10
        for bad in ("hung-01", "dead-01"):
            conn = [e["data"] for e in evs[bad] if short(e) == "machine.connection.changed"]
            assert conn and conn[0]["connected"] is False, (bad, conn)
            # Reported once per outage, not once per retry: a device that takes the TCP
            # connection but never answers is not "connected".
            assert len(conn) == 1, (bad, conn)
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log
    warnings = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    unreachable = [w for w in warnings if w.get("event") == "device.unreachable"]
    assert {w["machine"] for w in unreachable} == {"hung-01", "dead-01"}
    assert len(unreachable) == 2, "one warning per device per outage"


async def test_unreachable_broker_at_start_then_clean_shutdown(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto")
    ports = {"sew-01": free_port()}
    config = write_config(tmp_path / "gateway.yaml", broker.port, ports)
    script = [Idle(0.5), RunOrder("PO-7", target=5, piece_seconds=0.1), Idle(30.0)]
    stations = [StationSpec("sew-01", ports["sew-01"], StationModel(script, seed=1, name="sew-01"))]
    log_path = tmp_path / "gateway.log"
    status = f"{PREFIX}/{SITE}/gateway/gw-e2e/status"
    broker.start()
    try:
        # A platform with a persistent session subscribed before the outage: the broker
        # keeps its subscription and queues what arrives for it while it is away.
        async with Subscriber(broker.host, broker.port, f"{PREFIX}/#", session="platform") as sub:
            broker.stop()
            async with (
                SimulatedFloor(stations),
                gateway_process(config, log_path) as proc,
            ):
                # The order runs and completes while no broker is reachable.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while "order.completed" not in log_path.read_text():
                    assert proc.returncode is None, "the gateway must not exit without a broker"
                    assert loop.time() < deadline, log_path.read_text()[-2000:]
                    await asyncio.sleep(0.1)
                broker.start()
                await sub.wait_for(
                    lambda ms: any(short(e) == "order.completed" for e in events(ms)),
                    timeout=40,
                )
                kinds = [short(e) for e in events(sub.messages)]
                assert kinds.count("order.started") == 1
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(proc.wait(), timeout=10)
                assert code == 0
                await sub.wait_for(
                    lambda ms: any(
                        m.topic == status and json.loads(m.payload)["status"] == "offline"
                        for m in ms
                    ),
                    timeout=5,
                )
                offline = [json.loads(m.payload) for m in sub.messages if m.topic == status]
                assert offline[-1]["reason"] == "shutdown"
                # The goodbye says when the gateway stopped, not when it started.
                assert offline[-1]["time"] > offline[-1]["started_at"], offline[-1]
    finally:
        broker.stop()
    log = log_path.read_text()
    assert "Traceback" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    outage = [
        rec
        for rec in lines
        if rec.get("level") == "warning" and str(rec.get("event", "")).startswith("mqtt.")
    ]
    assert len(outage) == 1, f"one warning for the broker outage, got {outage}"
