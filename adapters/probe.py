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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import parse_qs, urlsplit

import structlog
import yaml

from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.modbus.config import (
    BIT_AREAS,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    ModbusConnectionConfig,
    RegisterArea,
    format_ref,
    parse_ref,
)

if TYPE_CHECKING:
    from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig

log = structlog.get_logger(__name__)

#: Environment variable with the OPC UA password for ``probe opcua --username``.
PASSWORD_ENV = "SHOPFLOOR_OPCUA_PASSWORD"

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
        from shopfloor_gateway.adapters.modbus.adapter import describe_exception

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
    # The same meaning as the connection's config keys (adapters/opcua/README.md).
    sec = o.add_argument_group("security and identity (as the connection's config keys)")
    sec.add_argument(
        "--policy",
        default="None",
        help="security.policy: None (default), Basic256Sha256, Aes128_Sha256_RsaOaep, "
        "Aes256_Sha256_RsaPss",
    )
    sec.add_argument(
        "--security-mode",
        default=None,
        metavar="MODE",
        help="security.mode: SignAndEncrypt (default with a policy) or Sign",
    )
    sec.add_argument("--certificate", type=Path, help="security.certificate (the gateway's)")
    sec.add_argument("--private-key", type=Path, help="security.private_key")
    sec.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="security.trust: the server's certificate or a directory of them; repeatable",
    )
    sec.add_argument(
        "--allow-untrusted",
        action="store_true",
        help="security.allow_untrusted: accept an unknown server certificate (commissioning)",
    )
    sec.add_argument(
        "--rejected-dir",
        type=Path,
        help="security.rejected_dir: save a refused server certificate here",
    )
    sec.add_argument("--application-uri", help="application_uri (default: from the certificate)")
    sec.add_argument(
        "--username", help=f"username (the password from --password-file or ${PASSWORD_ENV})"
    )
    sec.add_argument(
        "--password-file",
        type=Path,
        help="file holding the password (first line); never on the command line",
    )
    sec.add_argument("--user-certificate", type=Path, help="user_certificate (X.509 identity)")
    sec.add_argument("--user-private-key", type=Path, help="user_private_key")


async def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the probe; 0 when it could talk to the device, 1 when not, 2 for bad arguments."""
    stream = out or sys.stdout
    if args.probe_protocol == "opcua":
        return await _run_opcua(args, stream)
    return await _run_modbus(args, stream)


async def _run_modbus(args: argparse.Namespace, out: TextIO) -> int:
    from shopfloor_gateway.adapters.modbus.line import ExceptionResponse, LinePool

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
        pool = LinePool()
        line = await pool.acquire(connection)
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
        pool.close()


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
    from shopfloor_gateway.adapters.modbus.line import ExceptionResponse, NoResponse

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


def opcua_connection(args: argparse.Namespace, env: Mapping[str, str]) -> OpcUaConnectionConfig:
    """The probe's options as the adapter's connection config; ``ValueError`` says what to fix."""
    from pydantic import ValidationError

    from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig

    body: dict[str, Any] = {"url": args.endpoint, "timeout": args.timeout}
    security: dict[str, Any] = {"policy": args.policy}
    for key in ("certificate", "private_key", "rejected_dir"):
        if getattr(args, key) is not None:
            security[key] = getattr(args, key)
    if args.security_mode is not None:
        security["mode"] = args.security_mode
    if args.trust:
        security["trust"] = tuple(args.trust)
    if args.allow_untrusted:
        security["allow_untrusted"] = True
    body["security"] = security
    for key in ("application_uri", "user_certificate", "user_private_key"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.username is not None:
        body["username"] = args.username
        body["password"] = _password(args.password_file, env)
    elif args.password_file is not None:
        raise ValueError("--password-file needs --username")
    try:
        return OpcUaConnectionConfig(**body)
    except ValidationError as exc:
        problems = "; ".join(_option_error(e) for e in exc.errors())
        raise ValueError(problems) from None


def _password(path: Path | None, env: Mapping[str, str]) -> str:
    """The password from a file (first line) or the environment; never from argv."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"--password-file: cannot read {str(path)!r}: {exc.strerror}") from exc
        if not text or not text[0]:
            raise ValueError(f"--password-file: {str(path)!r} is empty")
        return text[0]
    password = env.get(PASSWORD_ENV)
    if not password:
        raise ValueError(
            f"--username needs a password: --password-file FILE, or set ${PASSWORD_ENV}"
        )
    return password


#: Config keys to the probe options that set them, for error messages.
_OPTION_OF = {
    "policy": "--policy",
    "mode": "--security-mode",
    "certificate": "--certificate",
    "private_key": "--private-key",
    "trust": "--trust",
    "rejected_dir": "--rejected-dir",
    "application_uri": "--application-uri",
    "url": "endpoint",
}


def _option_error(error: Mapping[str, Any]) -> str:
    """One validation error in the probe's words (option names, not config paths)."""
    where = [str(p) for p in error.get("loc", ()) if not isinstance(p, int)]
    option = next((_OPTION_OF[w] for w in reversed(where) if w in _OPTION_OF), None)
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if option:
        return f"{option}: {message}"
    if "security" in where:
        # A rule across several keys: name the probe's options for them.
        return (
            f"{message} (probe options: --policy, --security-mode, --certificate, "
            "--private-key, --trust, --allow-untrusted)"
        )
    return message


def opcua_snippet(
    connection: OpcUaConnectionConfig,
    variables: Sequence[tuple[Sequence[str], str]],
) -> tuple[str, dict[str, str]]:
    """A machine config for the browsed variables, and the signal name of every NodeId.

    ``variables``: (browse path as names, portable NodeId) per variable. Every variable
    gets a signal of its own: names are the browse name, qualified by as many parent names
    as it takes to be unique (``lamp_green_signalon``), never dropped. The connection keeps
    the security and identity options given, with the password as a placeholder.
    """
    names = unique_signal_names([path for path, _ in variables])
    signals = {
        name: {"node_id": node_id} for name, (_, node_id) in zip(names, variables, strict=True)
    }
    conn: dict[str, Any] = {"protocol": "opcua", "url": connection.url}
    sec = connection.security
    if sec.policy != "None":
        security: dict[str, Any] = {"policy": sec.policy, "mode": sec.effective_mode}
        for key in ("certificate", "private_key", "rejected_dir"):
            if getattr(sec, key) is not None:
                security[key] = str(getattr(sec, key))
        if sec.trust:
            security["trust"] = [str(p) for p in sec.trust]
        if sec.allow_untrusted:
            security["allow_untrusted"] = True
        conn["security"] = security
    if connection.application_uri:
        conn["application_uri"] = connection.application_uri
    if connection.username is not None:
        conn["username"] = connection.username
        conn["password"] = "${OPCUA_PASSWORD}"
    if connection.user_certificate is not None and connection.user_private_key is not None:
        conn["user_certificate"] = str(connection.user_certificate)
        conn["user_private_key"] = str(connection.user_private_key)
    machine = {
        "id": "new-machine",
        "area": "area-1",
        "line": "line-1",
        "connection": conn,
        "signals": signals,
    }
    header = (
        f"# Generated by shopfloor probe: {len(signals)} signals for {len(variables)} variables.\n"
        "# Keep the signals you need and rename them (state, good_count, ...); NodeIds are in\n"
        "# the portable nsu= form (namespace by URI).\n"
    )
    return header + yaml.safe_dump({"machines": [machine]}, sort_keys=False), dict(
        zip((v[1] for v in variables), names, strict=True)
    )


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")


def unique_signal_names(paths: Sequence[Sequence[str]]) -> list[str]:
    """A config signal name per browse path, all distinct.

    The last browse name alone where it is unique; where several share it, each takes its
    parents' names in front until they differ; what still collides (names that differ
    only in characters a signal name cannot hold) gets ``_2``, ``_3``...
    """
    parts = [
        [_snake(name.split(":", 1)[-1]) or "value" for name in path] or ["value"] for path in paths
    ]
    depth = [1] * len(parts)

    def name(i: int) -> str:
        return "_".join(p for p in parts[i][-depth[i] :] if p)

    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(parts)):
            groups.setdefault(name(i), []).append(i)
        grow = [
            i for same in groups.values() if len(same) > 1 for i in same if depth[i] < len(parts[i])
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out: list[str] = []
    taken: set[str] = set()
    for i in range(len(parts)):
        base = name(i)
        if not base[0].isalpha():
            base = f"n_{base}"
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def portable_node_id(node_id: Any, namespaces: Sequence[str]) -> str:
    """``nsu=<namespace URI>;s=...`` for a server namespace; ``i=2258`` for namespace 0."""
    text = str(node_id.to_string())
    index = int(node_id.NamespaceIndex)
    if index == 0 or index >= len(namespaces):
        return text
    identifier = text.split(";", 1)[1] if text.startswith("ns=") else text
    return f"nsu={namespaces[index]};{identifier}"


async def _run_opcua(args: argparse.Namespace, out: TextIO) -> int:
    import os
    import time

    from asyncua import ua
    from asyncua.ua.uaerrors import UaError

    from shopfloor_gateway.adapters.opcua.adapter import (
        ConnectFailed,
        connect,
        explain_connect_error,
        new_client,
    )

    try:
        connection = opcua_connection(args, os.environ)
    except ValueError as exc:
        out.write(f"error: {exc}\n")
        return 2
    client = new_client(connection, "probe")
    try:
        await connect(client, connection, time.time())
    except ConnectFailed as failed:
        event, error = explain_connect_error(
            connection, failed.cause, secured_handshake=failed.secured_handshake
        )
        tip = ""
        if event is None and isinstance(failed.cause, TimeoutError | OSError):
            tip = (
                " Try: check host and port (4840 is the default), that the server runs, and "
                "the path after the port."
            )
        out.write(f"error: {error}.{tip}\n")
        return 1
    variables: list[tuple[list[str], str]] = []
    try:
        namespaces = list(await client.get_namespace_array())
        root = client.nodes.objects
        needle = args.find.lower() if args.find else None

        async def walk(node: Any, depth: int, prefix: str, names: list[str]) -> None:
            if depth > args.depth:
                return
            for child in await node.get_children(refs=33):  # hierarchical references
                browse = await child.read_browse_name()
                name = browse.to_string()
                node_class = await child.read_node_class()
                path = f"{prefix}/{name}" if prefix else name
                here = [*names, str(browse.Name)]
                line = f"{'  ' * depth}{name}  [{child.nodeid.to_string()}]"
                if node_class == ua.NodeClass.Variable:
                    try:
                        dv = await child.read_data_value()
                        variant = dv.Value
                        line += f"  {variant.VariantType.name} = {variant.Value!r}"
                    except UaError as exc:
                        line += f"  (unreadable: {exc})"
                    if needle is None or needle in name.lower():
                        variables.append((here, portable_node_id(child.nodeid, namespaces)))
                if needle is None or needle in name.lower():
                    out.write((line if needle is None else f"{path}  {line.strip()}") + "\n")
                if node_class == ua.NodeClass.Object and not name.startswith("0:Server"):
                    await walk(child, depth + 1, path, here)

        await walk(root, 0, "", [])
    finally:
        await client.disconnect()
    if args.emit_config:
        snippet, _ = opcua_snippet(connection, variables)
        out.write(snippet)
    return 0
