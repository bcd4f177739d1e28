"""Command line of the sewing-station simulator (``shopfloor simulate sewing``).

``add_arguments`` fills an argparse parser, ``run`` serves the stations until cancelled.
``python -m simulators.cli`` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from shopfloor_gateway.simulators.cliargs import (
    add_common_arguments,
    load_script,
    positive_int,
    run_main,
)
from shopfloor_gateway.simulators.modbus_server import (
    LineStation,
    SimulatedFloor,
    SimulatedLine,
    StationSpec,
)
from shopfloor_gateway.simulators.scenario import Step
from shopfloor_gateway.simulators.serial_link import PtyLink
from shopfloor_gateway.simulators.sewing import UNIT_ID, StationModel

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    parser.add_argument(
        "--stations", type=positive_int, default=3, help="number of stations (default 3)"
    )
    add_common_arguments(parser, unit="station", default_port=5020, day="working day")
    parser.add_argument(
        "--transport",
        choices=["tcp", "rtu_over_tcp", "rtu"],
        default="tcp",
        help=(
            "tcp: one Modbus TCP port per station (default); rtu_over_tcp: all stations as "
            "unit ids 1..N behind one port, like a serial-to-Ethernet converter; rtu: all "
            "stations on one serial line (--serial)"
        ),
    )
    parser.add_argument(
        "--serial",
        metavar="TTY",
        default=None,
        help=(
            "serial device for --transport rtu, or 'pty' for a pseudo-terminal pair whose "
            "other end is printed for the client (no hardware needed)"
        ),
    )


def station_names(count: int) -> list[str]:
    """Names of the simulated stations: sew-01, sew-02, ..."""
    return [f"sew-{i:02d}" for i in range(1, count + 1)]


async def run(args: argparse.Namespace) -> int:
    """Serve the stations until cancelled; return non-zero if they cannot start."""
    script, code = load_script(args, args.stations, what="stations")
    if code:
        return code
    specs = [
        StationSpec(
            name=name,
            port=args.port + index,
            model=StationModel(script, seed=args.seed, name=name),
            unit_id=UNIT_ID,
        )
        for index, name in enumerate(station_names(args.stations))
    ]
    transport = getattr(args, "transport", "tcp")
    if transport != "tcp":
        return await _run_line(args, script, transport)
    try:
        async with SimulatedFloor(specs, host=args.host, speed=args.speed):
            log.info(
                "sewing simulator running",
                stations=len(specs),
                scenario=args.scenario or "generated",
                seed=args.seed,
                speed=args.speed,
            )
            # Runs until the caller cancels this task (Ctrl-C, SIGTERM in the lead's CLI).
            await asyncio.Event().wait()
    except OSError as exc:
        log.error("cannot start simulator", error=str(exc))
        return 1
    return 0


async def _run_line(args: argparse.Namespace, script: Sequence[Step] | None, transport: str) -> int:
    """All stations as unit ids 1..N on one line: RTU on a tty, or RTU framed over TCP."""
    stations = [
        LineStation(
            name=name, unit_id=index + 1, model=StationModel(script, seed=args.seed, name=name)
        )
        for index, name in enumerate(station_names(args.stations))
    ]
    if args.stations > 247:
        log.error("a Modbus line holds at most 247 unit ids", stations=args.stations)
        return 2
    async with contextlib.AsyncExitStack() as stack:
        serial_port = args.serial
        client_end = None
        if transport == "rtu":
            if serial_port is None:
                log.error("--transport rtu needs --serial TTY (or --serial pty)")
                return 2
            if serial_port == "pty":
                link = await stack.enter_async_context(PtyLink())
                serial_port, client_end = link.ends
        try:
            line = await stack.enter_async_context(
                SimulatedLine(
                    stations,
                    transport="rtu" if transport == "rtu" else "rtu_over_tcp",
                    serial_port=serial_port,
                    host=args.host,
                    port=args.port,
                    speed=args.speed,
                )
            )
        except OSError as exc:
            log.error("cannot start simulator", error=str(exc))
            return 1
        log.info(
            "sewing simulator running",
            transport=transport,
            stations=len(stations),
            units=f"1..{len(stations)}",
            endpoint=(client_end or serial_port)
            if transport == "rtu"
            else f"{args.host}:{line.port}",
            scenario=args.scenario or "generated",
        )
        await asyncio.Event().wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator on its own: ``python -m simulators.cli --stations 2``."""
    parser = argparse.ArgumentParser(
        prog="python -m shopfloor_gateway.simulators.cli",
        description="Simulated sewing stations over Modbus TCP",
    )
    add_arguments(parser)
    return run_main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
