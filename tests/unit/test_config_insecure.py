"""What counts as "this machine", and which weaker settings ``check`` and the start-up warn of."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main as cli
from gateway.config.loader import ConfigError, load_config
from shopfloor_gateway.simulators.modbus_server import free_port

HEAD = "gateway: {id: gw-1, site: plant-1}\n"
MACHINES = (
    "machines:\n"
    "  - {id: a, area: x, line: y, profile: sewing-station,"
    " connection: {protocol: modbus, host: 127.0.0.1}}\n"
)


def _cfg(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(HEAD + text + MACHINES)
    return cfg


@pytest.mark.parametrize(
    "host", ["127.mqtt.partner.example", "127.0.0.1.nip.example", "localhost.partner.example"]
)
def test_a_name_that_only_looks_local_is_a_remote_broker(tmp_path: Path, host: str) -> None:
    cfg = _cfg(tmp_path, f"broker: {{host: {host}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    assert any("on another machine" in e.message for e in info.value.errors)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "::1"])
def test_loopback_brokers_need_no_tls(tmp_path: Path, host: str) -> None:
    plan = load_config(_cfg(tmp_path, f"broker: {{host: '{host}'}}\n"), env={})
    assert plan.warnings == ()


def test_hostname_verification_off_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(
        tmp_path,
        "broker: {host: mqtt.partner.example, username: u, password: p,"
        " tls: {verify_hostname: false}}\n",
    )
    plan = load_config(cfg, env={})
    [warning] = plan.warnings
    assert "verify_hostname" in warning and "mqtt.partner.example" in warning
    assert cli.main(["check", "-c", str(cfg)]) == 0
    assert "warning: " + warning in capsys.readouterr().out


def test_hostname_verification_on_is_silent(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path, "broker: {host: mqtt.partner.example, username: u, password: p, tls: {}}\n"
    )
    assert load_config(cfg, env={}).warnings == ()


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.7"])
@pytest.mark.parametrize("extra", ["token: s3cret-console-token", "console: false"])
def test_a_health_endpoint_open_to_the_network_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str, extra: str
) -> None:
    port = free_port()
    listen = f"'{host}:{port}'"
    cfg = _cfg(tmp_path, f"broker: {{host: 127.0.0.1}}\nhealth: {{listen: {listen}, {extra}}}\n")
    [warning] = load_config(cfg, env={}).warnings
    assert "health" in warning and "/metrics" in warning
    # `check` also binds the address as `run` would: one that is not this machine's fails.
    code = cli.main(["check", "-c", str(cfg)])
    out = capsys.readouterr()
    if host == "192.0.2.7":
        assert code == 2 and "not an address of this machine" in out.err
    else:
        assert code == 0 and "warning: " + warning in out.out


@pytest.mark.parametrize("listen", ["127.0.0.1:9108", "'[::1]:9108'", "null"])
def test_a_local_health_endpoint_is_silent(tmp_path: Path, listen: str) -> None:
    cfg = _cfg(tmp_path, f"broker: {{host: 127.0.0.1}}\nhealth: {{listen: {listen}}}\n")
    assert load_config(cfg, env={}).warnings == ()


@pytest.mark.parametrize("listen", ["0.0.0.0:9108", "'[::]:9108'", "192.0.2.7:9108"])
def test_a_console_open_to_the_network_without_a_token_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str
) -> None:
    cfg = _cfg(tmp_path, f"broker: {{host: 127.0.0.1}}\nhealth: {{listen: {listen}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    [error] = info.value.errors
    assert error.line == 3 and "needs a token" in error.message
    assert "127.0.0.1" in error.message and "console: false" in error.message
    assert cli.main(["check", "-c", str(cfg)]) != 0
    assert "needs a token" in capsys.readouterr().err


def test_the_console_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "broker: {host: 127.0.0.1}\nhealth: {token: '${CONSOLE_TOKEN}'}\n")
    plan = load_config(cfg, env={"CONSOLE_TOKEN": "from-env-123"})
    assert plan.console_token is not None
    assert plan.console_token.get_secret_value() == "from-env-123"
    assert "from-env-123" not in repr(plan)
    (tmp_path / "token").write_text("from-file-456\n")
    cfg = _cfg(tmp_path, "broker: {host: 127.0.0.1}\nhealth: {token_file: token}\n")
    plan = load_config(cfg, env={})
    assert plan.console_token is not None
    assert plan.console_token.get_secret_value() == "from-file-456"
    assert load_config(_cfg(tmp_path, "broker: {host: 127.0.0.1}\n"), env={}).console_token is None


def test_console_commands_as_must_name_a_destination(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "broker: {host: 127.0.0.1}\nhealth: {commands_as: erp}\n")
    with pytest.raises(ConfigError, match="no destination named 'erp'; known: default"):
        load_config(cfg, env={})
