"""Start-up checks: what ``run`` needs from the machine beyond a valid config file.

A config can be valid and still not start: an optional package is missing, a TLS file does
not load, the state dir is not writable, the health port is taken, or another gateway runs
on the same state dir. ``shopfloor check`` and ``shopfloor run`` both call :func:`check`, so
whatever would stop ``run`` at start is reported by ``check`` first, with the same
``file:line: field: what to fix`` message as the config errors.

The single-instance lock (:class:`InstanceLock`) is an ``fcntl.flock`` on a lock file next to
the outbox, in the state dir, with the holder's pid written in it. ``run`` takes it before
the outbox opens and holds it for the life of the process (the kernel drops it when the
process ends, however it ends, so a stale file never blocks a restart). The file is never
deleted: removing a lock file while another process waits on it is a race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gateway.config.loader import GatewayPlan
from gateway.config.yamlsource import Located, Path_, SourceError, format_path, load

#: Name of the lock file, beside the outbox file it protects.
LOCK_SUFFIX = ".lock"


class AlreadyRunning(Exception):
    """Another process holds the state dir's lock; ``pid`` is its pid when it wrote one."""

    def __init__(self, lock_path: Path, pid: int | None) -> None:
        self.lock_path = lock_path
        self.pid = pid
        super().__init__(f"already running (pid {pid if pid is not None else 'unknown'})")


def outbox_path(plan: GatewayPlan) -> Path:
    """The outbox file of a plan (as :func:`gateway.runtime.gateway.outbox_plan`, without its
    imports)."""
    return plan.outbox.path if plan.outbox is not None else Path("var") / "shopfloor-outbox.db"


def lock_path(plan: GatewayPlan) -> Path:
    """The lock file of the plan's outbox (``{state_dir}/shopfloor-outbox.db.lock``)."""
    db = outbox_path(plan)
    return db.with_name(db.name + LOCK_SUFFIX)


class InstanceLock:
    """An exclusive, non-blocking ``flock`` held while the object is open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid; :class:`AlreadyRunning` if someone holds it."""
        # O_CLOEXEC (Python's default): a child process must not inherit the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file drops it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holder(path: Path) -> AlreadyRunning | None:
    """Who holds the lock at ``path`` (pid ``None`` when unknown), or ``None`` when free."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            # A shared lock is enough to learn whether an exclusive one is held. A gateway
            # starting in this very microsecond would take it for held and stop with a clear
            # line (systemd starts it again); nothing is damaged either way.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return AlreadyRunning(path, _read_pid(fd))
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- checks


@dataclass(slots=True)
class _Report:
    """Collects problems with the line of the field they concern."""

    src: Located
    problems: list[SourceError]

    def add(self, path: Path_, message: str) -> None:
        line = self.src.line_of(path) or 1
        self.problems.append(SourceError(self.src.file, line, format_path(path), message))


def check(plan: GatewayPlan, *, devices: bool = False) -> list[SourceError]:
    """Every reason ``run`` would fail at start with this plan on this machine.

    With ``devices``, also the OPC UA certificate, key and trust files, which ``run`` only
    loads when it connects to that machine (which then stays offline, the others run):
    ``check`` reports them, ``run`` does not refuse to start for them.

    Nothing is left behind: the state dir is probed with a temporary file, ports with a
    socket that is closed again, the lock with a shared lock that is released at once.
    """
    src = load(plan.source)
    report = _Report(src, [])
    _check_packages(plan, report)
    _check_tls(plan, report)
    if devices:
        _check_device_files(plan, report)
    running = _check_state_dir(plan, report) and _check_lock(plan, report)
    if not running:
        # A gateway running on this state dir holds its own health port: saying so twice
        # would only suggest a second, unrelated conflict.
        _check_health_port(plan, report)
    return report.problems


def _check_packages(plan: GatewayPlan, report: _Report) -> None:
    if plan.influxdb is None:
        return
    try:
        # The modules InfluxSink imports when the gateway starts.
        importlib.import_module("influxdb_client.client.influxdb_client")
        importlib.import_module("influxdb_client.client.write_api")
    except ImportError as exc:
        report.add(
            ("influxdb",),
            f"the influxdb_client package is not installed ({exc}): install it "
            "(pip install 'shopfloor-gateway[influxdb]', or deploy/install.sh "
            "--with-influxdb), or remove the influxdb: section",
        )


def _destination_bases(plan: GatewayPlan, src: Located) -> list[Path_]:
    data = src.data if isinstance(src.data, dict) else {}
    if data.get("broker") is not None:
        return [("broker",)]
    return [("destinations", i) for i in range(len(plan.destinations))]


def _readable(path: str) -> str | None:
    """Why ``path`` cannot be read, or ``None`` when it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc} (the gateway's user must be able to read it)"
    return None


def _ssl_reason(exc: ssl.SSLError | OSError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc.strerror or exc)


def _check_tls(plan: GatewayPlan, report: _Report) -> None:
    for base, d in zip(_destination_bases(plan, report.src), plan.destinations, strict=False):
        tls = d.broker.tls
        if tls is None:
            continue
        bad = False
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(tls, key)
            reason = _readable(value) if value is not None else None
            if reason is not None:
                report.add((*base, "tls", key), reason)
                bad = True
        if bad:
            continue
        try:
            ctx = ssl.create_default_context(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            report.add(
                (*base, "tls", "ca_file"),
                f"{tls.ca_file} is not a usable CA certificate ({_ssl_reason(exc)}): "
                "give the CA that signed the broker's certificate, in PEM format",
            )
            continue
        if tls.cert_file is not None:
            try:
                # No password prompt on a terminal: the service has none to answer it.
                ctx.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                report.add(
                    (*base, "tls", "cert_file"),
                    f"cannot load the client certificate {tls.cert_file} with key "
                    f"{tls.key_file} ({_ssl_reason(exc)}): both must be PEM, the key "
                    "unencrypted and belonging to the certificate",
                )
                continue
        # Exactly what the publisher does at start, in case it ever checks more than above.
        from gateway.delivery.mqtt.publisher import tls_context

        try:
            tls_context(tls)
        except ValueError as exc:
            report.add((*base, "tls"), str(exc))
    influx = plan.influxdb
    if influx is not None and influx.ca_file:
        reason = _readable(influx.ca_file)
        if reason is None:
            try:
                ssl.create_default_context(cafile=influx.ca_file)
            except (ssl.SSLError, OSError) as exc:
                reason = (
                    f"{influx.ca_file} is not a usable CA certificate ({_ssl_reason(exc)}): "
                    "give it in PEM format"
                )
        if reason is not None:
            report.add(("influxdb", "ca_file"), reason)


def _check_device_files(plan: GatewayPlan, report: _Report) -> None:
    for i, m in enumerate(plan.machines):
        if m.protocol.name != "opcua":
            continue
        conn: Any = m.connection
        sec = conn.security
        base: Path_ = ("machines", i, "connection")
        if sec.policy != "None":
            password = sec.private_key_password
            key_pw = password.get_secret_value().encode() if password is not None else None
            if sec.certificate is not None:
                _load_certificate(report, (*base, "security", "certificate"), sec.certificate)
            if sec.private_key is not None:
                _load_key(report, (*base, "security", "private_key"), sec.private_key, key_pw)
            from shopfloor_gateway.adapters.opcua.security import SecuritySetupError, load_trust

            try:
                load_trust(sec.trust)
            except SecuritySetupError as exc:
                report.add((*base, "security", "trust"), str(exc).removeprefix("security.trust: "))
        if conn.user_certificate is not None:
            _load_certificate(report, (*base, "user_certificate"), conn.user_certificate)
        if conn.user_private_key is not None:
            _load_key(report, (*base, "user_private_key"), conn.user_private_key, None)


def _load_certificate(report: _Report, where: Path_, path: Path) -> None:
    from cryptography import x509

    reason = _readable(str(path))
    if reason is None:
        data = path.read_bytes()
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                x509.load_pem_x509_certificate(data)
            else:
                x509.load_der_x509_certificate(data)
        except ValueError as exc:
            reason = f"{path} is not a certificate in PEM or DER ({_short(exc)})"
    if reason is not None:
        report.add(where, reason)


def _load_key(report: _Report, where: Path_, path: Path, password: bytes | None) -> None:
    from cryptography.hazmat.primitives import serialization

    reason = _readable(str(path))
    if reason is None:
        data = path.read_bytes()
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                serialization.load_pem_private_key(data, password)
            else:
                serialization.load_der_private_key(data, password)
        except (ValueError, TypeError) as exc:
            reason = (
                f"{path} is not a usable private key in PEM or DER ({_short(exc)}); an encrypted "
                "key needs private_key_password"
            )
    if reason is not None:
        report.add(where, reason)


def _short(exc: Exception) -> str:
    """The first clause of a cryptography error (the rest is parser internals)."""
    text = str(exc)
    for stop in (". ", " {", ": ParseError"):
        text = text.split(stop, 1)[0]
    return text


def _state_field(report: _Report) -> Path_:
    data = report.src.data if isinstance(report.src.data, dict) else {}
    outbox = data.get("outbox")
    if isinstance(outbox, dict) and outbox.get("path") is not None:
        return ("outbox", "path")
    return ("state_dir",)


def _check_state_dir(plan: GatewayPlan, report: _Report) -> bool:
    """Whether the outbox's directory exists (or can be created) and takes new files."""
    db = outbox_path(plan)
    where = _state_field(report)
    hint = (
        "make it writable for the gateway's user, or set state_dir to a writable directory"
        if where == ("state_dir",)
        else "make its directory writable for the gateway's user, or change outbox.path"
    )
    directory = db.parent
    # The gateway creates missing directories: the nearest existing one must take them.
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        report.add(where, f"cannot create {directory}: {existing} is not a directory; {hint}")
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".shopfloor-check-", dir=existing)
    except OSError as exc:
        why = f"{exc.strerror or exc}: {existing}"
        if existing == directory:
            report.add(where, f"the state dir {directory} is not writable ({why}); {hint}")
        else:
            report.add(
                where,
                f"the state dir {directory} does not exist and cannot be created ({why}); "
                f"create it for the gateway's user (deploy/install.sh does), or {hint}",
            )
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    if db.exists():
        try:
            with open(db, "r+b"):
                pass
        except OSError as exc:
            report.add(where, f"the outbox {db} cannot be opened ({exc.strerror or exc}); {hint}")
            return False
    return existing == directory


def _check_lock(plan: GatewayPlan, report: _Report) -> bool:
    """Whether a gateway runs on this state dir (reported as a problem)."""
    held = holder(lock_path(plan))
    if held is None:
        return False
    report.add(
        _state_field(report),
        already_running_message(held)
        + "; to check a change for the running gateway before `systemctl reload "
        "shopfloor`, use `shopfloor check --config-only`",
    )
    return True


def take_lock(plan: GatewayPlan) -> InstanceLock | SourceError:
    """For ``run``: the state dir's lock, held until released, or the problem that stops it."""
    lock = InstanceLock(lock_path(plan))
    report = _Report(load(plan.source), [])
    try:
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except AlreadyRunning as exc:
        report.add(_state_field(report), already_running_message(exc))
    except OSError as exc:
        report.add(_state_field(report), f"cannot lock {lock.path}: {exc.strerror or exc}")
    return report.problems[0] if report.problems else lock


def already_running_message(exc: AlreadyRunning) -> str:
    """What to say when another gateway holds the state dir."""
    pid = exc.pid if exc.pid is not None else "unknown"
    return (
        f"already running (pid {pid}): another gateway holds {exc.lock_path}; stop it "
        "(systemctl stop shopfloor), or give this config its own state_dir"
    )


def _check_health_port(plan: GatewayPlan, report: _Report) -> None:
    if plan.health_listen is None:
        return
    host, port = plan.health_listen
    if port == 0:
        return
    problem = port_problem(host, port)
    if problem is not None:
        report.add(
            ("health", "listen"),
            f"{problem}: set health.listen to a free port, or null to switch "
            "/healthz and /metrics off",
        )


def port_problem(host: str, port: int) -> str | None:
    """Why a TCP server could not listen on ``host:port`` now, or ``None``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As asyncio's start_server does: a port in TIME_WAIT is free for a listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already taken by another program"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges the gateway's user does not have"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None
