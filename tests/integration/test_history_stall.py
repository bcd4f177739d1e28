"""The history sink at a load that once froze the gateway, and the guard against any frozen loop.

Real parts: the load simulator's Modbus devices over TCP, a real Mosquitto, a real
VictoriaMetrics as the history database, the gateway as its own process.

1. Telemetry-only machines (30 changing registers each, no state, no counters) with the
   history on and its default batching: before the fix the history runner retried
   ``take()`` without awaiting as soon as a batch's worth of connection events was counted
   but not yet committed, the loop never turned again, polling stopped and SIGTERM was
   ignored. The devices' own request log shows the polls keep their rate, and SIGTERM ends
   the process in time.
2. A sink that spins on the loop on purpose (``tests.spinning_gateway``): the loop watch
   names the stall and the task, readiness fails, and SIGTERM still ends the process within
   the shutdown deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from bench.common import load_sim, poll_figures
from gateway.runtime.gateway import SHUTDOWN_DEADLINE
from shopfloor_gateway.simulators.load import ADDR_TELEMETRY, FIXED_SIGNALS
from shopfloor_gateway.simulators.modbus_server import free_port
from tests.brokers import MosquittoBroker, VictoriaMetrics
from tests.gatewayproc import kill, start_gateway

pytestmark = pytest.mark.integration

DEVICES = 120
TAGS = 30
POLL = 0.5


def telemetry_config(
    path: Path, *, broker: int, devices: list[dict[str, object]], history: str, health: int
) -> Path:
    """The reported config: one profile of free telemetry registers, history with defaults."""
    lines = [
        "gateway: {id: gw-stall, site: plant}",
        f"broker: {{host: 127.0.0.1, port: {broker}}}",
        "logging: {level: info, format: json}",
        f"health: {{listen: '127.0.0.1:{health}'}}",
        f"state_dir: {path.parent / 'state'}",
        "profiles:",
        "  telemetry-box:",
        "    protocol: modbus",
        f"    poll_interval: {POLL}",
        "    signals:",
    ]
    for i in range(TAGS):
        lines.append(f"      t{i:02d}: {{address: {ADDR_TELEMETRY + i}, type: uint16}}")
    # The report's 500 machines counted 1,000 start-up events (connection and derived state)
    # against the default batch of 1,000; 120 machines reach the same state with 10.
    lines.append(f"influxdb: {{url: '{history}', org: plant, bucket: history, batch_size: 10}}")
    lines.append("machines:")
    for i, d in enumerate(devices):
        lines += [
            f"  - id: {d['name']}",
            "    area: hall",
            f"    line: line-{i // 50}",
            "    profile: telemetry-box",
            f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {d['port']}, "
            f"unit_id: {d['unit_id']}, timeout: 1.0}}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def health(port: int) -> tuple[int, dict[str, object]] | None:
    """``/healthz``'s code and body; ``None`` when it does not answer within 1 s."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None


async def sigterm_exit_seconds(proc: asyncio.subprocess.Process, limit: float) -> float:
    """SIGTERM, then seconds until the process exited (``inf`` past ``limit``: killed)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(limit):
            await proc.wait()
    except TimeoutError:
        await kill(proc)
        return float("inf")
    return time.monotonic() - t0


def log_events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


async def test_history_on_with_every_tag_changing_keeps_polling_and_stops_in_time(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    vm = VictoriaMetrics(tmp_path / "vm")
    vm.start()
    try:
        args = [f"--devices={DEVICES}", f"--signals={FIXED_SIGNALS + TAGS}"]
        async with load_sim(tmp_path, *args) as sim:
            health_port = free_port()
            config = telemetry_config(
                tmp_path / "gateway.yaml",
                broker=mosquitto.port,
                devices=sim.devices,
                history=vm.url,
                health=health_port,
            )
            log = tmp_path / "gateway.log"
            proc = await start_gateway(config, log)
            try:
                # Past start-up, when the connection events fill a batch in the outbox.
                async with asyncio.timeout(30):
                    while health(health_port) is None:  # noqa: ASYNC110 - polling another process
                        await asyncio.sleep(0.2)
                t0 = time.time()
                await asyncio.sleep(6 * POLL)
                t1 = time.time()
                # The loop still answers, and is not reported stalled.
                answer = await asyncio.to_thread(health, health_port)
                assert answer is not None, "the gateway stopped answering /healthz"
                took = await sigterm_exit_seconds(proc, SHUTDOWN_DEADLINE + 5)
            finally:
                await kill(proc)
        figures = poll_figures(sim.requests("ok"), POLL, t0 + POLL, t1 - POLL)
        stored = history_series(vm.url)
    finally:
        vm.stop()
    expected = DEVICES * (t1 - t0 - 2 * POLL) / POLL
    assert figures["polls"] >= 0.9 * expected, (figures, expected, log.read_text()[-3000:])
    assert figures["missed_deadlines"] <= DEVICES * 0.02, figures
    assert took <= SHUTDOWN_DEADLINE, f"SIGTERM took {took} s"
    assert proc.returncode == 0, log.read_text()[-3000:]
    events = log_events(log)
    assert [e for e in events if e.get("event") == "loop.stalled"] == []
    assert [e for e in events if e.get("event") == "gateway.task_failed"] == []
    # The history got every machine's telemetry, and its events.
    assert stored["telemetry_machines"] == DEVICES, stored
    assert stored["events"] >= DEVICES, stored


def history_series(url: str) -> dict[str, int]:
    """What the history database holds: machines with telemetry, and event points."""
    urllib.request.urlopen(url + "/internal/force_flush", timeout=10).read()
    query = urllib.parse.urlencode({"match[]": '{__name__=~"shopfloor_.*"}'})
    with urllib.request.urlopen(f"{url}/api/v1/export?{query}", timeout=10) as r:
        lines = r.read().decode().splitlines()
    machines = set()
    events = 0
    for line in lines:
        doc = json.loads(line)
        name = doc["metric"]["__name__"]
        if name == "shopfloor_telemetry_t00":
            machines.add(doc["metric"]["machine"])
        elif name == "shopfloor_machine_sequence":
            events += len(doc["values"])
    return {"telemetry_machines": len(machines), "events": events}


async def test_a_spinning_sink_is_named_and_sigterm_still_ends_the_process(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    args = ["--devices=3", f"--signals={FIXED_SIGNALS + 2}"]
    async with load_sim(tmp_path, *args) as sim:
        health_port = free_port()
        config = telemetry_config(
            tmp_path / "gateway.yaml",
            broker=mosquitto.port,
            devices=sim.devices,
            # Never reached: the runner spins before its first write.
            history=f"http://127.0.0.1:{free_port()}",
            health=health_port,
        )
        log = tmp_path / "gateway.log"
        proc = await start_gateway(config, log, module="tests.spinning_gateway")
        try:
            async with asyncio.timeout(30):
                while not any(e.get("event") == "loop.stalled" for e in log_events(log)):
                    assert proc.returncode is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.2)
            took = await sigterm_exit_seconds(proc, SHUTDOWN_DEADLINE + 10)
        finally:
            await kill(proc)
    events = log_events(log)
    stall = next(e for e in events if e.get("event") == "loop.stalled")
    assert stall["level"] == "warning"
    assert str(stall["task"]).startswith("influxdb"), stall
    assert any("spinning_gateway" in str(f) for f in stall["where"]), stall  # type: ignore[union-attr]
    assert took <= SHUTDOWN_DEADLINE + 2, f"SIGTERM took {took} s"
    assert proc.returncode == 70, (proc.returncode, log.read_text()[-3000:])
    ended = next(e for e in events if e.get("event") == "shutdown.deadline_exceeded")
    assert ended["reason"] == "SIGTERM"
