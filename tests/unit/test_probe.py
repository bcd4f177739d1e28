"""The pure part of ``shopfloor probe``: endpoints, ranges, the decode table, hints."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from shopfloor_gateway.adapters import probe
from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.probe import (
    PASSWORD_ENV,
    ReadSpec,
    explain,
    modbus_snippet,
    opcua_connection,
    opcua_snippet,
    parse_endpoint,
    parse_read,
    render_registers,
    unique_signal_names,
)


def test_endpoints() -> None:
    tcp = parse_endpoint("tcp://10.0.0.5", 3, 1.0)
    assert (tcp.transport, tcp.host, tcp.port, tcp.unit_id) == ("tcp", "10.0.0.5", 502, 3)
    over = parse_endpoint("rtu+tcp://10.0.0.6:4001", 1, 1.0)
    assert (over.transport, over.port) == ("rtu_over_tcp", 4001)
    rtu = parse_endpoint("rtu:///dev/ttyUSB0?baudrate=9600&parity=n", 2, 0.5)
    assert rtu.serial is not None
    assert (rtu.serial.port, rtu.serial.baudrate, rtu.serial.parity) == ("/dev/ttyUSB0", 9600, "N")
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_endpoint("http://x", 1, 1.0)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("40001:20", ReadSpec("holding", 0, 20)),
        ("30010", ReadSpec("input", 9, 1)),
        ("holding:0:20", ReadSpec("holding", 0, 20)),
        ("h:40001:2", ReadSpec("holding", 40001, 2)),  # an area makes the number zero-based
        ("coil:0:16", ReadSpec("coil", 0, 16)),
    ],
)
def test_read_ranges(text: str, spec: ReadSpec) -> None:
    assert parse_read(text) == spec


@pytest.mark.parametrize("text", ["40001:126", "x:1:1", "4001:2", "holding:65535:2"])
def test_bad_read_ranges(text: str) -> None:
    with pytest.raises(ValueError, match=r"--read|Modicon"):
        parse_read(text)


def test_table_shows_every_reading_side_by_side() -> None:
    # float32 123.456 = 0x42F6E979; in CDAB order the device sends 0xE979, 0x42F6.
    rows = render_registers(ReadSpec("holding", 0, 3), [0xE979, 0x42F6, 0x4142])
    assert "float CDAB" in rows[0] and "float ABCD" in rows[0]
    assert "123.456" in rows[1]  # the CDAB reading of registers 0..1
    assert "0x4142" in rows[3] and "AB" in rows[3]
    assert rows[1].startswith("    40001")
    changed = render_registers(
        ReadSpec("holding", 0, 3), [0xE979, 0x42F6, 0x4143], rows and [0xE979, 0x42F6, 0x4142]
    )
    assert [r[0] for r in changed[1:4]] == [" ", "*", "*"]  # the pair ending in it changed too


def test_errors_say_what_to_try() -> None:
    conn = parse_endpoint("tcp://10.0.0.5", 1, 1.0)
    assert "--unit" in explain(11, conn)
    assert "counts from 1 or from 0" in explain(2, conn)
    refused = explain(ConnectError("cannot connect to 10.0.0.5:502: connection refused"), conn)
    assert "Try:" in refused and "502" in refused
    silent = explain(ConnectionLost("no response from 10.0.0.5:502 within 1.0 s"), conn)
    assert "--scan-units" in silent and "rtu+tcp://" in silent


def test_snippet_is_a_loadable_machine() -> None:
    conn = parse_endpoint("tcp://10.0.0.5:502", 4, 1.0)
    text = modbus_snippet(
        conn, [(ReadSpec("holding", 0, 2), [1, 2]), (ReadSpec("coil", 3, 1), [True])]
    )
    machine = yaml.safe_load(text)["machines"][0]
    assert machine["connection"] == {
        "protocol": "modbus",
        "host": "10.0.0.5",
        "port": 502,
        "unit_id": 4,
    }
    assert machine["signals"]["holding_1"] == {"ref": "40002", "type": "uint16"}
    assert machine["signals"]["coil_3"] == {"ref": "00004"}


def test_signal_names_are_unique_and_qualified_only_where_needed() -> None:
    paths = [
        ["MachineTool", "Production", "ActiveProgram", "Name"],
        ["MachineTool", "Identification", "Name"],
        ["MachineTool", "Monitoring", "Stacklight", "Lamp_Green", "SignalOn"],
        ["MachineTool", "Monitoring", "Stacklight", "Lamp_Red", "SignalOn"],
        ["MachineTool", "Production", "PartsGood"],
        ["A", "Temp-1"],
        ["B", "Temp 1"],  # the same once made a signal name, all the way up
        ["1Axis"],
    ]
    names = unique_signal_names(paths)
    assert names == [
        "activeprogram_name",
        "identification_name",
        "lamp_green_signalon",
        "lamp_red_signalon",
        "partsgood",
        "a_temp_1",
        "b_temp_1",
        "n_1axis",
    ]
    assert unique_signal_names([["X", "v"], ["v"], ["v"]]) == ["x_v", "v", "v_2"]


def _opcua_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    return parser.parse_args(["opcua", "opc.tcp://10.0.0.7:4840", *argv])


def test_probe_options_mean_what_the_config_keys_mean(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    conn = opcua_connection(
        _opcua_args(
            "--policy", "Basic256Sha256", "--certificate", "c.pem", "--private-key", "k.pem",
            "--trust", "server.der", "--username", "gw", "--password-file", str(secret),
        ),
        {},
    )  # fmt: skip
    assert conn.security.policy == "Basic256Sha256"
    assert conn.security.effective_mode == "SignAndEncrypt"
    assert conn.security.trust == (Path("server.der"),)
    assert conn.password is not None and conn.password.get_secret_value() == "s3cret"
    from_env = opcua_connection(_opcua_args("--username", "gw"), {PASSWORD_ENV: "pw2"})
    assert from_env.password is not None and from_env.password.get_secret_value() == "pw2"
    snippet, _ = opcua_snippet(conn, [(["Machine", "State"], "nsu=urn:m;s=State")])
    text = snippet
    assert "s3cret" not in text and "${OPCUA_PASSWORD}" in text
    machine = yaml.safe_load(text)["machines"][0]
    assert machine["connection"]["security"]["trust"] == ["server.der"]
    assert machine["signals"] == {"state": {"node_id": "nsu=urn:m;s=State"}}


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--policy", "Basic256Sha256"], {}, "--certificate"),
        (["--policy", "Basic256"], {}, "deprecated"),
        (["--username", "gw"], {}, PASSWORD_ENV),
        (["--password-file", "pw"], {}, "needs --username"),
        (["--security-mode", "Sign"], {}, "needs a security policy"),
    ],
)
def test_bad_probe_options_say_what_to_fix(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        opcua_connection(_opcua_args(*argv), env)
