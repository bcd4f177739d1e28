"""Every way ``shopfloor run`` fails at start, and ``shopfloor check`` reporting it first.

Each case sets up one real problem (a missing optional package, TLS files that do not load,
a state dir that takes no files, a taken health port, a gateway already running on the
state dir), then runs the real CLI as a subprocess: ``check`` must name the problem with
``file:line: field:`` and exit 2; ``run`` must stop with one ``cannot start:`` line per
problem, exit 1, and no traceback. A clean config passes both (``run`` then keeps running).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.runtime.preflight import LOCK_SUFFIX
from tests.brokers import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, *, extra: str = "", broker: str = "") -> Path:
    """A valid config whose broker and machine are unreachable: run keeps retrying them."""
    dead = free_port()
    text = (
        "gateway: {id: gw-start, site: plant-1}\n"
        + (broker or f"broker: {{host: 127.0.0.1, port: {dead}}}\n")
        + "state_dir: state\n"
        + "health: {listen: null}\n"
        + "machines:\n"
        + "  - id: sew-01\n"
        + "    area: sewing\n"
        + "    line: line-1\n"
        + "    profile: sewing-station\n"
        + f"    connection: {{protocol: modbus, host: 127.0.0.1, port: {dead}}}\n"
        + extra
    )
    path = tmp / "gateway.yaml"
    path.write_text(text)
    return path


def _line_of(config: Path, start: str) -> int:
    """Line number (1-based) of the first line of ``config`` that starts with ``start``."""
    for n, line in enumerate(config.read_text().splitlines(), 1):
        if line.startswith(start):
            return n
    raise AssertionError(f"{start!r} not in {config}")


async def _cli(
    *args: str, env: dict[str, str] | None = None, within: float = 30.0
) -> tuple[int, str]:
    """Run ``python -m gateway ARGS``; exit code and stderr+stdout. Killed after ``within``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        async with asyncio.timeout(within):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -9, out.decode()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# ---------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One start-up failure: its config, its environment, the field and text it reports."""

    config: Path
    field: str
    line_start: str
    text: str
    env: dict[str, str] | None = None


def _missing_influx(tmp: Path) -> Iterator[Case]:
    # An import hook that hides influxdb_client, as on an install without --with-influxdb.
    hide = tmp / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'influxdb_client':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    config = _config(tmp, extra="influxdb: {url: 'http://127.0.0.1:1', org: o, bucket: b}\n")
    yield Case(
        config,
        "influxdb",
        "influxdb:",
        "influxdb_client package is not installed",
        env={"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"},
    )


def _pem_pair(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, in PEM."""
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "gw-start")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "client.pem", tmp / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _tls_broker(ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    files = f"ca_file: {ca}" + (f", cert_file: {cert}, key_file: {key}" if cert and key else "")
    return f"broker: {{host: 127.0.0.1, port: {free_port()}, tls: {{{files}}}}}\n"


def _invalid_ca(tmp: Path) -> Iterator[Case]:
    # The finding: a file with invalid content passed check, then run died with a traceback.
    ca = tmp / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    config = _config(tmp, broker=_tls_broker(ca))
    yield Case(config, "broker.tls.ca_file", "broker:", "is not a usable CA certificate")


def _mismatched_key(tmp: Path) -> Iterator[Case]:
    cert, _ = _pem_pair(tmp)
    other = tmp / "other"
    other.mkdir()
    _, wrong_key = _pem_pair(other)
    ca = tmp / "ca.pem"
    shutil.copy(cert, ca)
    config = _config(tmp, broker=_tls_broker(ca, cert, wrong_key))
    yield Case(config, "broker.tls.cert_file", "broker:", "cannot load the client certificate")


def _encrypted_key(tmp: Path) -> Iterator[Case]:
    # A key that needs a passphrase: the service has no terminal to type it on.
    cert, plain = _pem_pair(tmp)
    ca = tmp / "ca.pem"
    shutil.copy(cert, ca)
    key = serialization.load_pem_private_key(plain.read_bytes(), None)
    plain.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = _config(tmp, broker=_tls_broker(ca, cert, plain))
    yield Case(config, "broker.tls.cert_file", "broker:", "the key unencrypted")


def _state_dir_read_only(tmp: Path) -> Iterator[Case]:
    state = tmp / "state"
    state.mkdir()
    mounted = False
    if os.geteuid() == 0:
        # Root writes through any mode bits: a read-only filesystem is what stops root.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(state)], check=True
        )
        mounted = True
    else:
        state.chmod(0o555)
    try:
        config = _config(tmp)
        yield Case(config, "state_dir", "state_dir:", "is not writable")
    finally:
        if mounted:
            subprocess.run(["umount", str(state)], check=True)
        else:
            state.chmod(0o755)


def _state_dir_under_a_file(tmp: Path) -> Iterator[Case]:
    (tmp / "blocker").write_text("a file where the state dir's parent should be\n")
    config = _config(tmp)
    config.write_text(config.read_text().replace("state_dir: state", "state_dir: blocker/state"))
    yield Case(config, "state_dir", "state_dir:", "is not a directory")


def _health_port_taken(tmp: Path) -> Iterator[Case]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = _config(tmp)
        config.write_text(
            config.read_text().replace(
                "health: {listen: null}", f"health: {{listen: '127.0.0.1:{port}'}}"
            )
        )
        yield Case(config, "health.listen", "health:", f"port {port} on 127.0.0.1 is already")


CASES: dict[str, Callable[[Path], Iterator[Case]]] = {
    "optional package missing": _missing_influx,
    "TLS CA file invalid": _invalid_ca,
    "TLS key not the certificate's": _mismatched_key,
    "TLS key encrypted": _encrypted_key,
    "state dir read-only": _state_dir_read_only,
    "state dir cannot be created": _state_dir_under_a_file,
    "health port taken": _health_port_taken,
}


@pytest.mark.parametrize("name", list(CASES))
async def test_check_reports_first_what_stops_run(name: str, tmp_path: Path) -> None:
    with contextlib.contextmanager(CASES[name])(tmp_path) as case:
        where = f"{case.config}:{_line_of(case.config, case.line_start)}: {case.field}: "
        code, out = await _cli("check", "-c", str(case.config), env=case.env)
        assert code == 2, out
        assert where in out and case.text in out, out
        assert "Traceback" not in out

        code, out = await _cli("run", "-c", str(case.config), env=case.env)
        assert code == 1, out
        problems = [line for line in out.splitlines() if line.startswith("cannot start: ")]
        assert problems and problems[0].startswith(f"cannot start: {where}"), out
        assert case.text in problems[0]
        assert "Traceback" not in out


# ---------------------------------------------------------------------------- one state dir


@contextlib.asynccontextmanager
async def _running(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "-c",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _pid_in(lock: Path) -> str:
    return lock.read_text().strip() if lock.exists() else ""


async def _lock_holder(lock: Path, proc: asyncio.subprocess.Process) -> None:
    """Wait until ``proc`` wrote its pid into the lock file (the outbox opens after it)."""
    async with asyncio.timeout(20):
        while _pid_in(lock) != str(proc.pid):
            assert proc.returncode is None, "the first gateway stopped"
            await asyncio.sleep(0.05)


async def test_second_instance_on_one_state_dir_refuses_to_start(tmp_path: Path) -> None:
    # The finding: two instances on one state dir both started; one crashed 4 s later with
    # "UNIQUE constraint failed: messages.seq".
    config = _config(tmp_path)
    # The first gateway holds its health port too: check must not report it as a second,
    # unrelated problem.
    config.write_text(
        config.read_text().replace(
            "health: {listen: null}", f"health: {{listen: '127.0.0.1:{free_port()}'}}"
        )
    )
    lock = tmp_path / "state" / ("shopfloor-outbox.db" + LOCK_SUFFIX)
    where = f"{config}:{_line_of(config, 'state_dir:')}: state_dir: "
    async with _running(config, tmp_path / "first.log") as first:
        await _lock_holder(lock, first)

        code, out = await _cli("check", "-c", str(config))
        assert code == 2, out
        assert f"{where}already running (pid {first.pid})" in out, out
        assert "1 problem(s) found" in out, out
        # A change for the running gateway is checked without what only a start needs.
        code, out = await _cli("check", "--config-only", "-c", str(config))
        assert code == 0, out

        code, out = await _cli("run", "-c", str(config), within=20)
        assert code == 1, out
        assert f"cannot start: {where}already running (pid {first.pid})" in out, out
        assert "Traceback" not in out
        assert first.returncode is None
    # The first one ended cleanly and released the lock: the next start takes it.
    assert first.returncode == 0, (tmp_path / "first.log").read_text()
    code, out = await _cli("check", "-c", str(config))
    assert code == 0, out
    async with _running(config, tmp_path / "second.log") as second:
        await _lock_holder(lock, second)


# ---------------------------------------------------------------------------- the demo


def _demo_config(tmp: Path, health: str) -> Path:
    """The demo's config with free ports everywhere and the given health address."""
    text = (ROOT / "config" / "demo.yaml").read_text()
    for old in ("11883", "15020", "15021", "15022", "14840", "14850"):
        text = text.replace(old, str(free_port()))
    text = text.replace("state_dir: ${SHOPFLOOR_DEMO_STATE:-../var/demo}", "state_dir: state")
    assert "listen: 127.0.0.1:19108" in text, "the demo config's health address moved"
    text = text.replace("listen: 127.0.0.1:19108", f"listen: '{health}'")
    path = tmp / "demo.yaml"
    path.write_text(text)
    return path


async def test_demo_refuses_a_taken_metrics_port_before_starting(tmp_path: Path) -> None:
    # The finding: with 9108 taken, the demo ran and the only trace was a warning in its log.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = _demo_config(tmp_path, f"127.0.0.1:{port}")
        code, out = await _cli(
            "demo", "-c", str(config), "--duration", "3", "--log-file", str(tmp_path / "d.log")
        )
    assert code == 1, out
    assert f"port 127.0.0.1:{port} for /healthz and /metrics (health.listen) is in use" in out
    assert "Traceback" not in out
