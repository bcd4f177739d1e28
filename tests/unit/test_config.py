"""Config loading: every example loads, every broken config gives a clear located error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.cli import main as cli
from gateway.config.loader import ConfigError, load_config, redacted
from gateway.config.yamlsource import loads

ROOT = Path(__file__).resolve().parents[2]
BAD = sorted((ROOT / "tests" / "configs" / "bad").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_loads(path: Path) -> None:
    plan = load_config(path, env={})
    assert plan.machines
    for m in plan.machines:
        assert m.signals, m.id


def _expectation(path: Path) -> tuple[int, str]:
    first = path.read_text().splitlines()[0]
    m = re.match(r"# expect: (\d+): (.*)$", first)
    assert m, f"{path.name}: first line must be '# expect: LINE: TEXT'"
    return int(m.group(1)), m.group(2)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_broken_config_names_file_line_and_field(path: Path) -> None:
    line, text = _expectation(path)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    rendered = [str(e) for e in info.value.errors]
    field, _, message = text.partition(": ") if ": " in text else ("", "", text)
    where = f"{path}:{line}: " + (f"{field}: " if field else "")
    assert any(r.startswith(where) and message in r for r in rendered), rendered


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_check_command_prints_errors_without_traceback(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["check", "-c", str(path)])
    out = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out.err + out.out
    assert "pydantic" not in out.err.lower()
    assert "problem(s) found" in out.err


def test_check_reports_all_problems_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "many.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1, colour: red}\n"
        "broker: {host: 127.0.0.1, port: 99999}\n"
        "machines:\n"
        "  - {id: a, area: x, line: y, profile: nope, connection: {host: h}}\n"
        "  - {id: b, area: x, line: y, profile: sewing-station,"
        " connection: {protocol: modbus, host: h, unit_id: 300}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    paths = {e.path for e in info.value.errors}
    assert "gateway.colour" in paths
    assert "broker.port" in paths
    # Shape errors stop before compilation; the profile and unit id are checked on the
    # next run once the shape is right.
    cfg.write_text(cfg.read_text().replace(", colour: red", "").replace("99999", "1883"))
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    paths = {e.path for e in info.value.errors}
    assert "machines[0].profile" in paths
    assert "machines[1].connection.unit_id" in paths


def test_env_references_and_secret_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "canary-Zx81-secret"
    cfg = tmp_path / "secret.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: 127.0.0.1, username: '${MQTT_USER}', password: '${MQTT_PASS}'}\n"
        # check also tries the health port: keep it off so another process cannot fail this.
        "health: {listen: null}\n"
        "machines:\n"
        "  - {id: a, area: x, line: y, profile: sewing-station,"
        " connection: {protocol: modbus, host: 127.0.0.1}}\n"
    )
    monkeypatch.setenv("MQTT_USER", "gw-user")
    monkeypatch.setenv("MQTT_PASS", secret)
    plan = load_config(cfg)
    assert plan.broker.username == "gw-user"
    assert plan.broker.password is not None
    assert plan.broker.password.get_secret_value() == secret
    assert secret not in repr(plan)
    assert secret not in str(redacted(plan))
    assert cli.main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert "password set" in out.out


def test_profiles_merge_and_machine_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: 127.0.0.1}\n"
        "tracker: {progress_step_percent: 20}\n"
        "machines:\n"
        "  - id: a\n"
        "    area: x\n"
        "    line: y\n"
        "    profile: sewing-station\n"
        "    poll_interval: 0.25\n"
        "    connection: {protocol: modbus, host: 127.0.0.1}\n"
        "    tracker: {counter_wrap: 16}\n"
        "    signals:\n"
        "      operator: null\n"
        "      spindle_temp: {address: 40, type: int16, scale: 0.1}\n"
    )
    plan = load_config(cfg, env={})
    (m,) = plan.machines
    assert "operator" not in m.signals
    assert "spindle_temp" in m.signals and "good_count" in m.signals
    assert m.poll_interval == 0.25
    assert m.tracker.counter_wrap == 2**16
    assert m.tracker.progress_step_percent == 20
    assert m.tracker.counter_mode == "per_order"  # from the profile
    assert m.location.site == "plant-1"
    assert plan.broker.port == 1883
    assert plan.broker.client_id == "shopfloor-gw-1"


def test_insecure_mqtt_to_a_remote_host_must_be_spelled_out(tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    body = (
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: broker.example.org%s}\n"
        "machines:\n"
        "  - {id: a, area: x, line: y, profile: sewing-station,"
        " connection: {protocol: modbus, host: 127.0.0.1}}\n"
    )
    cfg.write_text(body % "")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    (err,) = info.value.errors
    assert err.line == 2 and "plain TCP" in err.message and "allow_insecure" in err.message
    cfg.write_text(body % ", allow_insecure: true")
    plan = load_config(cfg, env={})
    assert any("plain text" in w for w in plan.warnings)
    assert any("anonymous" in w for w in plan.warnings)


def test_opcua_security_none_to_a_remote_server_must_be_spelled_out(tmp_path: Path) -> None:
    cfg = tmp_path / "o.yaml"
    body = (
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: 127.0.0.1}\n"
        "machines:\n"
        "  - {id: cnc, area: x, line: y, profile: machine-tool-umati,"
        " connection: {protocol: opcua, url: 'opc.tcp://10.1.2.3:4840'%s}}\n"
    )
    cfg.write_text(body % "")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    assert any("security policy None" in e.message for e in info.value.errors)
    cfg.write_text(body % ", allow_insecure: true")
    plan = load_config(cfg, env={})
    assert any("neither signed nor encrypted" in w for w in plan.warnings)


def test_yaml_source_records_lines() -> None:
    src = loads("a:\n  b:\n    - x\n    - y: 1\n", "t.yaml")
    assert src.line_of(("a", "b", 1, "y")) == 4
    assert src.line_of(("a", "b", 0)) == 3
    assert src.line_of(("a", "nope", 7)) == 1


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "file not found" in str(info.value)


def test_a_key_of_another_section_is_not_suggested_as_itself(tmp_path: Path) -> None:
    """`mode` is a key (of a counter signal), but not of `telemetry:`: say so, not "did you
    mean 'mode'?"."""
    cfg = tmp_path / "wrong-section.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        "broker: {host: 127.0.0.1}\n"
        "telemetry: {mode: on_change, publsh: every_poll}\n"
        "machines:\n"
        "  - {id: a, area: x, line: y, profile: sewing-station, connection: {host: h}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    messages = {e.path: e.message for e in info.value.errors}
    assert "did you mean 'mode'" not in messages["telemetry.mode"]
    assert "'mode' is not a key of this section" in messages["telemetry.mode"]
    assert "did you mean 'publish'?" in messages["telemetry.publsh"]
