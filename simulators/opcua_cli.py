"""Command line of the OPC UA simulators (``shopfloor simulate cnc|robot``).

``add_arguments(parser, kind)`` fills an argparse parser for ``kind`` ("cnc" or "robot"),
``run`` serves the machines until cancelled. ``python -m simulators.opcua_cli cnc`` runs it
on its own.

``cnc --latency-probe PERIOD`` turns each machine's order id (``ActiveProgram/JobIdentifier``)
into the latency probe: it changes about every PERIOD seconds to ``L<epoch ms of the change>``
(see :class:`simulators.opcua_server.LatencyProbe`); ``bench.latency_opcua`` measures with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from shopfloor_gateway.simulators import cnc
from shopfloor_gateway.simulators.cliargs import (
    add_common_arguments,
    load_script,
    positive_int,
    run_main,
)
from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.opcua_common import EngineModel
from shopfloor_gateway.simulators.opcua_server import LatencyProbe, OpcUaMachineServer, trusted_dir
from shopfloor_gateway.simulators.robot import RobotModel

log = structlog.get_logger(__name__)

#: Kinds of OPC UA machines: model class and default first port.
KINDS: dict[str, tuple[Callable[..., EngineModel], int]] = {
    "cnc": (CncModel, 4840),
    "robot": (RobotModel, 4850),
}


#: Node carrying the order id per kind: the one the latency probe drives (the robot has none).
PROBE_KEYS: dict[str, str] = {"cnc": cnc.K_JOB_ID}

#: Golden-ratio fraction: spreads the probe phases of many machines evenly over a period.
_GOLDEN = (math.sqrt(5) - 1) / 2


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


def probe_period(text: str) -> float:
    """Argparse type of ``--latency-probe``: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"the probe period must be > 0 seconds, got {text}")
    return value


def sampling_floor(text: str) -> float:
    """Argparse type of ``--plc-sampling``: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"the fastest sampling interval must be > 0 seconds, got {text}"
        )
    return value


def probe_for(kind: str, period: float | None, port: int) -> LatencyProbe | None:
    """The latency probe of the machine on ``port`` (``None`` without a period).

    Each port gets its own phase, so machines in one or several processes do not all
    change at the same instant.
    """
    if period is None:
        return None
    key = PROBE_KEYS.get(kind)
    if key is None:
        raise ValueError(f"the {kind} simulator has no order id node for a latency probe")
    return LatencyProbe(key, period, phase=(port * _GOLDEN) % 1.0)


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
    parser.add_argument(
        "--plc-sampling",
        metavar="FASTEST",
        type=sampling_floor,
        default=None,
        help="sample each monitored item on its own timer at the client's sampling interval "
        "(at least FASTEST seconds), like a PLC (default: off, changes are reported as "
        "they are written)",
    )
    if kind in PROBE_KEYS:
        parser.add_argument(
            "--latency-probe",
            metavar="PERIOD",
            type=probe_period,
            default=None,
            help="latency probe: the order id changes about every PERIOD seconds to "
            "L<epoch ms of the change> (default: off, the order id follows the scenario)",
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
    period = getattr(args, "latency_probe", None)
    try:
        servers = [
            OpcUaMachineServer(
                factory(script, seed=args.seed, name=name),
                host=args.host,
                port=args.port + index,
                security=args.secure,
                users=users,
                speed=args.speed,
                probe=probe_for(kind, period, args.port + index),
                plc_sampling=args.plc_sampling,
            )
            for index, name in enumerate(machine_names(kind, args.machines))
        ]
    except ValueError as exc:
        log.error("invalid simulator set-up", error=str(exc))
        return 2
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
                latency_probe=period,
                plc_sampling=args.plc_sampling,
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
        prog="python -m shopfloor_gateway.simulators.opcua_cli",
        description="Simulated OPC UA machines",
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    add_arguments(kinds.add_parser("cnc", help="CNC machine tool after OPC 40501 (umati)"), "cnc")
    add_arguments(kinds.add_parser("robot", help="robot after OPC 40010 (Robotics)"), "robot")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
