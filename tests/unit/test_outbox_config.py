"""Config keys of delivery: destinations, routing, outbox, redaction secret; no secret leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main as cli
from gateway.config.loader import ConfigError, load_config, redacted

MACHINES = """
machines:
  - id: sew-01
    area: sewing
    line: line-1
    profile: sewing-station
    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}
"""
SECRET = "s3cr3t-Pa55-w0rd"


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "gw.yaml"
    p.write_text("gateway: {id: gw-1, site: plant-1}\n" + body + MACHINES)
    return p


def test_broker_is_shorthand_for_one_default_destination(tmp_path: Path) -> None:
    plan = load_config(write(tmp_path, "broker: {host: 127.0.0.1}\n"), env={})
    (d,) = plan.destinations
    assert d.name == "default" and d.broker is plan.broker
    assert d.route.operator == "drop" and not d.route.batch
    assert plan.outbox is not None
    assert plan.outbox.path == tmp_path / "var" / "shopfloor-outbox.db"


def test_destinations_with_routing_files_and_secrets(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    cfg = write(
        tmp_path,
        "state_dir: st\n"
        "outbox: {max_events: 5000, delayed_after: 2}\n"
        "redaction: {secret: '${SITE_SECRET}'}\n"
        "destinations:\n"
        "  - {name: acme, host: 127.0.0.1, username: gw, password_file: pw, protocol: '5',\n"
        "     routing: {customers: [acme], machines: ['sew-*']}, operator: pseudonymise}\n"
        "  - {name: all, host: 127.0.0.2, batch: true, operator: pass, commands: false}\n",
    )
    plan = load_config(cfg, env={"SITE_SECRET": "k"})
    acme, everyone = plan.destinations
    assert acme.broker.password is not None
    assert acme.broker.password.get_secret_value() == SECRET
    assert acme.broker.protocol == "5"
    assert acme.broker.client_id == "shopfloor-gw-1-acme"
    assert acme.route.rules.customers == ("acme",)
    assert everyone.route.batch and everyone.route.operator == "pass"
    assert plan.outbox is not None and plan.outbox.path == tmp_path / "st" / "shopfloor-outbox.db"
    assert plan.outbox.max_events == 5000
    assert SECRET not in repr(plan) and SECRET not in str(redacted(plan))
    # 127.0.0.2 is loopback too: no plain-text warning here.
    assert plan.warnings == ()


def test_plain_tcp_to_a_remote_host_is_a_warning_in_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(
        tmp_path,
        "destinations:\n"
        f"  - {{name: cloud, host: mqtt.example.com, username: u, password: {SECRET},"
        " allow_insecure: true}\n"
        # check also tries the health port: keep it off so another process cannot fail this.
        "health: {listen: null}\n",
    )
    assert cli.main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "destination cloud" in out.out and "plain text" in out.out
    assert SECRET not in out.out + out.err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("broker: {host: a}\ndestinations: [{name: x, host: b}]\n", "not both"),
        ("destinations: [{name: x, host: a}, {name: x, host: b}]\n", "duplicate destination"),
        ("destinations: [{name: x, host: 127.0.0.1, operator: pseudonymise}]\n", "site secret"),
        ("destinations: [{name: x, host: a, password: p}]\n", "needs a username"),
        ("destinations: [{name: x, host: a, username: u, password_file: nope}]\n", "nope"),
        ("", "broker: or destinations:"),
    ],
)
def test_bad_delivery_config(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), env={})
    assert message in str(info.value)


def test_password_file_content_never_in_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").write_text(SECRET)
    cfg = write(
        tmp_path,
        "destinations: [{name: x, host: a, password_file: pw, tls: {ca_file: missing.pem}}]\n",
    )
    assert cli.main(["check", "-c", str(cfg)]) == 2
    out = capsys.readouterr()
    assert "no such file" in out.err
    assert SECRET not in out.out + out.err
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "destinations: [{name: x, host: a, password_file: pw}]\n"))
    assert SECRET not in str(info.value)


def test_check_warns_about_an_operator_policy_that_can_never_act(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # sew-01's profile maps the badge; sew-02 has no badge reader.
    body = (
        "redaction: {secret: k}\n"
        "destinations:\n"
        "  - {name: mes, host: 127.0.0.1, operator: pass, routing: {machines: ['sew-01']}}\n"
        "  - {name: pay, host: 127.0.0.1, operator: pseudonymise,\n"
        "     routing: {machines: ['sew-02']}}\n"
        "  - {name: portal, host: 127.0.0.1}\n"
    )
    machines = MACHINES + (
        "  - id: sew-02\n    area: sewing\n    line: line-1\n    profile: sewing-station\n"
        "    connection: {protocol: modbus, host: 127.0.0.1, port: 5021}\n"
        "    signals: {operator: null}\n"
    )
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("gateway: {id: gw-1, site: plant-1}\n" + body + machines)
    assert cli.main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if "never acts" in line]
    assert len(warned) == 1, out
    assert "destination pay: operator: pseudonymise never acts" in warned[0]
    assert "no machine this destination sees maps an `operator` signal" in warned[0]
