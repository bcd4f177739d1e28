"""Shared parts of the benchmarks: processes, /proc figures, a subscriber, result tables.

The gateway always runs as its own process (``python -m gateway run -c FILE``) so its CPU and
memory are read from ``/proc/<pid>`` and nothing of the load generators counts against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.delivery.influx.sink import SINK_NAME
from gateway.runtime.metrics import histogram_quantile
from tests.gatewayproc import stop

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PREFIX = "bench"
SITE = "plant-b"
_TICK = os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> None:
    """Open as many sockets as the hard limit allows (inherited by the child processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, load average, Python."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": platform.python_version(),
        "when": datetime.now().isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name (which may contain spaces) start after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of seconds, in milliseconds."""
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2) if values else math.nan,
    }


def poll_figures(
    requests: dict[str, list[float]], interval: float, start: float, end: float
) -> dict[str, Any]:
    """Polls seen by the devices in ``[start, end]``: count, intervals, missed deadlines.

    A gap between two reads of one device longer than 1.5 intervals counts the ticks it
    skipped (``round(gap / interval) - 1``) as missed deadlines.
    """
    polls = 0
    missed = 0
    gaps: list[float] = []
    for times in requests.values():
        inside = [t for t in times if start <= t <= end]
        polls += len(inside)
        for a, b in itertools.pairwise(inside):
            gap = b - a
            gaps.append(gap)
            if gap > 1.5 * interval:
                missed += round(gap / interval) - 1
    return {
        "polls": polls,
        "missed_deadlines": missed,
        "interval": summary_ms(gaps),
    }


# ------------------------------------------------------------------ ports and processes


def free_port_range(count: int, first: int = 21000) -> int:
    """First port of ``count`` consecutive ports on 127.0.0.1 that are free right now."""
    base = first
    while base + count < 65000:
        for port in range(base, base + count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    base = port + 1
                    break
        else:
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass(slots=True)
class LoadSim:
    """The load simulator in its own process (``python -m simulators.load``)."""

    proc: asyncio.subprocess.Process
    devices: list[dict[str, Any]]
    stats_file: Path
    stats: dict[str, Any] = field(default_factory=dict)

    def requests(self, mode: str | None = "ok") -> dict[str, list[float]]:
        """Request times per device (of the given mode), available after the process ended."""
        return {
            name: d["requests"]
            for name, d in self.stats["devices"].items()
            if mode is None or d["mode"] == mode
        }


@contextlib.asynccontextmanager
async def load_sim(workdir: Path, *args: str) -> AsyncIterator[LoadSim]:
    """Start the load simulator, wait for its ready line; stop it and read its stats.

    Without ``--base-port`` in ``args`` the devices get a random block of ports, drawn again
    when one is taken (another benchmark or test on the same machine), up to five times.
    """
    stats_file = workdir / "load-stats.json"
    rng = random.Random()
    for attempt in range(5):
        ports = () if "--base-port" in args else ("--base-port", str(rng.randrange(20_000, 50_000)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shopfloor_gateway.simulators.load",
            "--uvloop",
            "--stats",
            str(stats_file),
            *ports,
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=(workdir / "load.log").open("wb"),
            # The ready line lists every device: past 64 KiB (about 1,500 devices) with
            # the default stream limit.
            limit=16 * 1024 * 1024,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        if line:
            break
        await stop(proc, 20)
        log = (workdir / "load.log").read_text()
        if not ports or "address already in use" not in log or attempt == 4:
            raise RuntimeError(f"load simulator failed: {log}")
    try:
        ready = json.loads(line)
        sim = LoadSim(proc, ready["devices"], stats_file)
        yield sim
    finally:
        await stop(proc, 20)
    if stats_file.exists():
        sim.stats = json.loads(stats_file.read_text())


@dataclass(slots=True)
class GatewayProc:
    """The gateway under test in its own process."""

    proc: asyncio.subprocess.Process
    started: float
    log: Path

    @property
    def pid(self) -> int:
        """Process id, for /proc."""
        return self.proc.pid


@contextlib.asynccontextmanager
async def gateway(
    config: Path,
    log: Path,
    *extra: str,
    stages: Path | None = None,
    handover: Path | None = None,
) -> AsyncIterator[GatewayProc]:
    """``python -m gateway run -c FILE``; SIGTERM at the end (killed if it lingers).

    ``stages``: run it through :mod:`bench.stages`, which writes each event's stage times
    to that file when the gateway exits. ``handover``: run it through :mod:`bench.handover`,
    whose separate delivery process writes its figures to that file.
    """
    if stages is not None:
        launcher = ["bench.stages", str(stages)]
    elif handover is not None:
        launcher = ["bench.handover", str(handover)]
    else:
        launcher = ["gateway"]
    with log.open("wb") as out:
        started = time.time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *launcher,
            "run",
            "-c",
            str(config),
            *extra,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield GatewayProc(proc, started, log)
    finally:
        await stop(proc, 15)


def write_config(
    path: Path,
    *,
    broker_port: int,
    devices: Iterable[dict[str, Any]],
    signals: dict[str, dict[str, Any]],
    poll: float,
    log_level: str = "info",
    timeout: float = 1.0,
    tracker: str = "{counter_mode: lifetime}",
    history_url: str | None = None,
    health_port: int | None = None,
    history_batch: int | None = 5000,
) -> Path:
    """A gateway config reading every device of the load simulator with one profile.

    ``health_port``: serve /metrics there (off when ``None``), for :func:`delivery_times`.

    ``history_url``: also write events and every poll's telemetry to this InfluxDB v2 write
    endpoint (the ``influxdb:`` section), so every tag read goes somewhere; ``history_batch``
    is its ``batch_size`` (``None``: the section's default).
    """
    lines = [
        f"gateway: {{id: gw-bench, site: {SITE}, topic_prefix: {PREFIX}}}",
        f"broker: {{host: 127.0.0.1, port: {broker_port}, keepalive: 30}}",
        f"logging: {{level: {log_level}, format: json}}",
        f"tracker: {tracker}",
        f"health: {{listen: '127.0.0.1:{health_port}'}}"
        if health_port is not None
        else "health: {listen: null}",
        "profiles:",
        "  load-box:",
        "    protocol: modbus",
        f"    poll_interval: {poll}",
        "    signals:",
    ]
    for name, sig in signals.items():
        lines.append(f"      {name}: {json.dumps(sig)}")
    if history_url is not None:
        batch = "" if history_batch is None else f", batch_size: {history_batch}"
        lines.append(f"influxdb: {{url: '{history_url}', org: bench, bucket: bench{batch}}}")
    lines.append("machines:")
    for i, d in enumerate(devices):
        lines += [
            f"  - id: {d['name']}",
            "    area: hall",
            f"    line: line-{i // 50:02d}",
            "    profile: load-box",
            "    connection: {protocol: modbus, host: 127.0.0.1, "
            f"port: {d['port']}, unit_id: {d['unit_id']}, timeout: {timeout}}}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


_BUCKET = re.compile(r"^shopfloor_event_delivery_seconds_bucket\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def delivery_buckets(
    port: int, *, skip: tuple[str, ...] = (SINK_NAME,)
) -> dict[float, float]:
    """Cumulative ``le -> count`` of the gateway's ``shopfloor_event_delivery_seconds``.

    Summed over the MQTT destinations: the history sink (``skip``) acknowledges a batch
    write up to a second later by design, which is not the latency goal's PUBACK.
    """
    text = await asyncio.to_thread(_metrics_text, port)
    out: dict[float, float] = {}
    for labels, count in _BUCKET.findall(text):
        tags = dict(_LABEL.findall(labels))
        if tags.get("destination") in skip or "le" not in tags:
            continue
        le = tags["le"]
        bound = math.inf if le == "+Inf" else float(le)
        out[bound] = out.get(bound, 0.0) + float(count)
    return out


def delivery_times(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """The gateway's own emitted -> PUBACK figures between two :func:`delivery_buckets` reads.

    p50 / p99 are interpolated within the histogram's buckets (1 ms wide up to 5 ms);
    ``within_5ms`` is the share of events acknowledged within 5 ms (exact: a bucket bound).
    """
    delta = [(le, after[le] - before.get(le, 0.0)) for le in sorted(after)]
    n = delta[-1][1] if delta else 0.0
    if n <= 0:
        return {"n": 0}
    p50 = histogram_quantile(0.5, delta)
    p99 = histogram_quantile(0.99, delta)
    within = dict(delta).get(0.005, 0.0) / n
    return {
        "n": int(n),
        "p50_ms": round(1000 * (p50 or 0.0), 2),
        "p99_ms": round(1000 * (p99 or 0.0), 2),
        "within_5ms": round(within, 4),
    }


# ------------------------------------------------------------------ subscriber


@dataclass(slots=True)
class Arrivals:
    """What the benchmark's subscriber saw, with its own receive times."""

    messages: int = 0
    events: int = 0
    connected: set[str] = field(default_factory=set)
    first_event_at: float | None = None
    first_status_at: float | None = None
    #: (arrival time, decoded event) of every event, for the benchmark to pick from.
    log: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    keep_events: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def subscriber(
    port: int, on_event: Callable[[float, dict[str, Any]], None] | None = None
) -> AsyncIterator[Arrivals]:
    """Subscribe to the benchmark's whole topic tree and count what arrives."""
    arrivals = Arrivals()
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-sub-{os.getpid()}") as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)

        async def read() -> None:
            async for message in client.messages:
                now = time.time()
                arrivals.messages += 1
                topic = message.topic.value
                if "/gateway/" in topic and arrivals.first_status_at is None:
                    arrivals.first_status_at = now
                if "/event/" not in topic:
                    continue
                arrivals.events += 1
                if arrivals.first_event_at is None:
                    arrivals.first_event_at = now
                payload = message.payload
                assert isinstance(payload, bytes | bytearray)
                event = json.loads(payload)
                # The envelope's type carries a reverse-DNS prefix; the topic the short name.
                event["short_type"] = topic.rsplit("/", 1)[-1]
                if (
                    event["short_type"] == "machine.connection.changed"
                    and event["data"]["connected"]
                ):
                    arrivals.connected.add(event["subject"])
                    arrivals.changed.set()
                if on_event is not None:
                    on_event(now, event)
                if arrivals.keep_events:
                    arrivals.log.append((now, event))

        task = asyncio.create_task(read(), name="bench-subscriber")
        try:
            yield arrivals
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_connected(arrivals: Arrivals, names: set[str], timeout: float) -> bool:  # noqa: ASYNC109
    """Wait until every named machine reported connected; False when the time ran out."""
    try:
        async with asyncio.timeout(timeout):
            while not names <= arrivals.connected:
                arrivals.changed.clear()
                await arrivals.changed.wait()
        return True
    except TimeoutError:
        return False


def parse_time(text: str) -> float:
    """Epoch seconds of an RFC 3339 ``...Z`` time from the contract."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------ profiling


#: What a benchmark says when ``--profile`` is asked for without py-spy installed.
PY_SPY_MISSING = "--profile needs py-spy, which is not installed: .venv/bin/pip install py-spy"


def py_spy() -> str | None:
    """The py-spy executable, on PATH or beside this Python; ``None`` when there is none."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return spy if os.access(spy, os.X_OK) else None


def check_profiler(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop at once, with what to install, if ``--profile`` cannot run (not after a run)."""
    if getattr(args, "profile", False) and py_spy() is None:
        parser.error(PY_SPY_MISSING)


async def start_profiler(
    pid: int, seconds: float, enabled: bool, label: str
) -> asyncio.subprocess.Process | None:
    """py-spy the process for ``seconds`` into ``bench/results/profile-<label>.txt`` (collapsed
    stacks; ``python -m bench.hotspots FILE`` summarises them)."""
    if not enabled:
        return None
    spy = py_spy()
    if spy is None:
        raise RuntimeError(PY_SPY_MISSING)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"profile-{label}.txt"
    return await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


# ------------------------------------------------------------------ output


def report(name: str, params: dict[str, Any], rows: list[tuple[str, Any, str]]) -> Path:
    """Print ``rows`` (figure, value, goal) as a table and write them with ``params`` as JSON."""
    width = max(len(r[0]) for r in rows)
    print(f"\n== {name} ==  " + "  ".join(f"{k}={v}" for k, v in params.items()))
    for figure, value, goal in rows:
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {figure:<{width}}  {shown:>14}  {goal}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": name,
                "params": params,
                "machine": machine_info(),
                "figures": {r[0]: r[1] for r in rows},
                "goals": {r[0]: r[2] for r in rows if r[2]},
            },
            indent=2,
        )
    )
    print(f"  -> {out.relative_to(ROOT)}")
    return out
