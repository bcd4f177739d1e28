"""Command line of the OPC UA simulators (``shopfloor simulate cnc|robot``).

``add_arguments(parser, kind)`` fills an argparse parser for ``kind`` ("cnc" or "robot"),
``run`` serves the machines until cancelled. ``python -m simulators.opcua_cli cnc`` runs it
on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from simulators.cliargs import add_common_arguments, load_script, positive_int, run_main
from simulators.cnc import CncModel
from simulators.opcua_common import EngineModel
from simulators.opcua_server import OpcUaMachineServer, trusted_dir
from simulators.robot import RobotModel

log = structlog.get_logger(__name__)

#: Kinds of OPC UA machines: model class and default first port.
KINDS: dict[str, tuple[Callable[..., EngineModel], int]] = {
    "cnc": (CncModel, 4840),
    "robot": (RobotModel, 4850),
}


#: Built-in gateway profile -> simulator kind that matches it (for ``shopfloor demo``).
PROFILE_KINDS: dict[str, str] = {"machine-tool-umati": "cnc", "robot-opc40010": "robot"}


def server_for_profile(
    profile: str | None,
    name: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    seed: int = 0,
    speed: float = 1.0,
) -> OpcUaMachineServer | None:
    """A (not yet started) simulator serving machine ``name`` for a built-in OPC UA profile.

    ``None`` when no simulator matches the profile. The demo starts one per machine.
    """
    kind = PROFILE_KINDS.get(profile or "")
    if kind is None:
        return None
    factory = KINDS[kind][0]
    return OpcUaMachineServer(
        factory(None, seed=seed, name=name), host=host, port=port, speed=speed
    )


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {text!r}")
    return name, password


def add_arguments(parser: argparse.ArgumentParser, kind: str = "cnc") -> None:
    """Add the options of the ``kind`` simulator ("cnc" or "robot") to ``parser``."""
    if kind not in KINDS:
        raise ValueError(f"unknown OPC UA simulator kind {kind!r}; use one of {sorted(KINDS)}")
    default_port = KINDS[kind][1]
    parser.set_defaults(opcua_kind=kind)
    parser.add_argument(
        "--machines", type=positive_int, default=1, help="number of machines (default 1)"
    )
    add_common_arguments(parser, unit="machine", default_port=default_port, day="shift")
    parser.add_argument(
        "--secure",
        metavar="DIR",
        type=Path,
        default=None,
        help="offer only Basic256Sha256 SignAndEncrypt; certificates are created in DIR, "
        "clients are trusted by putting their certificate into DIR/trusted/",
    )
    parser.add_argument(
        "--user",
        metavar="NAME:PASSWORD",
        type=_user,
        action="append",
        default=None,
        help="require this user name and password (repeatable); default: anonymous",
    )


def machine_names(kind: str, count: int) -> list[str]:
    """Names of the simulated machines: cnc-01, cnc-02, ... or robot-01, ..."""
    return [f"{kind}-{i:02d}" for i in range(1, count + 1)]


async def run(args: argparse.Namespace) -> int:
    """Serve the machines until cancelled; return non-zero if they cannot start."""
    kind = str(getattr(args, "opcua_kind", None) or getattr(args, "kind", "cnc"))
    if kind not in KINDS:
        log.error("unknown simulator kind", kind=kind, known=sorted(KINDS))
        return 2
    factory = KINDS[kind][0]
    script, code = load_script(args, args.machines, what="machines")
    if code:
        return code
    users = dict(args.user) if args.user else None
    servers = [
        OpcUaMachineServer(
            factory(script, seed=args.seed, name=name),
            host=args.host,
            port=args.port + index,
            security=args.secure,
            users=users,
            speed=args.speed,
        )
        for index, name in enumerate(machine_names(kind, args.machines))
    ]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            log.info(
                f"{kind} simulator running",
                machines=len(servers),
                endpoints=[s.endpoint for s in servers],
                scenario=args.scenario or "generated",
                seed=args.seed,
                speed=args.speed,
                trusted_certificates=str(trusted_dir(args.secure)) if args.secure else None,
            )
            # Runs until the caller cancels this task (Ctrl-C, SIGTERM in the gateway's CLI).
            await asyncio.Event().wait()
    except OSError as exc:
        log.error("cannot start simulator", error=str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run on its own: ``python -m simulators.opcua_cli robot --machines 2``."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.opcua_cli", description="Simulated OPC UA machines"
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    add_arguments(kinds.add_parser("cnc", help="CNC machine tool after OPC 40501 (umati)"), "cnc")
    add_arguments(kinds.add_parser("robot", help="robot after OPC 40010 (Robotics)"), "robot")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
