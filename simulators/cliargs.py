"""Argument types and the stand-alone ``main()`` shared by the simulators' command lines."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from shopfloor_gateway.simulators import logsetup as logs
from shopfloor_gateway.simulators.scenario import ScenarioError, Step, load_scenario

log = structlog.get_logger(__name__)


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port(text: str) -> int:
    """Argparse type: a TCP port 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {value}")
    return value


def speed(text: str) -> float:
    """Argparse type: a finite number > 0 (scenario seconds per wall-clock second)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_common_arguments(
    parser: argparse.ArgumentParser, *, unit: str, default_port: int, day: str
) -> None:
    """Add ``--host --port --seed --speed --scenario`` for ``unit``s ("station", "machine").

    ``day`` names the generated scenario in the help ("working day", "shift").
    """
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=port,
        default=default_port,
        help=f"port of the first {unit}; the others follow on P+1, P+2, ... "
        f"(default {default_port})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help=f"seed of the generated {day} (default 0)"
    )
    parser.add_argument(
        "--speed",
        type=speed,
        default=1.0,
        help="scenario seconds per wall-clock second (default 1.0)",
    )
    parser.add_argument(
        "--scenario",
        metavar="FILE",
        default=None,
        help=f"YAML/JSON list of steps every {unit} runs instead of the generated {day}",
    )


def load_script(
    args: argparse.Namespace, count: int, *, what: str
) -> tuple[Sequence[Step] | None, int]:
    """The ``--scenario`` steps (``None``: generated) and 0, or 2 after logging why not.

    Also checks that ``count`` consecutive ports from ``--port`` fit; ``what`` names the
    count in the log line ("stations", "machines").
    """
    script: Sequence[Step] | None = None
    if args.scenario is not None:
        try:
            script = load_scenario(args.scenario)
        except ScenarioError as exc:
            log.error("invalid scenario", error=str(exc))
            return None, 2
    if args.port + count - 1 > 65535:
        log.error("ports do not fit", first_port=args.port, **{what: count})
        return None, 2
    return script, 0


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, set up logging and run ``run(args)`` until it ends or Ctrl-C."""
    args = parser.parse_args(argv)
    logs.configure()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0
