"""Config errors never echo a secret, a ``${VAR}`` value, or the credentials in a URL.

Each case is a config with one mistake whose value is a canary; the canary must appear in
neither the ``shopfloor check`` output nor the log of a rejected reload, while the error
still names the field to fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from gateway.cli import main as cli
from gateway.config.loader import ConfigError, load_config
from gateway.runtime.gateway import Gateway

CANARY = "91827364"
WORD = "canary-Pw-7c1e"

HEAD = "gateway: {id: gw-1, site: plant-1}\n"
BROKER = "broker: {host: 127.0.0.1}\n"
MACHINES = (
    "machines:\n"
    "  - {id: a, area: x, line: y, profile: sewing-station,"
    " connection: {protocol: modbus, host: 127.0.0.1}}\n"
)
OPCUA = (
    "machines:\n"
    "  - {id: cnc, area: x, line: y, profile: machine-tool-umati,"
    " connection: {protocol: opcua, url: '%s'%s}}\n"
)

#: (case id, config text, environment, the field the error must name, the canary)
CASES = [
    (
        "numeric-mqtt-password",
        HEAD + f"broker: {{host: 127.0.0.1, username: u, password: {CANARY}}}\n" + MACHINES,
        {},
        "broker.password",
        CANARY,
    ),
    (
        "numeric-redaction-secret",
        HEAD + BROKER + f"redaction: {{secret: {CANARY}}}\n" + MACHINES,
        {},
        "redaction.secret",
        CANARY,
    ),
    (
        "numeric-influx-token",
        HEAD
        + BROKER
        + f"influxdb: {{url: 'http://127.0.0.1:8086', org: o, bucket: b, token: {CANARY}}}\n"
        + MACHINES,
        {},
        "influxdb.token",
        CANARY,
    ),
    (
        "numeric-opcua-password",
        HEAD + BROKER + OPCUA % ("opc.tcp://127.0.0.1:4840", f", username: u, password: {CANARY}"),
        {},
        "machines[0].connection.password",
        CANARY,
    ),
    (
        "env-password-in-a-number-field",
        HEAD + "broker: {host: 127.0.0.1, port: '${MQTT_PASSWORD}'}\n" + MACHINES,
        {"MQTT_PASSWORD": WORD},
        "broker.port",
        WORD,
    ),
    (
        "env-password-in-an-identifier",
        "gateway: {id: 'x${MQTT_PASSWORD}/', site: plant-1}\n" + BROKER + MACHINES,
        {"MQTT_PASSWORD": WORD},
        "gateway.id",
        WORD,
    ),
    (
        "env-password-as-broker-host",
        HEAD + "broker: {host: '${MQTT_PASSWORD}'}\n" + MACHINES,
        {"MQTT_PASSWORD": WORD},
        "broker",
        WORD,
    ),
    (
        "env-password-in-an-opcua-url",
        HEAD + BROKER + OPCUA % ("${MQTT_PASSWORD}", ""),
        {"MQTT_PASSWORD": WORD},
        "machines[0].connection.url",
        WORD,
    ),
    (
        "opcua-url-with-credentials",
        HEAD + BROKER + OPCUA % (f"opc.tcp://user:{WORD}@127.0.0.1:4840", ""),
        {},
        "machines[0].connection.url",
        WORD,
    ),
    (
        "opcua-url-with-credentials-and-a-wrong-scheme",
        HEAD + BROKER + OPCUA % (f"opcua://user:{WORD}@127.0.0.1:4840", ""),
        {},
        "machines[0].connection.url",
        WORD,
    ),
    (
        "mqtt-url-with-credentials-as-host",
        HEAD + f"broker: {{host: 'mqtts://user:{WORD}@broker.example'}}\n" + MACHINES,
        {},
        "broker.host",
        WORD,
    ),
    (
        "influx-url-with-credentials",
        HEAD
        + BROKER
        + f"influxdb: {{url: 'ftp://user:{WORD}@127.0.0.1:8086', org: o, bucket: b}}\n"
        + MACHINES,
        {},
        "influxdb.url",
        WORD,
    ),
    (
        "influx-url-with-credentials-accepted-scheme",
        HEAD
        + BROKER
        + f"influxdb: {{url: 'http://user:{WORD}@127.0.0.1:8086', org: o, bucket: b}}\n"
        + MACHINES,
        {},
        "influxdb.url",
        WORD,
    ),
]


def _write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize(
    ("text", "env", "field", "canary"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_check_names_the_field_but_never_echoes_the_value(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    env: dict[str, str],
    field: str,
    canary: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert any(e.path == field for e in info.value.errors), [str(e) for e in info.value.errors]
    assert cli.main(["check", "-c", str(cfg)]) == 2
    out = capsys.readouterr()
    assert field in out.err
    assert canary not in out.out + out.err


def test_an_env_value_in_the_wrong_field_is_named_by_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", WORD)
    cfg = _write(
        tmp_path, HEAD + "broker: {host: 127.0.0.1, port: '${MQTT_PASSWORD}'}\n" + MACHINES
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    [err] = [e for e in info.value.errors if e.path == "broker.port"]
    # The reader learns where the bad value came from, without seeing it.
    assert "${MQTT_PASSWORD}" in err.message
    assert WORD not in str(err)


def test_a_url_error_keeps_the_host_but_drops_the_credentials(tmp_path: Path) -> None:
    cfg = _write(tmp_path, HEAD + BROKER + OPCUA % (f"opcua://user:{WORD}@cnc-7.plant:4840", ""))
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env={})
    [err] = [e for e in info.value.errors if e.path == "machines[0].connection.url"]
    assert "cnc-7.plant" in err.message
    assert "user" not in err.message
    assert WORD not in err.message


async def test_a_rejected_reload_logs_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", WORD)
    cfg = _write(tmp_path, HEAD + BROKER + MACHINES)
    gateway = Gateway(load_config(cfg))
    for _, text, _, field, canary in CASES:
        cfg.write_text(text)
        with structlog.testing.capture_logs() as logs:
            assert await gateway.reload() is False
        [rejected] = [e for e in logs if e["event"] == "config.reload_rejected"]
        assert any(field in p for p in rejected["problems"]), rejected
        assert canary not in repr(logs)
