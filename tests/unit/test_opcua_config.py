"""OPC UA config models, the registry check, and the insecure-settings report (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shopfloor_gateway.adapters.opcua.config import (
    OpcUaConnectionConfig,
    OpcUaSignalConfig,
    check,
    insecure_reasons,
)
from shopfloor_gateway.adapters.registry import PROTOCOLS, Adapters


def connection(**kw: Any) -> OpcUaConnectionConfig:
    """A valid connection plus overrides."""
    base: dict[str, Any] = {"url": "opc.tcp://10.0.0.5:4840"}
    base.update(kw)
    return OpcUaConnectionConfig(**base)


def test_defaults() -> None:
    """Subscription mode, no security, Objects as root."""
    c = connection()
    assert (c.mode, c.security.policy, c.security.effective_mode, c.root) == (
        "subscription",
        "None",
        "None",
        "i=85",
    )


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"url": "http://x:4840"}, "opc.tcp://"),
        ({"url": "opc.tcp://:4840"}, "no host"),
        ({"url": "opc.tcp://u:p@host:4840"}, "username/password"),
        ({"username": "a"}, "set both or neither"),
        ({"security": {"policy": "Basic128Rsa15"}}, "deprecated"),
        ({"security": {"policy": "Basic256"}}, "deprecated"),
        ({"security": {"policy": "Basic256Sha256"}}, "certificate and private_key"),
        (
            {"security": {"policy": "Basic256Sha256", "certificate": "c", "private_key": "k"}},
            "trust list",
        ),
        (
            {
                "security": {
                    "policy": "Basic256Sha256",
                    "mode": "None",
                    "certificate": "c",
                    "private_key": "k",
                }
            },
            "Sign or SignAndEncrypt",
        ),
        ({"security": {"mode": "Sign"}}, "needs a security policy"),
        ({"namespaces": {"1x": "urn:a"}}, "must start with a letter"),
        ({"default_namespace": "m"}, "not an alias"),
        ({"root": "ns=2"}, "expected ';'"),
        ({"publishing_interval": 0}, "greater than 0"),
        ({"user_certificate": "c", "user_private_key": "k"}, "needs a security policy"),
        ({"frobnicate": 1}, "Extra inputs"),
    ],
)
def test_connection_errors(kw: dict[str, Any], fragment: str) -> None:
    """Mistakes are refused with a message that says what to fix."""
    with pytest.raises(ValidationError, match=fragment):
        connection(**kw)


def test_policy_spellings_are_normalised() -> None:
    """asyncua's class-style spelling is accepted too."""
    c = connection(
        security={
            "policy": "Aes128Sha256RsaOaep",
            "certificate": "c",
            "private_key": "k",
            "allow_untrusted": True,
        }
    )
    assert c.security.policy == "Aes128_Sha256_RsaOaep"
    assert c.security.effective_mode == "SignAndEncrypt"


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({}, "exactly one of node_id"),
        ({"node_id": "i=1", "browse_path": "A"}, "exactly one of node_id"),
        ({"node_id": "ns=2;x=1"}, "i=, s=, g= or b="),
        ({"browse_path": "A//B"}, "empty segment"),
        ({"node_id": "i=1", "array_index": -1}, "greater than or equal to 0"),
        ({"node_id": "i=1", "array_index": True}, "not true/false"),
    ],
)
def test_signal_errors(kw: dict[str, Any], fragment: str) -> None:
    """Exactly one address, in valid notation."""
    with pytest.raises(ValidationError, match=fragment):
        OpcUaSignalConfig(**kw)


def test_check_finds_unknown_aliases_and_missing_files(tmp_path: Path) -> None:
    """Cross-model checks run when the config loads."""
    c = connection(
        namespaces={"m": "urn:m"},
        security={
            "policy": "Basic256Sha256",
            "certificate": tmp_path / "nope.pem",
            "private_key": tmp_path / "nope-key.pem",
            "trust": [tmp_path / "trusted"],
        },
    )
    sigs = {
        "state": OpcUaSignalConfig(browse_path="m:Machine/x:State"),
        "count": OpcUaSignalConfig(node_id="ns=2;s=Count"),
    }
    problems = check(c, sigs)
    assert any("alias 'x'" in p and "known: m" in p for p in problems)
    assert any(p.startswith("security.certificate: file") for p in problems)
    assert any(p.startswith("security.trust:") for p in problems)
    assert PROTOCOLS["opcua"].check(c, sigs) == problems


def test_insecure_reasons() -> None:
    """Weak settings are reported for the lead's warnings; loopback without security is fine."""
    assert insecure_reasons(connection(url="opc.tcp://127.0.0.1:4840")) == []
    assert insecure_reasons(connection(url="opc.tcp://localhost:4840")) == []
    reasons = insecure_reasons(connection(username="u", password="p"))
    assert any("neither signed nor encrypted" in r for r in reasons)
    assert any("username/password" in r for r in reasons)
    signed = connection(
        security={
            "policy": "Basic256Sha256",
            "mode": "Sign",
            "certificate": "c",
            "private_key": "k",
            "allow_untrusted": True,
        }
    )
    reasons = insecure_reasons(signed)
    assert any("not encrypted" in r for r in reasons)
    assert any("allow_untrusted" in r for r in reasons)


def test_registry_entry_builds_an_adapter_lazily() -> None:
    """The registry knows opcua and its models."""
    spec = PROTOCOLS["opcua"]
    assert spec.connection_model is OpcUaConnectionConfig
    assert spec.signal_model is OpcUaSignalConfig
    adapter = Adapters().create(
        "opcua", "m", connection(), {"s": OpcUaSignalConfig(node_id="i=2258")}, 1.0, 0.0
    )
    assert type(adapter).__name__ == "OpcUaAdapter"


def test_gateway_config_loads_an_opcua_machine(tmp_path: Path) -> None:
    """The whole loader path: YAML -> discriminated protocol -> plan; errors carry the line."""
    from gateway.config.loader import ConfigError, load_config

    body = """\
gateway: {id: gw-1, site: plant-1}
broker: {host: 127.0.0.1}
machines:
  - id: cnc-1
    area: machining
    line: l1
    poll_interval: 1.0
    connection:
      protocol: opcua
      url: opc.tcp://127.0.0.1:4840
      namespaces: {m: "urn:m"}
      default_namespace: m
    signals:
      state: {browse_path: "Machine/Monitoring/State", map: {1: running, 0: idle}}
      good_count: {node_id: "nsu=urn:m;s=Counters.Good"}
"""
    path = tmp_path / "gw.yaml"
    path.write_text(body)
    plan = load_config(path, env={})
    (machine,) = plan.machines
    assert machine.protocol.name == "opcua"
    assert isinstance(machine.connection, OpcUaConnectionConfig)
    path.write_text(body.replace("Machine/Monitoring/State", "x:Machine/State"))
    with pytest.raises(ConfigError, match="alias 'x'"):
        load_config(path, env={})
    path.write_text(body.replace("nsu=urn:m;s=Counters.Good", "ns=2;q=1"))
    with pytest.raises(ConfigError, match=r"gw\.yaml:1[0-9].*i=, s=, g= or b="):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("kw", "poll", "expected"),
    [
        # Sampling as slowly as publishing doubled the worst-case latency: a quarter.
        ({}, 1.0, (0.25, 1.0)),
        ({"publishing_interval": 0.5}, 1.0, (0.125, 0.5)),
        ({"publishing_interval": 0.5, "sampling_interval": 0}, 1.0, (0.0, 0.5)),
        ({"sampling_interval": 2.0}, 1.0, (2.0, 1.0)),
    ],
)
def test_default_sampling_is_a_quarter_of_the_publishing_interval(
    kw: dict[str, Any], poll: float, expected: tuple[float, float]
) -> None:
    adapter = Adapters().create(
        "opcua", "m", connection(**kw), {"s": OpcUaSignalConfig(node_id="i=2258")}, poll, 0.0
    )
    assert adapter.intervals == expected  # type: ignore[attr-defined]
