"""Which destinations take order commands: one owner per machine, or customer-scoped sharing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.loader import ConfigError, load_config, redacted
from gateway.runtime.gateway import Gateway

MACHINES = """
machines:
  - id: sew-01
    area: sewing
    line: line-1
    profile: sewing-station
    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}
  - id: sew-02
    area: sewing
    line: line-1
    profile: sewing-station
    connection: {protocol: modbus, host: 127.0.0.1, port: 5021}
"""


def load(tmp_path: Path, destinations: str) -> tuple[dict[str, bool], tuple[str, ...]]:
    p = tmp_path / "gw.yaml"
    p.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "destinations:\n" + destinations + MACHINES
    )
    plan = load_config(p, env={})
    return {d.name: d.commands for d in plan.destinations}, plan.warnings


def test_a_single_broker_takes_commands(tmp_path: Path) -> None:
    owners, warnings = load(tmp_path, "  - {name: mes, host: 127.0.0.1, port: 1883}\n")
    assert owners == {"mes": True} and warnings == ()


def test_two_destinations_on_one_broker_default_to_the_first(tmp_path: Path) -> None:
    owners, warnings = load(
        tmp_path,
        "  - {name: mes, host: 127.0.0.1, port: 1883}\n"
        "  - {name: audit, host: 127.0.0.1, port: 1883, client_id: gw-audit}\n",
    )
    assert owners == {"mes": True, "audit": False}
    (warning,) = [w for w in warnings if "commands" in w]
    assert "audit" in warning and "mes owns them" in warning and "sew-01" in warning


def test_an_explicit_owner_wins_over_a_default(tmp_path: Path) -> None:
    owners, _ = load(
        tmp_path,
        "  - {name: mes, host: 127.0.0.1, port: 1883}\n"
        "  - {name: erp, host: 127.0.0.1, port: 1883, client_id: gw-erp, commands: true}\n",
    )
    assert owners == {"mes": False, "erp": True}


def test_two_explicit_owners_of_one_machine_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            "  - {name: mes, host: 127.0.0.1, port: 1883, commands: true}\n"
            "  - {name: erp, host: 127.0.0.1, port: 1883, client_id: x, commands: true}\n",
        )
    (error,) = [str(e) for e in info.value.errors]
    assert "destinations[1].commands" in error
    assert "mes and erp both take commands for machine sew-01" in error
    assert "answered twice" in error and "commands: false" in error


def test_an_unscoped_owner_excludes_others_on_other_brokers_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            "  - {name: mes, host: 127.0.0.1, port: 1883, commands: true}\n"
            "  - {name: acme, host: 127.0.0.1, port: 1884, commands: true,"
            " routing: {customers: [acme]}}\n",
        )
    assert "mes sees every order" in str(info.value.errors[0])


def test_customer_scoped_platforms_on_their_own_brokers_share_a_machine(tmp_path: Path) -> None:
    owners, warnings = load(
        tmp_path,
        "  - {name: acme, host: 127.0.0.1, port: 1883, routing: {customers: [acme]}}\n"
        "  - {name: zeta, host: 127.0.0.1, port: 1884, routing: {customers: [zeta]}}\n",
    )
    assert owners == {"acme": True, "zeta": True} and warnings == ()


def test_owners_of_different_machines_do_not_clash(tmp_path: Path) -> None:
    owners, warnings = load(
        tmp_path,
        "  - {name: a, host: 127.0.0.1, port: 1883, routing: {machines: [sew-01]}}\n"
        "  - {name: b, host: 127.0.0.1, port: 1883, client_id: b,"
        " routing: {machines: [sew-02]}}\n",
    )
    assert owners == {"a": True, "b": True} and warnings == ()


async def test_only_owning_destinations_get_a_listener(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "destinations:\n"
        "  - {name: mes, host: 127.0.0.1, port: 1883, commands: false}\n"
        "  - {name: audit, host: 127.0.0.1, port: 1884}\n" + MACHINES
    )
    gateway = Gateway(load_config(p, env={}))
    try:
        assert [c.name for c in gateway.listeners] == ["audit"]
        assert gateway.commands is gateway.listeners[0]
    finally:
        await gateway.outbox.close()


def test_the_effective_config_shows_who_takes_commands(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        "destinations:\n"
        "  - {name: mes, host: 127.0.0.1, port: 1883}\n"
        "  - {name: audit, host: 127.0.0.1, port: 1883, client_id: a}\n" + MACHINES
    )
    shown = redacted(load_config(p, env={}))
    assert [(d["name"], d["commands"]) for d in shown["destinations"]] == [
        ("mes", True),
        ("audit", False),
    ]
