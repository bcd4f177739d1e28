"""Each config compile unit on its own: one section in, its plan and its problems out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.config.models import Config
from gateway.config.plans import BrokerPlan
from gateway.config.units.context import Unit, is_loopback
from gateway.config.units.destinations import (
    broker_warnings,
    command_owners,
    compile_destinations,
)
from gateway.config.units.health import compile_health
from gateway.config.units.influxdb import compile_influxdb
from gateway.config.units.logs import compile_logging
from gateway.config.units.machines import compile_machines
from gateway.config.units.outbox import compile_outbox
from gateway.config.units.secrets import compile_redaction, read_secret_file
from gateway.config.yamlsource import loads
from gateway.delivery.mqtt.publisher import BrokerSettings

MACHINE = (
    "machines:\n"
    "  - {id: m1, area: a, line: l, profile: sewing-station,"
    " connection: {host: 127.0.0.1, port: 5020}}\n"
)


def unit(tmp_path: Path, text: str, machines: str = MACHINE) -> Unit:
    """A unit over a config of ``text`` plus one machine, written beside ``tmp_path``."""
    body = "gateway: {id: gw-1, site: plant-1}\n" + text + machines
    src = loads(body, str(tmp_path / "gw.yaml"))
    assert not src.errors, src.errors
    return Unit(Config.model_validate(src.data), src, tmp_path / "gw.yaml")


def messages(u: Unit) -> list[str]:
    return [f"{e.line}: {e.path}: {e.message}" for e in u.errors]


# ---------------------------------------------------------------------------- outbox


def test_outbox_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    u = unit(tmp_path, "state_dir: state\noutbox: {max_events: 500}\n")
    plan = compile_outbox(u)
    assert plan.path == tmp_path.resolve() / "state" / "shopfloor-outbox.db"
    assert plan.max_events == 500
    u = unit(tmp_path, "outbox: {path: ob/x.db}\n")
    assert compile_outbox(u).path == tmp_path.resolve() / "ob" / "x.db"
    assert u.errors == []


# ---------------------------------------------------------------------------- secrets


def test_redaction_secret_inline_or_file_not_both(tmp_path: Path) -> None:
    (tmp_path / "site.key").write_text("s3cret-site\nignored\n")
    u = unit(tmp_path, "redaction: {secret_file: site.key}\n")
    secret = compile_redaction(u)
    assert secret is not None and secret.get_secret_value() == "s3cret-site"
    u = unit(tmp_path, "redaction: {secret: abc, secret_file: site.key}\n")
    assert compile_redaction(u) is None
    assert messages(u) == ["2: redaction: set secret or secret_file, not both"]


def test_secret_file_problems_name_the_file_never_the_content(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n")
    u = unit(tmp_path, "")
    assert read_secret_file(u, "empty.key", ("redaction", "secret_file")) is None
    assert read_secret_file(u, "missing.key", ("redaction", "secret_file")) is None
    assert [e.message for e in u.errors] == [
        f"{tmp_path.resolve() / 'empty.key'} is empty",
        f"{tmp_path.resolve() / 'missing.key'}: No such file or directory",
    ]


# ---------------------------------------------------------------------------- influxdb, logging


def test_influxdb_url_with_credentials_is_an_error(tmp_path: Path) -> None:
    u = unit(tmp_path, "influxdb: {url: 'http://u:p@127.0.0.1:8086', org: o, bucket: b}\n")
    assert compile_influxdb(u) is not None
    assert [e.path for e in u.errors] == ["influxdb.url"]
    assert "put credentials in 'token'" in u.errors[0].message
    assert compile_influxdb(unit(tmp_path, "")) is None


def test_logging_plan_copies_levels(tmp_path: Path) -> None:
    u = unit(tmp_path, "logging: {level: debug, format: json, levels: {pymodbus: warning}}\n")
    plan = compile_logging(u)
    assert (plan.level, plan.format, plan.levels) == ("debug", "json", {"pymodbus": "warning"})


# ---------------------------------------------------------------------------- health


def test_health_open_to_the_network_needs_a_token_and_warns(tmp_path: Path) -> None:
    u = unit(tmp_path, "health: {listen: '0.0.0.0:9108', commands_as: nope}\n")
    plan = compile_health(u, ["default"])
    assert plan.listen == ("0.0.0.0", 9108)
    assert [e.path for e in u.errors] == ["health.listen", "health.commands_as"]
    assert "needs a token" in u.errors[0].message
    assert u.errors[1].message == "no destination named 'nope'; known: default"
    assert len(u.warnings) == 1 and "open to the network" in u.warnings[0]
    u = unit(tmp_path, "health: {listen: '0.0.0.0:9108', console: false}\n")
    compile_health(u, ["default"])
    assert u.errors == [] and len(u.warnings) == 1


def test_health_loopback_is_quiet(tmp_path: Path) -> None:
    u = unit(tmp_path, "")
    plan = compile_health(u, ["default"])
    assert plan.listen == ("127.0.0.1", 9108) and plan.console and plan.token is None
    assert u.errors == [] and u.warnings == []


# ---------------------------------------------------------------------------- destinations


def test_destinations_default_client_ids_and_ports(tmp_path: Path) -> None:
    u = unit(
        tmp_path,
        "destinations:\n"
        "  - {name: a, host: 127.0.0.1}\n"
        "  - {name: b, host: localhost, port: 1884, routing: {customers: [acme]}}\n",
    )
    plans = compile_destinations(u)
    assert u.errors == []
    assert [(d.name, d.broker.port, d.broker.client_id) for d in plans] == [
        ("a", 1883, "shopfloor-gw-1-a"),
        ("b", 1884, "shopfloor-gw-1-b"),
    ]
    assert plans[1].route.rules.customers == ("acme",)


def test_destinations_report_every_entry_problem(tmp_path: Path) -> None:
    u = unit(
        tmp_path,
        "destinations:\n"
        "  - {name: a, host: 127.0.0.1}\n"
        "  - {name: a, host: 127.0.0.1}\n"
        "  - {name: b, host: 127.0.0.1, client_id: shopfloor-gw-1-a}\n"
        "  - {name: c, host: 127.0.0.1, password: pw}\n"
        "  - {name: d, host: mqtt.example.com}\n",
    )
    assert [d.name for d in compile_destinations(u)] == ["a"]
    assert messages(u) == [
        "4: destinations[1].name: duplicate destination name 'a'",
        "5: destinations[2]: client id 'shopfloor-gw-1-a' is used twice on 127.0.0.1:1883; "
        "the broker would disconnect one of them",
        "6: destinations[3].username: a password needs a username",
        "7: destinations[4]: broker mqtt.example.com is on another machine and the connection "
        "would use plain TCP (add tls:) and no credentials (add username/password or a client "
        "certificate); fix that, or set allow_insecure: true to accept the risk",
    ]


def test_broker_and_destinations_together_is_an_error(tmp_path: Path) -> None:
    u = unit(tmp_path, "broker: {host: 127.0.0.1}\ndestinations: [{name: a, host: 127.0.0.1}]\n")
    assert compile_destinations(u) == []
    assert [e.path for e in u.errors] == ["destinations"]


def test_broker_warnings_name_each_weakness(tmp_path: Path) -> None:
    u = unit(
        tmp_path,
        "broker: {host: 10.0.0.5, allow_insecure: true}\n",
    )
    plans = compile_destinations(u)
    broker_warnings(u, plans)
    assert u.errors == []
    assert [w.split(":")[0] for w in u.warnings] == ["destination default"] * 2
    assert "plain text" in u.warnings[0] and "anonymous MQTT" in u.warnings[1]


def test_command_owners_second_unscoped_destination_takes_none(tmp_path: Path) -> None:
    u = unit(
        tmp_path,
        "destinations:\n"
        "  - {name: a, host: 127.0.0.1}\n"
        "  - {name: b, host: localhost, port: 1884}\n",
    )
    machines = compile_machines(u)
    owners = command_owners(u, compile_destinations(u), machines)
    assert [(d.name, d.commands) for d in owners] == [("a", True), ("b", False)]
    assert len(u.warnings) == 1 and u.warnings[0].startswith("destination b: takes no commands")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.2", True), ("[::1]", True), ("127.mqtt.example", False)],
)
def test_is_loopback_does_not_resolve_names(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---------------------------------------------------------------------------- machines


def test_machines_share_validated_profile_signals(tmp_path: Path) -> None:
    u = unit(
        tmp_path,
        "",
        machines=MACHINE + "  - {id: m2, area: a, line: l, profile: sewing-station,"
        " connection: {host: 127.0.0.1, port: 5021}}\n",
    )
    m1, m2 = compile_machines(u)
    assert u.errors == []
    assert m1.signals.keys() == m2.signals.keys()
    assert all(m1.signals[k] is m2.signals[k] for k in m1.signals)


def test_machine_problems_are_located(tmp_path: Path) -> None:
    u = unit(
        tmp_path,
        "",
        machines=MACHINE + "  - {id: m1, area: a, line: l, profile: sewing-station,"
        " connection: {host: 127.0.0.1}}\n"
        "  - {id: m3, area: a, line: l, profile: sewing-statio, connection: {}}\n"
        "  - {id: m4, area: a, line: l, connection: {host: 127.0.0.1}}\n",
    )
    assert [m.id for m in compile_machines(u)] == ["m1"]
    assert messages(u) == [
        "4: machines[1].id: duplicate machine id 'm1' (also machines[0]); "
        "machine ids must be unique",
        "5: machines[2].profile: unknown profile 'sewing-statio' (did you mean "
        "'sewing-station'? known: " + u.errors[1].message.split("known: ")[1],
        "6: machines[3].connection: protocol is missing: add 'protocol: "
        + u.errors[2].message.split("'protocol: ")[1],
    ]


# ---------------------------------------------------------------------------- one broker plan


def test_the_compiled_broker_plan_is_what_the_publisher_takes(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret-pw\n")
    u = unit(
        tmp_path,
        "broker: {host: 127.0.0.1, username: gw, password_file: pw, keepalive: 45}\n",
    )
    (d,) = compile_destinations(u)
    assert isinstance(d.broker, BrokerSettings)  # one type: the publisher's settings
    assert d.broker.password_text == "s3cret-pw"
    assert "s3cret-pw" not in repr(d.broker)
    session = replace(d.broker, status_topic="sf/status", online_payload=b"{}")
    assert (session.keepalive, session.client_id, session.password) == (
        45,
        "shopfloor-gw-1",
        d.broker.password,
    )
    # Built in code with a plain string, the password is wrapped all the same.
    typed = BrokerPlan("127.0.0.1", username="u", password="pw")  # type: ignore[arg-type]
    assert isinstance(typed.password, SecretStr) and "pw" not in repr(typed)
    with pytest.raises(ValueError, match="a broker password needs a username"):
        BrokerPlan("127.0.0.1", password=SecretStr("pw"))
