"""``shopfloor demo``: a simulated shop floor, a broker, the gateway and the live view.

Everything runs in one process and one event loop, so Ctrl-C stops all of it in order and
leaves no process behind: the live view first, then the gateway (which publishes its
offline status), then the simulated stations, then the broker. The gateway's logs go to a
file so the terminal belongs to the live view.

The live view is the same consumer a platform would write (:mod:`gateway.cli.watch`): it sees
only what the MQTT topics carry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import structlog

from gateway.cli.broker import BrokerStartError, EmbeddedBroker
from gateway.config.loader import BUILTIN_PROFILE_DIR, ConfigError, GatewayPlan, load_config
from gateway.runtime.gateway import Gateway

log = structlog.get_logger(__name__)

DEMO_CONFIG = BUILTIN_PROFILE_DIR.parent / "demo.yaml"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _port_free(host: str, port: int) -> bool:
    from gateway.runtime.preflight import port_problem

    return port_problem(host, port) is None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _endpoint(connection: object) -> tuple[str, int]:
    """Host and port a simulated machine must listen on, for either protocol."""
    url = getattr(connection, "url", None)
    if isinstance(url, str):
        parsed = urlparse(url)
        return parsed.hostname or "127.0.0.1", parsed.port or 4840
    return str(getattr(connection, "host", "127.0.0.1")), int(getattr(connection, "port", 0))


def _ports(plan: GatewayPlan) -> list[tuple[str, str, int]]:
    out = [("broker", plan.broker.host, plan.broker.port)]
    for m in plan.machines:
        out.append((m.id, *_endpoint(m.connection)))
    if plan.health_listen is not None and plan.health_listen[1] != 0:
        # A taken metrics port only warned in the log file, where nobody looks during a demo.
        out.append(("/healthz and /metrics (health.listen)", *plan.health_listen))
    return out


def console_line(plan: GatewayPlan) -> str:
    """Where the web console is, and its token, for the demo's header."""
    if plan.health_listen is None or not plan.console:
        return ""
    host, port = plan.health_listen
    token = plan.console_token
    tail = f"  (order token: {token.get_secret_value()})" if token is not None else ""
    return f"\nWeb console: http://{host}:{port}/{tail}"


async def _play_platform(gateway: Gateway, plan: GatewayPlan) -> None:
    """Act as a platform once: give every machine that takes platform orders an order.

    The robot knows its task program, not the production order; in a factory the order
    portal assigns it. The demo does the same over MQTT, through the contract's command
    topic, so the live view shows platform orders too.
    """
    import aiomqtt

    targets = [m for m in plan.machines if m.tracker.order_source == "platform"]
    if not targets:
        return
    try:
        if gateway.commands is not None:
            await asyncio.wait_for(gateway.commands.subscribed.wait(), timeout=30)
        async with aiomqtt.Client(
            plan.broker.host, plan.broker.port, identifier="demo-platform"
        ) as c:
            due = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 15 * 60))
            for i, m in enumerate(targets):
                body = {
                    "command_id": f"demo-{m.id}",
                    "order_id": f"SO-{4711 + i}",
                    "target": 40,
                    "due": due,
                }
                topic = gateway.topics.command(m.location, "assign-order")
                await c.publish(topic, json.dumps(body), qos=1)
    except (TimeoutError, aiomqtt.MqttError) as exc:
        log.warning("demo.platform_failed", error=str(exc))


async def run(args: argparse.Namespace, stop: asyncio.Event, log_path: Path) -> int:
    """Run the demo until ``stop`` is set (Ctrl-C) or ``--duration`` passed.

    Every port it needs (broker, simulators, ``/healthz`` and ``/metrics``) is checked free
    before anything starts, and the state dir's lock is taken as ``shopfloor run`` does.
    """
    config_path = Path(getattr(args, "config", None) or DEMO_CONFIG)
    try:
        plan = load_config(
            config_path,
            env={
                "SHOPFLOOR_DEMO_STATE": str(Path.cwd() / "var" / "demo"),
                # Fresh per run: the console accepts orders from whoever saw this terminal.
                "SHOPFLOOR_DEMO_TOKEN": secrets.token_urlsafe(12),
            },
        )
    except ConfigError as exc:
        _say(f"demo config {config_path} is broken:\n{exc}")
        return 2
    busy = [(name, h, p) for name, h, p in _ports(plan) if not _port_free(h, p)]
    if busy:
        for name, h, p in busy:
            _say(f"port {h}:{p} for {name} is in use; is another demo running? (stop it first)")
        return 1
    from gateway.runtime import preflight

    # Ports are not all a demo holds: its outbox is one per state dir too.
    lock = preflight.take_lock(plan)
    if not isinstance(lock, preflight.InstanceLock):
        _say(f"cannot start the demo: {lock}")
        return 1
    with lock:
        return await _run_locked(args, stop, log_path, plan)


async def _run_locked(
    args: argparse.Namespace, stop: asyncio.Event, log_path: Path, plan: GatewayPlan
) -> int:
    from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec
    from shopfloor_gateway.simulators.opcua_cli import server_for_profile
    from shopfloor_gateway.simulators.sewing import StationModel

    stations = [
        StationSpec(
            name=m.id,
            port=_endpoint(m.connection)[1],
            model=StationModel(None, seed=args.seed, name=m.id),
        )
        for m in plan.machines
        if m.protocol.name == "modbus"
    ]
    opcua_servers = []
    for m in plan.machines:
        if m.protocol.name != "opcua":
            continue
        host, port = _endpoint(m.connection)
        server = server_for_profile(
            m.profile, m.id, port=port, host=host, seed=args.seed, speed=args.speed
        )
        if server is None:
            _say(f"no simulator for machine {m.id} (profile {m.profile}); it will show offline")
        else:
            opcua_servers.append(server)
    from gateway.cli import watch

    b = plan.broker
    prefix = plan.topic_prefix
    metrics = (
        f"    Metrics: http://{_url_host(plan.health_listen[0])}:{plan.health_listen[1]}/metrics"
        if plan.health_listen is not None
        else ""
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            broker = await stack.enter_async_context(EmbeddedBroker(b.host, b.port))
            await stack.enter_async_context(
                SimulatedFloor(stations, host="127.0.0.1", speed=args.speed)
            )
            for server in opcua_servers:
                await stack.enter_async_context(server)
            gateway_stop = asyncio.Event()
            gateway = Gateway(plan)
            gateway_task = asyncio.create_task(gateway.run(gateway_stop), name="gateway")
            header = (
                f"Shopfloor Gateway demo: {len(stations)} sewing stations (Modbus), "
                f"{len(opcua_servers)} OPC UA machines, "
                f"{broker.kind} broker on {b.host}:{b.port}. Ctrl-C stops everything.\n"
                f"Subscribe yourself: mosquitto_sub -h {b.host} -p {b.port} -t "
                f"'{prefix}/#' -v    Gateway logs: {log_path}{metrics}" + console_line(plan)
            )
            view_task = asyncio.create_task(
                watch.watch(b.host, b.port, prefix, header=header), name="watch"
            )
            platform = asyncio.create_task(_play_platform(gateway, plan), name="platform")
            waiters = {asyncio.create_task(stop.wait()), view_task, gateway_task}
            if args.duration > 0:
                waiters.add(asyncio.create_task(asyncio.sleep(args.duration)))
            done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            platform.cancel()
            for task in pending:
                if task is not gateway_task:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await view_task
            gateway_stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await gateway_task
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("demo part failed", task=task.get_name(), error=str(task.exception()))
        _say(
            f"\nDemo stopped: {gateway.events_emitted} events published by the gateway. "
            f"Logs: {log_path}"
        )
        return 0
    except BrokerStartError as exc:
        _say(f"could not start the demo broker: {exc}")
        return 1
