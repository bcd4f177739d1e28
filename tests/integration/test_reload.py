"""Hot reload: SIGHUP re-reads the config without disturbing untouched machines."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import by_machine, events, gateway_process, short

PREFIX = "reload"
SITE = "plant-1"


def machine(name: str, port: int, poll: float = 0.1) -> str:
    return (
        f"  - {{id: {name}, area: sewing, line: line-1, profile: sewing-station,"
        f" poll_interval: {poll},"
        f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}\n"
    )


def write(path: Path, broker_port: int, machines: str) -> None:
    path.write_text(
        f"gateway: {{id: gw-reload, site: {SITE}, topic_prefix: {PREFIX}}}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        f"broker: {{host: 127.0.0.1, port: {broker_port}}}\n"
        "logging: {level: info, format: json}\n"
        "tracker: {progress_step_percent: 10, progress_interval: 1}\n"
        f"machines:\n{machines}"
    )


def log_events(log: Path, name: str) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [rec for rec in lines if rec.get("event") == name]


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def wait_log(log: Path, name: str, count: int = 1, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    # The log file is the only window into another process; poll it.
    while len(log_events(log, name)) < count:
        assert loop.time() < deadline, f"no {name!r} in the log:\n{tail(log)}"
        await asyncio.sleep(0.05)


async def test_sighup_adds_removes_and_keeps_untouched_machines(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("sew-01", "sew-02", "sew-03")}
    # sew-01 runs one long order across the reload; it must not notice anything.
    long_order = [Idle(1.0), RunOrder("PO-LONG", target=40, piece_seconds=0.15), Idle(60.0)]
    short_order = [Idle(1.0), RunOrder("PO-S", target=5, piece_seconds=0.1), Idle(60.0)]
    stations = [
        StationSpec("sew-01", ports["sew-01"], StationModel(long_order, name="sew-01")),
        StationSpec("sew-02", ports["sew-02"], StationModel(short_order, name="sew-02")),
        StationSpec("sew-03", ports["sew-03"], StationModel(short_order, name="sew-03")),
    ]
    cfg = tmp_path / "gw.yaml"
    log = tmp_path / "gw.log"
    write(
        cfg, mosquitto.port, machine("sew-01", ports["sew-01"]) + machine("sew-02", ports["sew-02"])
    )
    async with (
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
        SimulatedFloor(stations),
        gateway_process(cfg, log) as proc,
    ):

        def progressing(ms: list[Received]) -> bool:
            evs = by_machine(events(ms))
            return any(short(e) == "order.progress" for e in evs.get("sew-01", [])) and any(
                short(e) == "order.started" for e in evs.get("sew-02", [])
            )

        await sub.wait_for(progressing, timeout=15)

        # ---- an invalid config is refused; the running one stays in force
        cfg.write_text(cfg.read_text().replace("poll_interval: 0.1", "poll_interval: fast", 1))
        proc.send_signal(signal.SIGHUP)
        await wait_log(log, "config.reload_rejected")
        rejected = log_events(log, "config.reload_rejected")[0]
        assert any("poll_interval" in str(p) for p in rejected["problems"])  # type: ignore[union-attr]

        # ---- remove sew-02, add sew-03, keep sew-01 untouched
        write(
            cfg,
            mosquitto.port,
            machine("sew-01", ports["sew-01"]) + machine("sew-03", ports["sew-03"]),
        )
        proc.send_signal(signal.SIGHUP)
        await wait_log(log, "config.reloaded")
        done = log_events(log, "config.reloaded")[0]
        assert done["added"] == ["sew-03"] and done["removed"] == ["sew-02"]
        assert done["changed"] == [] and done["unchanged"] == 1

        def finished(ms: list[Received]) -> bool:
            evs = by_machine(events(ms))
            return any(short(e) == "order.completed" for e in evs.get("sew-01", [])) and any(
                short(e) == "order.completed" for e in evs.get("sew-03", [])
            )

        await sub.wait_for(finished, timeout=20)
        assert proc.returncode is None, "the gateway kept running through both reloads"

    evs = by_machine(events(sub.messages))
    sew1 = evs["sew-01"]
    # Untouched: one connection event at start, sequence without gaps, one order with the
    # full count although the config was reloaded twice while it ran.
    assert [short(e) for e in sew1].count("machine.connection.changed") == 1
    seqs = [e["sequence"] for e in sew1]
    assert seqs == list(range(1, len(seqs) + 1))
    done_long = next(e["data"] for e in sew1 if short(e) == "order.completed")
    assert done_long["order_id"] == "PO-LONG" and done_long["good"] == 40
    # Removed: told offline with the reason, and its retained state deleted.
    last = [e["data"] for e in evs["sew-02"] if short(e) == "machine.connection.changed"][-1]
    assert last == {"connected": False, "reason": "removed from config"}
    async with Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/+/+/+/+/state") as late:
        # The broker sends all retained snapshots right after the subscription.
        await late.wait_for(lambda ms: len(ms) >= 2, timeout=5)
        machines = {json.loads(m.payload)["machine"] for m in late.messages}
    assert machines == {"sew-01", "sew-03"}
