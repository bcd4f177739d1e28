"""Start-up checks in process: the instance lock, the summary of every destination."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import main as cli
from gateway.config.loader import load_config
from gateway.runtime import preflight

MACHINE = (
    "machines:\n"
    "  - {id: a, area: x, line: y, profile: sewing-station,"
    " connection: {protocol: modbus, host: 127.0.0.1}}\n"
)


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "gw.yaml"
    p.write_text(
        "gateway: {id: gw-1, site: plant-1}\nstate_dir: state\nhealth: {listen: null}\n"
        + body
        + MACHINE
    )
    return p


def test_check_lists_every_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(
        tmp_path,
        "destinations:\n"
        "  - {name: erp, host: 127.0.0.1, port: 1883}\n"
        "  - {name: mes, host: 127.0.0.2, port: 1884, client_id: gw-mes}\n",
    )
    assert cli.main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "destination erp: 127.0.0.1:1883 (plain TCP), client id shopfloor-gw-1-erp" in out
    assert "destination mes: 127.0.0.2:1884 (plain TCP), client id gw-mes" in out


def test_lock_is_exclusive_names_the_holder_and_frees_on_release(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    assert preflight.holder(path) is None
    with preflight.InstanceLock(path) as first:
        first.acquire()
        assert path.read_text().strip() == str(os.getpid())
        held = preflight.holder(path)
        assert held is not None and held.pid == os.getpid()
        # flock belongs to the open file: a second open in this process is refused too.
        with pytest.raises(preflight.AlreadyRunning) as refused:
            preflight.InstanceLock(path).acquire()
        assert refused.value.pid == os.getpid()
        assert f"already running (pid {os.getpid()})" in preflight.already_running_message(
            refused.value
        )
    assert preflight.holder(path) is None
    with preflight.InstanceLock(path) as again:
        again.acquire()


def test_take_lock_creates_the_state_dir_and_check_leaves_nothing(tmp_path: Path) -> None:
    plan = load_config(_write(tmp_path, "broker: {host: 127.0.0.1}\n"), env={})
    assert preflight.check(plan) == []
    assert not (tmp_path / "state").exists()
    lock = preflight.take_lock(plan)
    assert isinstance(lock, preflight.InstanceLock)
    with lock:
        assert lock.path == tmp_path / "state" / "shopfloor-outbox.db.lock"
        (problem,) = preflight.check(plan)
        assert problem.path == "state_dir" and problem.line == 2
        assert f"already running (pid {os.getpid()})" in problem.message
        refused = preflight.take_lock(plan)
        assert not isinstance(refused, preflight.InstanceLock)
        assert refused.path == "state_dir"
    assert preflight.check(plan) == []
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["shopfloor-outbox.db.lock"]


def test_check_loads_the_opcua_certificate_key_and_trust_files(tmp_path: Path) -> None:
    # run loads these only when it connects (that machine stays offline); check says so first.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    good_key = tmp_path / "key.pem"
    good_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    trust = tmp_path / "trusted"
    trust.mkdir()
    (trust / "server.der").write_bytes(b"\x30\x03\x02\x01\x00")
    security = (
        "{policy: Basic256Sha256, certificate: cert.pem, private_key: key.pem, trust: [trusted]}"
    )
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\nstate_dir: state\nhealth: {listen: null}\n"
        "broker: {host: 127.0.0.1}\n"
        "machines:\n"
        "  - id: cnc-1\n    area: x\n    line: y\n    profile: machine-tool-umati\n"
        "    connection:\n      url: opc.tcp://127.0.0.1:4840\n"
        f"      security: {security}\n"
    )
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the adapter reads these paths as given, like run in its directory
    try:
        plan = load_config(cfg, env={})
        assert preflight.check(plan) == []  # not what stops run
        problems = {p.path: p for p in preflight.check(plan, devices=True)}
    finally:
        os.chdir(cwd)
    assert set(problems) == {
        "machines[0].connection.security.certificate",
        "machines[0].connection.security.private_key",
        "machines[0].connection.security.trust",
    }
    assert {p.line for p in problems.values()} == {12}, problems
    assert (
        "cert.pem is not a certificate"
        in problems["machines[0].connection.security.certificate"].message
    )
    assert (
        "needs private_key_password"
        in problems["machines[0].connection.security.private_key"].message
    )
    assert "server.der" in problems["machines[0].connection.security.trust"].message
