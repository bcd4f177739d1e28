"""The chaos campaign: the real gateway under randomised faults, judged by an outside checker.

    python -m tests.chaos.campaign --seed 1 --seconds 1500 --json var/chaos.json
    make chaos CHAOS_SECONDS=600 CHAOS_SEED=3

Runs the gateway as its own process (``python -m gateway run``) against simulated sewing
stations and two counter boxes behind fault proxies, two Mosquitto brokers (two platforms:
``acme`` and the hostile ``zeta``), a slow InfluxDB v2 write endpoint and a state directory
on a small real tmpfs. Time is cut into episodes; each draws faults from the catalogue
(``tests/chaos/faults.py``) with the seed, heals them, lets the gateway settle and has the
checker (``tests/chaos/checker.py``) judge everything received so far. The report
(``--json``) lists the episodes, the faults drawn, the invariants and each violation with
its evidence. Exit status 0 when no invariant was violated.

Needs root (it mounts a tmpfs) and Mosquitto. See tests/chaos/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from shopfloor_gateway.simulators.faultproxy import FaultProxy, parse_command
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker
from tests.chaos import faults
from tests.chaos.checker import INVARIANTS, Checker, Recorder

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "chaos"
SITE = "plant-x"
AREA = "sewing"
LINE = "line-1"
SEWING = ["sew-01", "sew-02", "sew-03"]
BOXES = ["box-01", "box-02"]
OWN_IDS = {
    "acme": re.compile(r"\b(?:ACME-\d+|PO-\d+)\b"),
    "zeta": re.compile(r"\bZETA-[A-Za-z0-9-]*[A-Za-z0-9]\b"),
}


def _rss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmRSS:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


class Platform:
    """A platform's command client on its own broker (paho-mqtt, QoS 1)."""

    def __init__(self, name: str, broker: MosquittoBroker, recorder: Recorder, checker: Checker):
        """Connect lazily in ``start()``; answers come through the platform's recorder."""
        self.name = name
        self.broker = broker
        self.checker = checker
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"platform-{name}")
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.max_queued_messages_set(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        recorder.on_answer = self._answer
        self.counter = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect and start paho's thread."""
        self._loop = loop
        self.client.connect(self.broker.host, self.broker.port, keepalive=5)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def _answer(self, answer: dict[str, Any]) -> None:
        cid = answer.get("command_id")
        fut = self._waiting.get(cid) if isinstance(cid, str) else None
        if fut is not None and self._loop is not None:

            def resolve(f: asyncio.Future[dict[str, Any]] = fut) -> None:
                if not f.done():
                    f.set_result(answer)

            self._loop.call_soon_threadsafe(resolve)

    def topic(self, machine: str, command: str) -> str:
        """The command topic of a machine."""
        return f"{PREFIX}/{SITE}/{AREA}/{LINE}/{machine}/cmd/{command}"

    def publish(self, machine: str, command: str, body: dict[str, Any], qos: int = 1) -> None:
        """Publish a command without waiting (recorded for the checker)."""
        self.checker.note_sent(self.name, machine, command, body)
        self.client.publish(self.topic(machine, command), json.dumps(body), qos=qos)

    async def command(
        self, machine: str, command: str, body: dict[str, Any], *, tries: int = 4, wait: float = 3
    ) -> dict[str, Any] | None:
        """Send and resend (same command id, as the contract says) until answered."""
        cid = str(body["command_id"])
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        try:
            for _ in range(tries):
                self.publish(machine, command, body)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        return await asyncio.shield(fut)
            return None
        finally:
            self._waiting.pop(cid, None)


class Campaign:
    """Everything one campaign runs, and the loop of episodes."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Prepare from the command line (nothing starts yet)."""
        self.args = args
        self.rng = random.Random(args.seed)
        # Absolute: the gateway resolves a relative state_dir against its config's folder.
        self.work = Path(args.workdir).resolve()
        self.state_dir = self.work / "state"
        self.tmpfs = faults.Tmpfs(self.state_dir, args.tmpfs_size)
        # A campaign starts from nothing: an earlier run's broker sessions, retained
        # messages or log would be taken for this run's.
        for old in ("broker-acme", "broker-zeta"):
            shutil.rmtree(self.work / old, ignore_errors=True)
        (self.work / "gateway.log").unlink(missing_ok=True)
        self.brokers = {
            "acme": MosquittoBroker(self.work / "broker-acme"),
            "zeta": MosquittoBroker(self.work / "broker-zeta"),
        }
        self.influx = faults.SlowInflux()
        self.health_port = free_port()
        self.models: dict[str, StationModel] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.expect_exit = False
        #: Faults that stop and start the process take turns: two at once would start two.
        self.proc_lock = asyncio.Lock()
        self.all_procs: list[asyncio.subprocess.Process] = []
        self.episode = 0
        self.rss_peak = 0
        self.rss_episode_peak = 0
        self.rss_samples: list[int] = []
        self.episodes: list[dict[str, Any]] = []
        self.restarts = 0
        self.log_path = self.work / "gateway.log"
        self.quick_exits = 0
        self.started_at = 0.0
        self.acme_running: dict[str, str] = {}
        self.acme_orders: dict[str, str] = {}
        #: acme's orders taken off a queue before they ran (their ids stay acme's).
        self.acme_withdrawn: dict[str, str] = {}
        self.notes: list[str] = []
        self.recorders = {
            name: Recorder(name, b.host, b.port, PREFIX) for name, b in self.brokers.items()
        }
        self.checker = Checker(self.recorders, own_ids=OWN_IDS, device_machines=SEWING)
        self.platforms = {
            name: Platform(name, b, self.recorders[name], self.checker)
            for name, b in self.brokers.items()
        }

    # -- the gateway process --------------------------------------------------------------

    def write_config(self) -> Path:
        """The gateway config: two order-scoped destinations, history, five machines."""

        def dest(name: str, routing: dict[str, Any], protocol: str) -> str:
            b = self.brokers[name]
            return json.dumps(
                {
                    "name": name,
                    "host": b.host,
                    "port": b.port,
                    "protocol": protocol,
                    "keepalive": 5,
                    "client_id": f"gw-chaos-{name}",
                    "routing": routing,
                }
            )

        lines = [
            f"gateway: {{id: gw-chaos, site: {SITE}, topic_prefix: {PREFIX}}}",
            f"state_dir: {self.state_dir}",
            "logging: {level: info, format: json}",
            f"health: {{listen: '127.0.0.1:{self.health_port}'}}",
            "tracker: {progress_step_percent: 10, progress_interval: 5}",
            *(
                [
                    f"influxdb: {{url: 'http://127.0.0.1:{self.influx.port}', org: chaos,"
                    " bucket: chaos, timeout: 2, flush_interval: 1, max_queue: 1000}"
                ]
                if self.args.history
                else []
            ),
            "destinations:",
            f"  - {dest('acme', {'customers': ['acme'], 'order_ids': ['PO-*']}, '3.1.1')}",
            f"  - {dest('zeta', {'customers': ['zeta']}, '5')}",
            "machines:",
        ]
        for name in SEWING:
            lines.append(
                f"  - {{id: {name}, area: {AREA}, line: {LINE}, profile: sewing-station,"
                f" poll_interval: 0.2, connection: {{protocol: modbus, host: 127.0.0.1,"
                f" port: {self.proxies[name].port}, timeout: 0.5}}}}"
            )
        for name in BOXES:
            lines.append(
                f"  - {{id: {name}, area: {AREA}, line: {LINE}, profile: sewing-station,"
                " poll_interval: 0.2, tracker: {order_source: platform},"
                f" connection: {{protocol: modbus, host: 127.0.0.1,"
                f" port: {self.proxies[name].port}, timeout: 0.5}},"
                " signals: {order_id: null, target_count: null, state: null}}"
            )
        path = self.work / "gateway.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start_gateway(self) -> None:
        """``python -m gateway run`` with its output appended to the log (never a second one)."""
        if self.proc is not None and self.proc.returncode is None:
            return
        with self.log_path.open("ab") as out:
            out.write(f"--- chaos: start in episode {self.episode} ---\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "run",
                "-c",
                str(self.work / "gateway.yaml"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            )
        self.all_procs.append(self.proc)
        self.started_at = time.monotonic()
        self.expect_exit = False

    def log_tail(self, lines: int = 40) -> str:
        """The end of the gateway's log (evidence)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line[:400] for line in text[-lines:])

    async def sigkill(self) -> None:
        """Kill the gateway at once."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self.expect_exit = True
            proc.kill()
            await proc.wait()

    async def sigterm(self) -> float | None:
        """SIGTERM; seconds until it exited, or ``None`` when it had to be killed."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return 0.0
        self.expect_exit = True
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.args.grace * 2):
                await proc.wait()
        except TimeoutError:
            # SIGABRT makes faulthandler write every thread's stack into the log: evidence.
            proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            return None
        return time.monotonic() - t0

    async def stop_checked(self) -> None:
        """SIGTERM and judge the time it took."""
        took = await self.sigterm()
        self.checker.check_stop(self.episode, took, self.args.grace, self.log_tail())

    async def supervise(self) -> None:
        """Like systemd's Restart=: notice unasked exits, restart; sample RSS meanwhile."""
        while True:
            await asyncio.sleep(0.5)
            proc = self.proc
            if proc is None:
                continue
            if proc.returncode is None:
                rss = _rss_kib(proc.pid)
                self.rss_peak = max(self.rss_peak, rss)
                self.rss_episode_peak = max(self.rss_episode_peak, rss)
                if len(self.rss_samples) < 100_000:
                    self.rss_samples.append(rss)
                continue
            if self.expect_exit or self.proc_lock.locked():
                continue
            quick = time.monotonic() - self.started_at < 15
            self.quick_exits = self.quick_exits + 1 if quick else 0
            self.checker.check_exit(self.episode, proc.returncode, self.log_tail())
            if self.quick_exits >= 3 and not self.tmpfs.filler.exists():
                # What an operator does after a crash loop on a damaged file.
                moved = faults.move_aside(self.state_dir, f"ep{self.episode}")
                self.notes.append(f"episode {self.episode}: moved the outbox aside: {moved}")
                self.quick_exits = 0
            await asyncio.sleep(2.0)  # systemd's RestartSec, shortened
            async with self.proc_lock:
                if self.proc is proc and not self.expect_exit:
                    self.restarts += 1
                    await self.start_gateway()

    async def ensure_running(self) -> None:
        """Start the gateway if it is not running (after a fault that stopped it)."""
        async with self.proc_lock:
            if self.proc is None or self.proc.returncode is not None:
                await self.start_gateway()

    # -- traffic ----------------------------------------------------------------------------

    def next_id(self, platform: str) -> int:
        """The platform's next order / command number."""
        p = self.platforms[platform]
        p.counter += 1
        return p.counter

    async def assign(self, platform: str, machine: str, target: int) -> dict[str, Any] | None:
        """A normal order of a platform (``ACME-n`` / ``ZETA-n`` with command id ``a-n``)."""
        n = self.next_id(platform)
        oid = f"{platform.upper()}-{n}"
        body = {"command_id": f"{platform[0]}-{n}", "order_id": oid, "target": target}
        answer = await self.platforms[platform].command(machine, "assign-order", body)
        if answer and answer.get("accepted") and platform == "acme":
            self.acme_running[oid] = machine
            self.acme_orders[oid] = machine
        return answer

    async def normal_traffic(self) -> None:
        """Each episode both platforms assign a few orders to the counter boxes."""
        for _ in range(self.rng.randint(1, 2)):
            await self.assign("acme", self.rng.choice(BOXES), self.rng.randint(10, 40))
        await self.assign("zeta", self.rng.choice(BOXES), self.rng.randint(10, 30))
        if self.acme_running and self.rng.random() < 0.3:
            oid = self.rng.choice(sorted(self.acme_running))
            machine = self.acme_running.pop(oid)
            n = self.next_id("acme")
            answer = await self.platforms["acme"].command(
                machine, "cancel-order", {"command_id": f"a-{n}", "order_id": oid}
            )
            if answer and answer.get("reason") == "removed from queue":
                self.acme_withdrawn[oid] = machine

    # -- faults -----------------------------------------------------------------------------

    async def apply(self, draw: faults.Draw, done: list[dict[str, Any]]) -> None:
        """Inject one fault (and, for the lasting ones, hold it for its time)."""
        await asyncio.sleep(draw.at)
        record = draw.as_json()
        p = draw.params
        f = draw.fault
        try:
            if f.startswith("device_"):
                self.proxies[p["machine"]].inject(parse_command(faults.proxy_command(draw)))
            elif f == "broker_outage":
                broker = self.brokers[p["broker"]]
                await asyncio.to_thread(broker.stop)
                await asyncio.sleep(p["seconds"])
                await asyncio.to_thread(broker.start)
            elif f == "gateway_sigkill":
                async with self.proc_lock:
                    await self.sigkill()
                    await asyncio.sleep(self.rng.uniform(0.2, 2))
                    await self.start_gateway()
            elif f == "gateway_sigterm":
                async with self.proc_lock:
                    await self.stop_checked()
                    await asyncio.sleep(self.rng.uniform(0.2, 2))
                    await self.start_gateway()
            elif f == "disk_full":
                full_since = time.time()
                try:
                    record["filled_bytes"] = await asyncio.to_thread(self.tmpfs.fill)
                    if p.get("restart"):
                        # A clean stop checkpoints and removes the WAL: the new process needs
                        # fresh space at once (a running one reuses its WAL and may not notice).
                        async with self.proc_lock:
                            await self.stop_checked()
                            await self.start_gateway()
                    await asyncio.sleep(p["seconds"])
                finally:
                    self.tmpfs.free()
                    self.checker.note_disk_full(full_since, time.time())
            elif f == "outbox_damage":
                async with self.proc_lock:
                    await self.stop_checked()
                    record.update(faults.damage_outbox(self.state_dir, p["mode"], self.rng))
                    await self.start_gateway()
            elif f == "hostile_squat":
                await self.squat(record)
            elif f == "hostile_queue_flood":
                await self.queue_flood(p["orders"], record)
            elif f == "hostile_guess":
                await self.guess(record)
            elif f == "command_flood":
                await self.command_flood(p["messages"])
            elif f == "big_commands":
                await self.big_commands(p["megabytes"], p["count"])
            elif f == "slow_history":
                self.influx.delay = p["seconds"]
        except Exception as exc:
            record["harness_error"] = repr(exc)
        done.append(record)

    async def heal(self) -> None:
        """End every lasting fault: devices, disk, history sink, brokers, the process."""
        for proxy in self.proxies.values():
            proxy.inject(parse_command("heal"))
        self.tmpfs.free()
        self.influx.delay = 0.02
        for broker in self.brokers.values():
            if not broker.running:
                await asyncio.to_thread(broker.start)
        await self.ensure_running()

    async def squat(self, record: dict[str, Any]) -> None:
        """zeta takes acme's next command ids first (with its own orders); then acme uses them."""
        zeta = self.platforms["zeta"]
        box = self.rng.choice(BOXES)
        nxt = self.platforms["acme"].counter + 1
        ep = self.episode
        for k in range(nxt, nxt + 2):
            await zeta.command(
                box,
                "assign-order",
                {"command_id": f"a-{k}", "order_id": f"ZETA-S{ep}-{k}", "target": 3},
                tries=2,
            )
        record["squatted"] = [f"a-{k}" for k in range(nxt, nxt + 2)]
        answers = [await self.assign("acme", box, 10) for _ in range(2)]
        record["acme_answers"] = [a.get("reason") if a else None for a in answers]

    async def queue_flood(self, orders: int, record: dict[str, Any]) -> None:
        """acme runs a long order; zeta queues many orders behind it, then withdraws them."""
        box = self.rng.choice(BOXES)
        answer = await self.assign("acme", box, 150)
        record["acme_order"] = answer
        zeta = self.platforms["zeta"]
        ep = self.episode
        ids = [f"ZETA-F{ep}-{k}" for k in range(orders)]
        for k, oid in enumerate(ids):
            zeta.publish(
                box, "assign-order", {"command_id": f"zf{ep}-{k}", "order_id": oid, "target": 5}
            )
            if k % 40 == 39:
                await asyncio.sleep(1.0)  # under the gateway's command rate limit
        # acme's order runs with the queue full for a while.
        await asyncio.sleep(self.rng.uniform(0.5, 1.0) * self.args.episode_seconds)
        for k, oid in enumerate(ids):
            await zeta.command(
                box,
                "cancel-order",
                {"command_id": f"zc{ep}-{k}", "order_id": oid},
                tries=2,
                wait=1.5,
            )

    async def guess(self, record: dict[str, Any]) -> None:
        """zeta asks about acme's orders where they are, and about device orders."""
        zeta = self.platforms["zeta"]
        pairs = [(oid, self.acme_orders[oid]) for oid in sorted(self.acme_orders)]
        pairs = self.rng.sample(pairs, min(3, len(pairs)))
        # A withdrawn order of acme's too: its id must not become free for zeta.
        withdrawn = [(o, m) for o, m in sorted(self.acme_withdrawn.items()) if (o, m) not in pairs]
        pairs += withdrawn[-1:]
        for m in SEWING:
            pairs += [(oid, m) for oid in list(self.models[m].truth)[-1:]]
        # An id nobody has: the answer every refusal about others' orders must look like.
        pairs.append((f"GUESS-{self.rng.randint(1000, 9999)}", self.rng.choice(BOXES)))
        record["guesses"] = [f"{oid}@{m}" for oid, m in pairs]
        for oid, machine in pairs:
            n = self.next_id("zeta")
            await zeta.command(
                machine, "cancel-order", {"command_id": f"zg-{n}", "order_id": oid}, tries=2
            )
            if oid.startswith("GUESS-"):
                continue  # assigning it would simply queue a new order of zeta's
            n = self.next_id("zeta")
            await zeta.command(
                machine,
                "assign-order",
                {"command_id": f"zg-{n}", "order_id": oid, "target": 5},
                tries=2,
            )

    async def command_flood(self, messages: int) -> None:
        """QoS 0 commands as fast as two clients can publish them."""
        clients = []
        for k in range(2):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"zeta-flood-{k}")
            c.max_queued_messages_set(0)
            c.connect(self.brokers["zeta"].host, self.brokers["zeta"].port, keepalive=10)
            c.loop_start()
            clients.append(c)
        try:
            pad = "x" * 900
            for i in range(messages):
                c = clients[i % 2]
                # Another customer's name: refused, so the flood never fills the queue.
                body = {
                    "command_id": f"fl-{i}",
                    "order_id": f"ZETA-FL{i}",
                    "target": 1,
                    "customer": pad,
                }
                self.checker.note_sent("zeta", "box-02", "assign-order", body)
                c.publish(
                    f"{PREFIX}/{SITE}/{AREA}/{LINE}/box-02/cmd/assign-order",
                    json.dumps(body),
                    qos=0,
                )
                if i % 500 == 499:
                    await asyncio.sleep(0)  # let the loop breathe; the flood stays a flood
            await asyncio.sleep(3.0)
        finally:
            for c in clients:
                c.disconnect()
                c.loop_stop()

    async def big_commands(self, megabytes: int, count: int) -> None:
        """A few huge command payloads (far beyond the 16 KiB limit)."""
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="zeta-big")
        c.connect(self.brokers["zeta"].host, self.brokers["zeta"].port, keepalive=30)
        c.loop_start()
        try:
            payload = b"{" + b" " * (megabytes * 1024 * 1024) + b"}"
            for _ in range(count):
                info = c.publish(
                    f"{PREFIX}/{SITE}/{AREA}/{LINE}/box-01/cmd/assign-order", payload, qos=1
                )
                await asyncio.to_thread(info.wait_for_publish, 30)
            await asyncio.sleep(3.0)
        finally:
            c.disconnect()
            c.loop_stop()

    # -- episodes ---------------------------------------------------------------------------

    def truth(self) -> dict[str, dict[str, tuple[int, int, int, bool]]]:
        """The stations' own per-order counts."""
        return {
            m: {
                o: (t.good, t.scrap, t.target, t.completed) for o, t in self.models[m].truth.items()
            }
            for m in SEWING
        }

    async def settle(self, limit: float) -> dict[str, list[int]]:
        """Wait (bounded) until every machine's sequences have no hole; returns what is left."""
        deadline = time.monotonic() + limit
        holes = self.checker.holes()
        while holes and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # the recorders fill from paho's threads: poll them
            holes = self.checker.holes()
        return holes

    async def run_episode(self, allowed: list[str] | None, fixed: str | None) -> None:
        """One episode: traffic, faults at random moments, heal, settle, check."""
        t0 = time.time()
        self.rss_episode_peak = 0
        length = self.args.episode_seconds
        if fixed is not None:
            draws = faults.draw_episode(
                self.rng, length, SEWING + BOXES, allowed=[fixed], count=(1, 1)
            )
        else:
            draws = faults.draw_episode(self.rng, length, SEWING + BOXES, allowed=allowed)
        done: list[dict[str, Any]] = []
        tasks = [asyncio.create_task(self.apply(d, done)) for d in draws]
        traffic = asyncio.create_task(self.normal_traffic())
        await asyncio.sleep(length)
        await asyncio.gather(*tasks, traffic, return_exceptions=True)
        await self.heal()
        holes = await self.settle(self.args.settle_seconds)
        before = len(self.checker.violations)
        self.checker.check_memory(
            self.episode,
            self.rss_episode_peak,
            self.args.rss_limit_mb * 1024,
            ",".join(d.fault for d in draws),
        )
        self.checker.check(self.episode, self.truth())
        new = self.checker.violations[before:]
        self.episodes.append(
            {
                "episode": self.episode,
                "started": time.strftime("%H:%M:%S", time.gmtime(t0)),
                "seconds": round(time.time() - t0, 1),
                "faults": sorted(done, key=lambda r: r["at"]),
                "unsettled_holes": {m: h[:20] for m, h in holes.items()},
                "rss_peak_mib": self.rss_episode_peak // 1024,
                "new_violations": [f"{v.invariant}: {v.what}" for v in new],
            }
        )
        logging.getLogger("chaos").warning(
            "episode %d: %s -> %d new violation(s)",
            self.episode,
            [d.fault for d in draws],
            len(new),
        )

    async def run(self) -> dict[str, Any]:
        """The whole campaign; returns the report."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.tmpfs.mount()
        report: dict[str, Any] = {"seed": self.args.seed, "seconds": self.args.seconds}
        try:
            for b in self.brokers.values():
                b.start()
            await self.influx.start()
            for r in self.recorders.values():
                await asyncio.to_thread(r.start)
            for p in self.platforms.values():
                p.start(asyncio.get_running_loop())
            specs = []
            for name in SEWING:
                self.models[name] = StationModel(None, seed=self.args.seed, name=name)
                specs.append(StationSpec(name, free_port(), self.models[name]))
            for name in BOXES:
                # A counter box: counts pieces; the platforms say whose order they belong to.
                script = [Idle(1.0), RunOrder("dev", target=10**8, piece_seconds=1.5)]
                self.models[name] = StationModel(script, name=name)
                specs.append(StationSpec(name, free_port(), self.models[name]))
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(SimulatedFloor(specs, speed=self.args.speed))
                for s in specs:
                    self.proxies[s.name] = await stack.enter_async_context(
                        FaultProxy("127.0.0.1", s.port, framing="modbus", name=s.name)
                    )
                self.write_config()
                await self.start_gateway()
                supervisor = asyncio.create_task(self.supervise())
                try:
                    await asyncio.sleep(3.0)  # the gateway's first connect, before any fault
                    try:
                        await self.campaign_loop()
                    except Exception as exc:
                        logging.getLogger("chaos").exception("campaign stopped early")
                        report["harness_error"] = repr(exc)
                    await self.heal()
                    holes = await self.settle(self.args.settle_seconds)
                    await self.stop_checked()
                finally:
                    supervisor.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await supervisor
                    for proc in self.all_procs:
                        if proc.returncode is None:
                            proc.kill()
                            await proc.wait()
                await asyncio.sleep(1.0)
                self.checker.check(self.episode, self.truth(), final=True)
                report["final_unsettled_holes"] = {m: h[:50] for m, h in holes.items()}
        finally:
            for p in self.platforms.values():
                p.stop()
            for r in self.recorders.values():
                r.stop()
            await self.influx.close()
            for b in self.brokers.values():
                b.stop()
            self.tmpfs.umount()
        self.fill_report(report)
        return report

    def fill_report(self, report: dict[str, Any]) -> None:
        """Everything known so far into ``report`` (also written after every episode)."""
        drawn: dict[str, int] = {}
        for ep in self.episodes:
            for f in ep["faults"]:
                drawn[f["fault"]] = drawn.get(f["fault"], 0) + 1
        report.update(
            episodes_run=len(self.episodes),
            faults_drawn=dict(sorted(drawn.items())),
            invariants=self.checker.summary(),
            violations=[v.as_json() for v in self.checker.violations],
            tolerated=self.checker.tolerated,
            stats={
                **self.checker.stats,
                "gateway_restarts_after_unasked_exit": self.restarts,
                "rss_peak_mib": self.rss_peak // 1024,
                "rss_median_mib": sorted(self.rss_samples)[len(self.rss_samples) // 2] // 1024
                if self.rss_samples
                else None,
                "history_writes": self.influx.writes,
            },
            notes=self.notes,
            episodes=self.episodes,
            workdir=str(self.work),
            reproduce=f"python -m tests.chaos.campaign --seed {self.args.seed} "
            f"--seconds {self.args.seconds} --episode-seconds {self.args.episode_seconds}"
            + (f" --episodes {self.args.episodes}" if self.args.episodes else "")
            + (f" --faults {','.join(self.args.faults)}" if self.args.faults else "")
            + (" --cycle" if self.args.cycle else ""),
        )
        report["ok"] = not self.checker.violations and "harness_error" not in report

    async def campaign_loop(self) -> None:
        """Episodes until the time is up."""
        started = time.monotonic()
        allowed = self.args.faults or None
        order = list(allowed or faults.CATALOGUE)
        while (
            self.episode < self.args.episodes
            if self.args.episodes
            else time.monotonic() - started < self.args.seconds
        ):
            self.episode += 1
            fixed = order[(self.episode - 1) % len(order)] if self.args.cycle else None
            await self.run_episode(allowed, fixed)
            if self.args.json:
                # A campaign cut short still leaves its findings behind.
                partial: dict[str, Any] = {"seed": self.args.seed, "partial": True}
                self.fill_report(partial)
                write_json(Path(self.args.json), partial)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """The report as JSON (``var/`` may not exist in a fresh clone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1500, help="campaign length (1500)")
    parser.add_argument(
        "--episodes",
        type=int,
        default=0,
        help="run exactly this many episodes (overrides --seconds)",
    )
    parser.add_argument("--episode-seconds", type=float, default=40.0)
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=45.0,
        help="how long an episode waits for the gateway to deliver everything",
    )
    parser.add_argument(
        "--faults",
        type=lambda s: [f for f in s.split(",") if f],
        default=[],
        help="comma-separated subset of the catalogue",
    )
    parser.add_argument(
        "--cycle",
        action="store_true",
        help="one fault per episode, going through the allowed faults in turn",
    )
    parser.add_argument("--speed", type=float, default=5.0, help="simulation speed factor")
    parser.add_argument(
        "--grace",
        type=float,
        default=15.0,
        help="seconds the gateway may take to exit after SIGTERM",
    )
    parser.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="no influxdb: section (the slow history sink is then idle)",
    )
    parser.add_argument("--rss-limit-mb", type=int, default=256)
    parser.add_argument("--tmpfs-size", default="16m")
    parser.add_argument("--workdir", help="keep logs here (default: a temporary directory)")
    parser.add_argument("--json", help="write the report to this file")
    args = parser.parse_args(argv)
    unknown = [f for f in args.faults if f not in faults.CATALOGUE]
    if unknown:
        parser.error(f"unknown faults {unknown}; the catalogue: {', '.join(faults.CATALOGUE)}")
    return args


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """``python -m tests.chaos.campaign``; exit status 0 when every invariant held."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # The simulators and proxies log every injected fault and broken send: noise here.
    for name in ("pymodbus", "simulators", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="shopfloor-chaos-")
    report = asyncio.run(Campaign(args).run())
    if args.json:
        write_json(Path(args.json), report)
    summary = {k: report[k] for k in ("episodes_run", "faults_drawn", "invariants", "ok")}
    out(json.dumps(summary, indent=2))
    for v in report["violations"]:
        out(f"VIOLATION [{v['invariant']}] episode {v['episode']}: {v['what']}")
    return 0 if report["ok"] else 1


__all__ = ["INVARIANTS", "Campaign", "main", "parse_args"]

if __name__ == "__main__":
    raise SystemExit(main())
