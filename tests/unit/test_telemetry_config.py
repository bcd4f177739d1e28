"""Telemetry publish rules in the config: gateway, profile, machine and signal layers."""

from __future__ import annotations

from pathlib import Path

from gateway.config.loader import load_config
from gateway.core.telemetry import PublishRule

ROOT = Path(__file__).resolve().parents[2]


def test_example_resolves_rules_per_layer() -> None:
    plan = load_config(ROOT / "config" / "example.yaml", env={})
    assert plan.telemetry.qos == 0 and plan.telemetry.retain is False
    machines = {m.id: m for m in plan.machines}
    sew = machines["sew-01"].telemetry
    # The top-level rule: on change with a 60 s heartbeat.
    assert sew["good_count"] == PublishRule("on_change", max_interval=60.0)
    press = machines["press-07"].telemetry
    # Profile every_poll, machine min_interval 5, top-level heartbeat.
    assert press["good_count"] == PublishRule("every_poll", min_interval=5.0, max_interval=60.0)
    assert machines["press-07"].telemetry_default == PublishRule(
        "every_poll", min_interval=5.0, max_interval=60.0
    )
    # The signal's own block wins over the profile.
    assert press["oil_temp"] == PublishRule(
        "deadband", deadband_percent=2.0, min_interval=5.0, max_interval=60.0
    )


def test_signal_deadband_key_is_the_absolute_band(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: 127.0.0.1, port: 1883}\n"
        "telemetry: {qos: 1, retain: true, publish: deadband, deadband_percent: 5}\n"
        "machines:\n"
        "  - id: m1\n    area: a\n    line: l\n"
        "    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}\n"
        "    signals:\n"
        "      speed: {address: 1, type: uint16, deadband: 2.5}\n"
    )
    plan = load_config(cfg, env={})
    assert plan.telemetry.qos == 1 and plan.telemetry.retain is True
    assert plan.machines[0].telemetry["speed"] == PublishRule(
        "deadband", deadband=2.5, deadband_percent=5.0
    )


def test_check_warns_when_no_destination_admits_configured_telemetry(tmp_path: Path) -> None:
    def plan(extra: str, routing: str) -> list[str]:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            "gateway: {id: gw-1, site: plant-1}\n"
            f"{extra}"
            f"destinations: [{{name: a, host: 127.0.0.1{routing}}}]\n"
            "machines:\n"
            "  - id: m1\n    area: a\n    line: l\n"
            "    connection: {protocol: modbus, host: 127.0.0.1, port: 5020}\n"
            "    signals: {speed: {address: 1, type: uint16}}\n"
        )
        return [w for w in load_config(cfg, env={}).warnings if w.startswith("telemetry:")]

    assert plan("telemetry: {publish: every_poll}\n", "")
    assert plan("telemetry: {publish: every_poll}\n", ", routing: {event_types: ['*']}")
    assert not plan("telemetry: {publish: every_poll}\n", ", routing: {event_types: [telemetry]}")
    # Nothing set about telemetry: nothing to warn about.
    assert not plan("", "")
