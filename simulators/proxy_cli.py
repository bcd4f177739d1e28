"""Command line of the fault-injection proxy (``shopfloor simulate proxy``).

``add_arguments`` fills an argparse parser, ``run`` serves until cancelled. With ``--count N``
one command proxies N consecutive ports (``--listen P`` → ``--target Q``, P+1 → Q+1, ...), the
layout of ``shopfloor simulate sewing``. ``--control PORT`` opens a line-based control port on
127.0.0.1 (``echo "stall 10" | nc 127.0.0.1 PORT``); a command applies to every proxy, or to
one when prefixed with its listen port (``15020 cut``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from shopfloor_gateway.simulators import logsetup as logs
from shopfloor_gateway.simulators.faultproxy import (
    FaultPlan,
    FaultProxy,
    PlanError,
    load_plan,
    parse_command,
    parse_plan,
)

log = structlog.get_logger(__name__)


def address(text: str) -> tuple[str, int]:
    """``127.0.0.1:5020`` (or ``:5020``, ``5020``) as host and port."""
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {port}")
    return host, port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1..1000, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the proxy's options to ``parser``."""
    parser.add_argument("--listen", type=address, required=True, help="HOST:PORT to listen on")
    parser.add_argument(
        "--target", type=address, required=True, help="HOST:PORT of the device or simulator"
    )
    parser.add_argument(
        "--count", type=_count, default=1, help="proxy N consecutive ports (default 1)"
    )
    parser.add_argument(
        "--framing",
        choices=["modbus", "opcua", "raw"],
        default="raw",
        help="split the stream into protocol frames so single frames can be dropped/delayed",
    )
    parser.add_argument("--plan", metavar="FILE", help="YAML/JSON fault plan")
    parser.add_argument(
        "--stall-after", type=_seconds, metavar="S", help="stall every link S seconds in"
    )
    parser.add_argument(
        "--stall-for", type=_seconds, metavar="S", help="how long the stall lasts (default: ever)"
    )
    parser.add_argument(
        "--latency", type=_seconds, metavar="S", help="add S seconds to every frame, both ways"
    )
    parser.add_argument(
        "--cut-every", type=_seconds, metavar="S", help="close every connection each S seconds"
    )
    parser.add_argument(
        "--control", type=address, metavar="HOST:PORT", help="line-based control port"
    )


def plan_from_args(args: argparse.Namespace) -> FaultPlan:
    """The plan the options describe; raise :class:`PlanError` for contradictions."""
    shortcuts = args.stall_after is not None or args.latency or args.cut_every
    if args.plan and shortcuts:
        raise PlanError("--plan cannot be combined with --stall-after, --latency or --cut-every")
    if args.plan:
        return load_plan(args.plan)
    if args.stall_for is not None and args.stall_after is None:
        raise PlanError("--stall-for needs --stall-after")
    steps: list[dict[str, object]] = []
    if args.latency:
        steps.append({"at": 0, "fault": "latency", "seconds": args.latency})
    if args.stall_after is not None:
        steps.append(
            {
                "at": args.stall_after,
                "fault": "stall",
                "duration": args.stall_for or None,
            }
        )
    if args.cut_every:
        if args.stall_after is not None:
            raise PlanError("--cut-every cannot be combined with --stall-after; write a --plan")
        return parse_plan(
            {
                "repeat_every": args.cut_every,
                "steps": [*steps, {"at": args.cut_every, "fault": "cut"}],
            }
        )
    return parse_plan({"steps": steps})


async def _control(
    proxies: dict[int, FaultProxy], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one control connection: one command per line, one answer per line."""
    try:
        while line := await reader.readline():
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            head, _, rest = text.partition(" ")
            targets = list(proxies.values())
            if head.isdigit():
                chosen = proxies.get(int(head))
                targets = [chosen] if chosen is not None else []
                text = rest
            if text == "status":
                answer = "; ".join(
                    f"{p.port}: links={p.links} forwarded={p.state.forwarded} "
                    f"dropped={p.state.dropped} stalled={p.state.stalled}"
                    for p in targets
                )
            elif not targets:
                answer = f"error: no proxy listens on {head}"
            else:
                try:
                    step = parse_command(text)
                except PlanError as exc:
                    answer = f"error: {exc}"
                else:
                    for proxy in targets:
                        proxy.inject(step)
                    answer = f"ok {step.fault} on {len(targets)} proxy(ies)"
            writer.write(answer.encode() + b"\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> int:
    """Serve the proxies until cancelled; 2 for a bad plan, 1 when a port cannot be bound."""
    try:
        plan = plan_from_args(args)
    except PlanError as exc:
        log.error("faultproxy.invalid_plan", error=str(exc))
        return 2
    (lhost, lport), (thost, tport) = args.listen, args.target
    if max(lport, tport) + args.count - 1 > 65535:
        log.error("faultproxy.ports_do_not_fit", listen=lport, target=tport, count=args.count)
        return 2
    async with contextlib.AsyncExitStack() as stack:
        proxies: dict[int, FaultProxy] = {}
        try:
            for i in range(args.count):
                proxy = FaultProxy(
                    thost,
                    tport + i,
                    listen_host=lhost,
                    listen_port=lport + i,
                    plan=plan,
                    framing=args.framing,
                )
                await stack.enter_async_context(proxy)
                proxies[proxy.port] = proxy
            if args.control is not None:
                server = await asyncio.start_server(
                    lambda r, w: _control(proxies, r, w), *args.control
                )
                stack.push_async_callback(server.wait_closed)
                stack.callback(server.close)
                log.info("faultproxy.control", address=f"{args.control[0]}:{args.control[1]}")
        except OSError as exc:
            log.error("faultproxy.cannot_listen", error=str(exc))
            return 1
        log.info("faultproxy.running", proxies=len(proxies), steps=len(plan.steps))
        # Runs until the caller cancels this task (Ctrl-C, SIGTERM in the CLI).
        await asyncio.Event().wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy on its own: ``python -m simulators.proxy_cli --listen ... --target ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m shopfloor_gateway.simulators.proxy_cli",
        description="Fault-injection TCP proxy",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
