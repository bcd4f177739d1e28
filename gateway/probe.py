"""``shopfloor probe``: look at a device before writing its config (Modbus and OPC UA).

``shopfloor probe modbus tcp://10.0.0.5:502 --unit 1 --read 40001:20`` prints the registers
decoded in every plausible way side by side; ``--watch`` refreshes and marks changes;
``--scan-units`` finds the unit ids that answer; ``--emit-config`` prints a config snippet.
``shopfloor probe opcua opc.tcp://host:4840`` browses the address space as a tree;
``--find PartCount`` searches browse names. Errors are told in words, with what to try.

The pure part (:func:`parse_endpoint`, :func:`parse_read`, :func:`render_registers`,
:func:`explain`, :func:`modbus_snippet`) is unit-tested; the rest is the thin shell. Modbus
reads go through the gateway's own line code, so a probe behaves exactly as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import structlog
import yaml

from adapters.base import ConnectError, ConnectionLost
from adapters.modbus.config import (
    BIT_AREAS,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    ModbusConnectionConfig,
    RegisterArea,
    format_ref,
    parse_ref,
)

log = structlog.get_logger(__name__)

_AREA_ALIASES: dict[str, RegisterArea] = {
    "holding": "holding",
    "h": "holding",
    "input": "input",
    "i": "input",
    "coil": "coil",
    "c": "coil",
    "discrete": "discrete_input",
    "discrete_input": "discrete_input",
    "d": "discrete_input",
}

_EXCEPTION_HINTS = {
    1: "the device does not support this area: try input registers (30001) instead of "
    "holding (40001), or the other way round",
    2: "the device has no register at (part of) this address: check whether the manual counts "
    "from 1 or from 0 (try one address lower), read fewer registers, or probe smaller ranges",
    3: "the device refuses this count: read fewer registers at a time",
    4: "the device failed to answer this read: some devices say so for unimplemented "
    "registers; try a smaller range",
    6: "the device is busy: try again, or add request_delay to the connection",
    10: "the gateway has no path to this unit: check --unit and the gateway's routing",
    11: "the gateway is reachable but the unit behind it did not answer: check --unit "
    "(try --scan-units), and the serial settings between gateway and device",
}


@dataclass(frozen=True, slots=True)
class ReadSpec:
    """One range to read: area, zero-based start, count."""

    area: RegisterArea
    start: int
    count: int


def parse_endpoint(url: str, unit: int, timeout: float) -> ModbusConnectionConfig:
    """``tcp://h:502``, ``rtu+tcp://h:4001``, ``rtu:///dev/ttyUSB0?baudrate=9600&parity=N``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower().replace("-", "_")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    common: dict[str, Any] = {"unit_id": unit, "timeout": timeout}
    if scheme in ("tcp", "modbus", ""):
        if not parts.hostname:
            raise ValueError(f"{url!r}: give tcp://HOST:PORT, e.g. tcp://10.0.0.5:502")
        return ModbusConnectionConfig(host=parts.hostname, port=parts.port or 502, **common)
    if scheme in ("rtu+tcp", "rtu_over_tcp", "rtuovertcp"):
        if not parts.hostname:
            raise ValueError(f"{url!r}: give rtu+tcp://HOST:PORT")
        return ModbusConnectionConfig(
            transport="rtu_over_tcp", host=parts.hostname, port=parts.port or 502, **common
        )
    if scheme == "rtu":
        port = parts.path or parts.netloc
        if not port:
            raise ValueError(f"{url!r}: give rtu:///dev/ttyUSB0?baudrate=9600&parity=N")
        serial: dict[str, Any] = {"port": port}
        for key in ("baudrate", "stopbits", "bytesize"):
            if key in query:
                serial[key] = int(query[key])
        if "parity" in query:
            serial["parity"] = query["parity"].upper()[:1]
        return ModbusConnectionConfig(transport="rtu", serial=serial, **common)  # type: ignore[arg-type]
    raise ValueError(f"unknown scheme {parts.scheme!r}: use tcp://, rtu+tcp:// or rtu://")


_READ_RE = re.compile(r"^(?:(?P<area>[a-z_]+):)?(?P<start>\d+(?:\.\d+)?)(?::(?P<count>\d+))?$")


def parse_read(text: str) -> ReadSpec:
    """``40001:20`` (Modicon, one-based) or ``holding:0:20`` (area given: zero-based)."""
    match = _READ_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"--read {text!r}: use 40001:20 (Modicon reference and count) or holding:0:20 "
            "(area, zero-based address, count)"
        )
    count = int(match["count"] or 1)
    if match["area"] is not None:
        area = _AREA_ALIASES.get(match["area"])
        if area is None:
            raise ValueError(f"--read {text!r}: unknown area; use holding, input, coil, discrete")
        start = int(match["start"])
    else:
        area, start, _ = parse_ref(match["start"].split(".")[0])
    limit = MAX_BITS_PER_READ if area in BIT_AREAS else MAX_REGISTERS_PER_READ
    if not 1 <= count <= limit:
        raise ValueError(f"--read {text!r}: count must be 1..{limit} for {area}")
    if start + count > 65536:
        raise ValueError(f"--read {text!r}: runs past the last address 65535")
    return ReadSpec(area, start, count)


def _ascii(word: int) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in word.to_bytes(2, "big"))


def _float(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    magnitude = abs(value)
    if magnitude != 0 and not 1e-4 <= magnitude < 1e9:
        return "-"  # implausible: almost certainly not a float
    return f"{value:.6g}"


def _bcd(word: int) -> str:
    text = f"{word:04X}"
    return text if text.isdigit() else "-"


def render_registers(
    spec: ReadSpec, values: Sequence[int] | Sequence[bool], previous: Sequence[Any] | None = None
) -> list[str]:
    """Rows of a side-by-side table of every plausible reading; ``*`` marks a changed row."""
    changed = [
        previous is not None and i < len(previous) and previous[i] != v
        for i, v in enumerate(values)
    ]
    if spec.area in BIT_AREAS:
        rows = [f"  {'ref':>7}  {'addr':>5}  value"]
        for i, bit in enumerate(values):
            mark = "*" if changed[i] else " "
            rows.append(
                f"{mark} {format_ref(spec.area, spec.start + i):>7}  {spec.start + i:>5}  "
                f"{int(bool(bit))}"
            )
        return rows
    words = [int(v) for v in values]
    head = (
        f"  {'ref':>7}  {'addr':>5}  {'hex':>6}  {'uint16':>6}  {'int16':>6}  {'bcd':>4}  "
        f"{'ascii':5}  {'uint32 ABCD':>11}  {'int32 ABCD':>11}  {'float ABCD':>11}  "
        f"{'uint32 CDAB':>11}  {'int32 CDAB':>11}  {'float CDAB':>11}"
    )
    rows = [head]
    for i, word in enumerate(words):
        mark = "*" if changed[i] or (i + 1 < len(changed) and changed[i + 1]) else " "
        row = (
            f"{mark} {format_ref(spec.area, spec.start + i):>7}  {spec.start + i:>5}  "
            f"0x{word:04X}  {word:>6}  {struct.unpack('>h', word.to_bytes(2, 'big'))[0]:>6}  "
            f"{_bcd(word):>4}  {_ascii(word):5}"
        )
        if i + 1 < len(words):
            hi, lo = word.to_bytes(2, "big"), words[i + 1].to_bytes(2, "big")
            abcd, cdab = hi + lo, lo + hi
            row += (
                f"  {struct.unpack('>I', abcd)[0]:>11}  {struct.unpack('>i', abcd)[0]:>11}  "
                f"{_float(struct.unpack('>f', abcd)[0]):>11}  {struct.unpack('>I', cdab)[0]:>11}  "
                f"{struct.unpack('>i', cdab)[0]:>11}  {_float(struct.unpack('>f', cdab)[0]):>11}"
            )
        rows.append(row)
    text = bytes(b for w in words for b in w.to_bytes(2, "big"))
    swapped = bytes(b for w in words for b in w.to_bytes(2, "little"))
    rows.append(f"  as text (ABCD): {_printable(text)!r}")
    rows.append(f"  as text (BADC, bytes swapped): {_printable(swapped)!r}")
    return rows


def _printable(raw: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in raw.rstrip(b"\x00"))


def explain(error: BaseException | int, connection: ModbusConnectionConfig) -> str:
    """An error (or a Modbus exception code) in words, with what to try next."""
    where = connection.endpoint
    if isinstance(error, int):
        from adapters.modbus.adapter import describe_exception

        hint = _EXCEPTION_HINTS.get(error, "see the device manual for this exception code")
        return f"the device answered exception {describe_exception(error)}: {hint}"
    text = str(error)
    if isinstance(error, ConnectError):
        if "refused" in text:
            tip = (
                "is the device on and is this its address? Modbus TCP listens on 502 unless "
                "changed; a converter in RTU-over-TCP mode often uses 4001 or 8899"
            )
        elif "resolve" in text:
            tip = "check the host name, or use the IP address"
        elif "serial" in text:
            tip = "check the port name (ls /dev/serial/by-id/), and that you may open it (dialout)"
        else:
            tip = "check cabling, IP address and firewall"
        return f"{text}. Try: {tip}."
    if isinstance(error, ConnectionLost):
        if "no response" in text:
            tip = (
                f"the line to {where} is up but unit {connection.unit_id} is silent: check "
                "--unit (try --scan-units)"
            )
            if connection.transport == "rtu":
                tip += ", the baud rate and parity, and the A/B wiring"
            elif connection.transport == "tcp":
                tip += "; a serial converter may need rtu+tcp:// instead of tcp://"
            else:
                tip += "; the converter may expect Modbus TCP: try tcp://"
            return f"{text}. {tip}."
        return f"{text}. The device closed the connection: it may allow one client only."
    return text


def modbus_snippet(
    connection: ModbusConnectionConfig, found: Sequence[tuple[ReadSpec, Sequence[Any]]]
) -> str:
    """A ready-to-edit machine config for what was read (one uint16/bool signal per item)."""
    conn: dict[str, Any] = {"protocol": "modbus"}
    if connection.transport != "tcp":
        conn["transport"] = connection.transport
    if connection.serial is not None:
        conn["serial"] = connection.serial.model_dump(exclude_defaults=True, exclude={"port"})
        conn["serial"] = {"port": connection.serial.port, **conn["serial"]}
    else:
        conn.update(host=connection.host, port=connection.port)
    conn["unit_id"] = connection.unit_id
    signals: dict[str, Any] = {}
    for spec, values in found:
        for i in range(len(values)):
            ref = format_ref(spec.area, spec.start + i)
            name = f"{spec.area}_{spec.start + i}"
            body: dict[str, Any] = {"ref": ref}
            if spec.area not in BIT_AREAS:
                body["type"] = "uint16"
            signals[name] = body
    machine = {
        "id": "new-machine",
        "area": "area-1",
        "line": "line-1",
        "connection": conn,
        "signals": signals,
    }
    header = (
        "# Generated by shopfloor probe: rename the signals (state, good_count, ...), set types\n"
        "# (uint32/float32 span two registers: keep the first, delete the second), add maps.\n"
    )
    return header + yaml.safe_dump({"machines": [machine]}, sort_keys=False)


# ----------------------------------------------------------------------------- the shell


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``modbus`` and ``opcua`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="probe_protocol", required=True, metavar="PROTOCOL")
    m = sub.add_parser("modbus", help="read, decode and scan a Modbus device")
    m.add_argument(
        "endpoint",
        help="tcp://HOST[:502], rtu+tcp://HOST:PORT or rtu:///dev/ttyUSB0?baudrate=9600&parity=N",
    )
    m.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    m.add_argument(
        "--read",
        action="append",
        default=[],
        metavar="RANGE",
        help="40001:20 (Modicon ref, count) or holding:0:20 (zero-based); repeatable",
    )
    m.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        default=None,
        metavar="SECONDS",
        help="re-read every SECONDS (default 1) and mark changed rows with *",
    )
    m.add_argument(
        "--scan-units",
        nargs="?",
        const="1-247",
        default=None,
        metavar="FROM-TO",
        help="find the unit ids that answer (default 1-247)",
    )
    m.add_argument("--timeout", type=float, default=1.0, help="seconds per response (default 1)")
    m.add_argument("--emit-config", action="store_true", help="print a config snippet at the end")
    o = sub.add_parser("opcua", help="browse an OPC UA server's address space")
    o.add_argument("endpoint", help="opc.tcp://HOST:4840[/path]")
    o.add_argument("--find", default=None, metavar="NAME", help="search browse names (substring)")
    o.add_argument("--depth", type=int, default=6, help="levels below Objects (default 6)")
    o.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    o.add_argument("--emit-config", action="store_true", help="print a config snippet at the end")


async def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the probe; 0 when it could talk to the device, 1 when not, 2 for bad arguments."""
    stream = out or sys.stdout
    if args.probe_protocol == "opcua":
        return await _run_opcua(args, stream)
    return await _run_modbus(args, stream)


async def _run_modbus(args: argparse.Namespace, out: TextIO) -> int:
    from adapters.modbus import line as lines
    from adapters.modbus.line import ExceptionResponse

    try:
        connection = parse_endpoint(args.endpoint, args.unit, args.timeout)
        specs = [parse_read(text) for text in args.read]
        scan = _parse_range(args.scan_units) if args.scan_units else None
    except ValueError as exc:
        out.write(f"error: {exc}\n")
        return 2
    if not specs and scan is None:
        specs = [ReadSpec("holding", 0, 10)]
    try:
        line = await lines.acquire(connection)
    except ConnectError as exc:
        out.write(f"error: {explain(exc, connection)}\n")
        return 1
    try:
        if scan is not None:
            found = await _scan(line, scan, args.timeout, out)
            if not found:
                return 1
        previous: dict[int, Sequence[Any]] = {}
        results: list[tuple[ReadSpec, Sequence[Any]]] = []
        status = 0
        while specs:
            results.clear()
            for index, spec in enumerate(specs):
                try:
                    result = await line.read(
                        connection.unit_id,
                        spec.area,
                        spec.start,
                        spec.count,
                        reply_within=connection.timeout,
                    )
                except ConnectionLost as exc:
                    out.write(f"error: {explain(exc, connection)}\n")
                    return 1
                label = f"{spec.area} {spec.start}..{spec.start + spec.count - 1}"
                out.write(
                    f"unit {connection.unit_id} {label} ({format_ref(spec.area, spec.start)})\n"
                )
                if isinstance(result, ExceptionResponse):
                    out.write(f"  {explain(result.code, connection)}\n")
                    status = 1
                    continue
                for row in render_registers(spec, result, previous.get(index)):
                    out.write(row + "\n")
                previous[index] = result
                results.append((spec, result))
            if args.watch is None:
                break
            out.flush()
            await asyncio.sleep(args.watch)
            out.write("\n")
        if args.emit_config and results:
            out.write(modbus_snippet(connection, results))
        return status
    finally:
        lines.release(line)


def _parse_range(text: str) -> range:
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--scan-units {text!r}: use FROM-TO, e.g. 1-247") from None
    if not 0 <= low <= high <= 247:
        raise ValueError(f"--scan-units {text!r}: unit ids are 0..247")
    return range(low, high + 1)


async def _scan(line: Any, units: range, patience: float, out: TextIO) -> list[int]:
    """Ask every unit for holding register 0; any answer (even an exception) means present."""
    from adapters.modbus.line import ExceptionResponse, NoResponse

    found: list[int] = []
    # A present device answers fast; absent units are what the scan mostly waits for.
    wait = min(patience, 0.3)
    for unit in units:
        try:
            result = await line.read(unit, "holding", 0, 1, reply_within=wait)
        except NoResponse:
            continue
        if isinstance(result, ExceptionResponse) and result.code in (10, 11):
            continue  # the TCP gateway says nobody is there
        note = (
            f"answers (exception {result.code} at holding 0, but it is there)"
            if isinstance(result, ExceptionResponse)
            else f"answers (holding 0 = {result[0]})"
        )
        out.write(f"unit {unit}: {note}\n")
        found.append(unit)
    if not found:
        out.write(
            f"no unit answered among {units.start}..{units.stop - 1}: check the transport "
            "(tcp:// vs rtu+tcp://), baud rate and parity, and wiring\n"
        )
    return found


async def _run_opcua(args: argparse.Namespace, out: TextIO) -> int:
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.ua.uaerrors import UaError

    client = Client(args.endpoint, timeout=args.timeout)
    try:
        async with asyncio.timeout(args.timeout * 2):
            await client.connect()
    except (TimeoutError, OSError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        out.write(
            f"error: cannot connect to {args.endpoint}: {reason}. Try: check host and port "
            "(4840 is the default), that the server runs, and the path after the port.\n"
        )
        return 1
    except UaError as exc:
        out.write(f"error: {args.endpoint} refused the session: {exc}. Try: security settings.\n")
        return 1
    variables: list[tuple[str, str]] = []
    try:
        root = client.nodes.objects
        needle = args.find.lower() if args.find else None

        async def walk(node: Any, depth: int, prefix: str) -> None:
            if depth > args.depth:
                return
            for child in await node.get_children(refs=33):  # hierarchical references
                name = (await child.read_browse_name()).to_string()
                node_class = await child.read_node_class()
                path = f"{prefix}/{name}" if prefix else name
                line = f"{'  ' * depth}{name}  [{child.nodeid.to_string()}]"
                if node_class == ua.NodeClass.Variable:
                    try:
                        dv = await child.read_data_value()
                        variant = dv.Value
                        line += f"  {variant.VariantType.name} = {variant.Value!r}"
                    except UaError as exc:
                        line += f"  (unreadable: {exc})"
                    variables.append((path, child.nodeid.to_string()))
                if needle is None or needle in name.lower():
                    out.write((line if needle is None else f"{path}  {line.strip()}") + "\n")
                if node_class == ua.NodeClass.Object and not name.startswith("0:Server"):
                    await walk(child, depth + 1, path)

        await walk(root, 0, "")
    finally:
        await client.disconnect()
    if args.emit_config:
        hits = [v for v in variables if not args.find or args.find.lower() in v[0].lower()]
        signals = {
            re.sub(r"[^a-z0-9_]+", "_", path.rsplit("/", 1)[-1].split(":")[-1].lower()).strip("_")
            or "value": {"node_id": node_id}
            for path, node_id in hits
        }
        snippet = {
            "machines": [
                {
                    "id": "new-machine",
                    "area": "area-1",
                    "line": "line-1",
                    "connection": {"protocol": "opcua", "url": args.endpoint},
                    "signals": signals,
                }
            ]
        }
        out.write("# Generated by shopfloor probe: keep the signals you need, rename them.\n")
        out.write(yaml.safe_dump(snippet, sort_keys=False))
    return 0
