"""The ``shopfloor`` command: run, check, simulate, watch, demo.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from gateway import __version__
from gateway.runtime import logs

if TYPE_CHECKING:
    from gateway.runtime.loopwatch import LoopWatch

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _out(text: str, stream: TextIO | None = None) -> None:
    """Write a line for the user (not a log line): the CLI's own output."""
    (stream or sys.stdout).write(text + "\n")


def _add_module_arguments(parser: argparse.ArgumentParser, module: str, *extra: str) -> None:
    """Let a command's own module add its options (imported only when needed)."""
    importlib.import_module(module).add_arguments(parser, *extra)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``argv``, only the chosen command's options are loaded.

    The simulator and probe modules import asyncua and pymodbus' server side (about 0.4 s);
    ``shopfloor run`` must not pay that at every start, so a command's options are only
    added when that command (or ``--help`` for everything) is asked for.
    """
    words = [w for w in (argv or []) if not w.startswith("-")]
    asks_help = argv is None or not argv or any(w in ("-h", "--help") for w in argv)
    # No command word (``--version``): no command's options are needed, unless for help.
    chosen = words[0] if argv is not None and words else (None if asks_help else "")
    kind = words[1] if chosen == "simulate" and len(words) > 1 else None

    def wanted(name: str, sub_kind: str | None = None) -> bool:
        if chosen is None:
            return True
        return chosen == name and (sub_kind is None or kind in (None, sub_kind))

    parser = argparse.ArgumentParser(
        prog="shopfloor",
        description="Shopfloor Gateway: machines over Modbus/OPC UA to order events on MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"shopfloor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the gateway daemon")
    p.add_argument("-c", "--config", required=True, help="path of the YAML config")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "console"])

    p = sub.add_parser("check", help="validate a config file and print every mistake")
    p.add_argument("-c", "--config", required=True, help="path of the YAML config")
    p.add_argument(
        "--config-only",
        action="store_true",
        help="check the file alone, not what `run` needs from this machine (packages, TLS "
        "files, state dir, ports, another gateway): e.g. a change for a running gateway "
        "before `systemctl reload`",
    )

    p = sub.add_parser("simulate", help="start simulated machines")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    simulators = [
        ("sewing", "Modbus TCP sewing stations", "shopfloor_gateway.simulators.cli", ()),
        ("cnc", "OPC UA CNC machines (umati)", "shopfloor_gateway.simulators.opcua_cli", ("cnc",)),
        (
            "robot",
            "OPC UA robots (OPC 40010)",
            "shopfloor_gateway.simulators.opcua_cli",
            ("robot",),
        ),
        (
            "proxy",
            "fault-injection TCP proxy in front of any device",
            "shopfloor_gateway.simulators.proxy_cli",
            (),
        ),
    ]
    for name, text, module, extra in simulators:
        k = kinds.add_parser(name, help=text)
        if wanted("simulate", name):
            _add_module_arguments(k, module, *extra)

    commands = [
        ("probe", "look at a device before writing its config", "shopfloor_gateway.adapters.probe"),
        (
            "opcua-cert",
            "create the gateway's OPC UA client certificate",
            "shopfloor_gateway.adapters.opcua.cert",
        ),
        ("watch", "live view of a broker's shop floor", "gateway.cli.watch"),
        ("schema", "print or write the MQTT contract", "gateway.contract.schema"),
    ]
    for name, text, module in commands:
        p = sub.add_parser(name, help=text)
        if wanted(name):
            _add_module_arguments(p, module)

    p = sub.add_parser("demo", help="simulated shop floor + broker + gateway + live view")
    p.add_argument(
        "-c", "--config", help="demo config (default: config/demo.yaml; ports come from it)"
    )
    p.add_argument("--speed", type=float, default=1.0, help="simulation speed factor")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--log-file", default="var/demo.log", help="where the gateway logs go")
    p.add_argument("--duration", type=float, default=0.0, help="stop after N s (0 = Ctrl-C)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shopfloor`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    command: Callable[[argparse.Namespace], int] = {
        "run": cmd_run,
        "check": cmd_check,
        "simulate": cmd_simulate,
        "watch": cmd_watch,
        "demo": cmd_demo,
        "schema": cmd_schema,
        "probe": cmd_probe,
        "opcua-cert": cmd_opcua_cert,
    }[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        return EXIT_OK


# ---------------------------------------------------------------------------- helpers


def run_async(
    factory: Callable[[asyncio.Event], Awaitable[int]],
    *,
    watch: LoopWatch | None = None,
    deadline: float = 10.0,
) -> int:
    """Run a coroutine on uvloop when available; SIGTERM/SIGINT set the stop event.

    With a ``watch`` (the daemon), the signals are caught by a Python-level handler rather
    than the loop's: it runs in the main thread between two bytecodes even while a bug keeps
    the loop from turning, arms the watch's hard deadline (``deadline`` seconds), and then
    asks the loop to stop. However the shutdown goes, the process ends in time.
    """

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if watch is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
        else:

            def on_signal(signum: int, frame: object) -> None:
                watch.arm(deadline, signal.Signals(signum).name)
                loop.call_soon_threadsafe(stop.set)

            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
        try:
            return await factory(stop)
        finally:
            if watch is not None:
                watch.close()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(wrapper())
    return int(uvloop.run(wrapper()))


async def until_stopped(work: Awaitable[int], stop: asyncio.Event) -> int:
    """Run ``work`` until it returns or ``stop`` is set (Ctrl-C), then clean up."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        stopper.cancel()
        return int(task.result())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return EXIT_OK


def _load(path: str) -> Any:
    from gateway.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        _out(f"{path}: {len(exc.errors)} problem(s) found:", sys.stderr)
        for err in exc.errors:
            _out(f"  {err}", sys.stderr)
        return None


# ---------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    """``shopfloor check``: validate and summarise, never a traceback.

    Beyond the file itself, everything ``run`` needs at start is checked on this machine
    (:mod:`gateway.runtime.preflight`): what passes here does not stop ``run``.
    """
    plan = _load(args.config)
    if plan is None:
        return EXIT_USAGE
    from gateway.runtime import preflight

    problems = [] if args.config_only else preflight.check(plan, devices=True)
    if problems:
        _out(f"{args.config}: {len(problems)} problem(s) found:", sys.stderr)
        for err in problems:
            _out(f"  {err}", sys.stderr)
        return EXIT_USAGE
    protocols: dict[str, int] = {}
    for m in plan.machines:
        protocols[m.protocol.name] = protocols.get(m.protocol.name, 0) + 1
    kinds = ", ".join(f"{n} {p}" for p, n in sorted(protocols.items()))
    _out(f"{args.config}: OK")
    _out(f"  gateway {plan.gateway_id} at site {plan.site}, topics under {plan.topic_prefix}/")
    for d in plan.destinations:
        b = d.broker
        name = "broker" if d.name == "default" else f"destination {d.name}:"
        _out(
            f"  {name} {b.host}:{b.port} ({'TLS' if b.tls else 'plain TCP'}), "
            f"client id {b.client_id}"
            + (f", user {b.username}, password set" if b.password is not None else "")
        )
    if plan.outbox is not None:
        _out(f"  outbox {plan.outbox.path}")
    _out(f"  {len(plan.machines)} machine(s): {kinds}")
    for m in plan.machines:
        loc = m.location
        _out(
            f"    {m.id:<16} {loc.area + '/' + loc.line:<20} {m.protocol.name:<7} "
            f"every {m.poll_interval:g}s  signals: {', '.join(sorted(m.signals))}"
        )
    for warning in plan.warnings:
        _out(f"  warning: {warning}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``shopfloor run``: the daemon.

    Whatever would stop it at start (:mod:`gateway.runtime.preflight`, the checks ``check`` makes
    too) ends it with one line per problem and exit code 1, never a traceback. The state
    dir's lock is taken before the outbox opens and held until the process ends.
    """
    logs.configure(args.log_level or "info", json=_json(args.log_format))
    plan = _load(args.config)
    if plan is None:
        return EXIT_USAGE
    # The config may ask for another level/format; command-line flags win.
    logs.configure(
        args.log_level or plan.log_level,
        json=_json(args.log_format or plan.log_format),
        levels=plan.log_levels,
    )
    from gateway.runtime import preflight

    problems = preflight.check(plan)
    if problems:
        for err in problems:
            _out(f"cannot start: {err}", sys.stderr)
        return EXIT_FAILURE
    # Another gateway may have started since the check: the lock is what decides.
    lock = preflight.take_lock(plan)
    if not isinstance(lock, preflight.InstanceLock):
        _out(f"cannot start: {lock}", sys.stderr)
        return EXIT_FAILURE
    with lock:
        return _run_gateway(plan)


def _run_gateway(plan: Any) -> int:
    from gateway.delivery.outbox import OutboxError
    from gateway.runtime.gateway import SHUTDOWN_DEADLINE, Gateway
    from gateway.runtime.loopwatch import LoopWatch

    watch = LoopWatch()

    async def go(stop: asyncio.Event) -> int:
        try:
            gateway = Gateway(plan, watch=watch)
        except (ValueError, ImportError, OSError) as exc:
            # What the start-up checks cover, changed since (a file replaced meanwhile).
            log.error("gateway.start_failed", error=f"{type(exc).__name__}: {exc}")
            _out(f"cannot start: {plan.source}: {exc}", sys.stderr)
            return EXIT_FAILURE
        with contextlib.suppress(NotImplementedError):
            # SIGHUP (and `systemctl reload`) re-reads the config file.
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gateway.request_reload)
        try:
            await gateway.run(stop)
        except (OutboxError, BaseExceptionGroup) as exc:
            # One clear line for the operator instead of a traceback (the task group wraps
            # the error of the outbox task in a group).
            failed = _only(exc, OutboxError)
            if failed is None:
                raise
            log.error(
                "outbox.failed",
                error=str(failed),
                detail="the gateway stops; it resumes from the outbox when started again",
            )
            return EXIT_FAILURE
        return EXIT_OK

    return run_async(go, watch=watch, deadline=SHUTDOWN_DEADLINE)


def _only(exc: BaseException, kind: type[Exception]) -> Exception | None:
    """``exc`` if it is a ``kind``, or the first of a group made of nothing else."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(kind)
        if match is not None and rest is None:
            first: BaseException = match
            while isinstance(first, BaseExceptionGroup) and first.exceptions:
                first = first.exceptions[0]
            return first if isinstance(first, kind) else None
    return None


def _json(fmt: str | None) -> bool | None:
    return {"json": True, "console": False}.get(fmt or "auto")


def cmd_simulate(args: argparse.Namespace) -> int:
    """``shopfloor simulate sewing|cnc|robot|proxy``."""
    logs.configure("info")
    # pymodbus' server logs every client that hangs up mid-request as an error with a hex
    # dump; for a simulator that is the normal life of a test, not news.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    from shopfloor_gateway.simulators import cli as sim_cli
    from shopfloor_gateway.simulators import opcua_cli, proxy_cli

    runner = {"sewing": sim_cli.run, "cnc": opcua_cli.run, "robot": opcua_cli.run}.get(
        args.kind, proxy_cli.run
    )

    return run_async(lambda stop: until_stopped(runner(args), stop))


def cmd_watch(args: argparse.Namespace) -> int:
    """``shopfloor watch``: the reference consumer as a live terminal view."""
    logs.configure("warning")
    from gateway.cli import watch

    return run_async(lambda stop: until_stopped(watch.run(args), stop))


def cmd_demo(args: argparse.Namespace) -> int:
    """``shopfloor demo``: everything in one process, stopped cleanly by Ctrl-C."""
    from gateway.cli import demo

    log_path = Path(args.log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log_stream:
        logs.configure("info", json=True, stream=log_stream)
        return run_async(lambda stop: demo.run(args, stop, log_path))


def cmd_schema(args: argparse.Namespace) -> int:
    """``shopfloor schema``: JSON Schemas and the AsyncAPI document of the MQTT contract."""
    from gateway.contract import schema

    return schema.run(args)


def cmd_probe(args: argparse.Namespace) -> int:
    """``shopfloor probe``: read a device and show its values decoded every plausible way."""
    logs.configure("warning")
    # probe explains connection failures itself; the libraries' own lines would repeat them.
    for name in ("pymodbus", "asyncua"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from shopfloor_gateway.adapters import probe

    return run_async(lambda stop: until_stopped(probe.run(args), stop))


def cmd_opcua_cert(args: argparse.Namespace) -> int:
    """``shopfloor opcua-cert``: the gateway's own OPC UA client certificate and key."""
    from shopfloor_gateway.adapters.opcua import cert as opcua_cert

    return opcua_cert.run(args)
