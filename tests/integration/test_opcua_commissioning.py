"""Commissioning a secure OPC UA server: the refusals a new user meets, in words that help.

A secured CNC simulator (Basic256Sha256 SignAndEncrypt, trusting only the client
certificates in its ``trusted/`` folder) stands in for the server. The gateway's certificate
is made with ``shopfloor opcua-cert`` exactly as adapters/opcua/README.md says, with
``--hostname`` set to a name the server knows the machine by. Three ways a server refuses an
unknown client certificate are covered: a status at CreateSession (``BadCertificateUntrusted``,
the simulator's own check, also with an empty trusted folder), and a ServiceFault where the
OpenSecureChannel answer belongs (other servers do this; asyncua then raises a bare
``AssertionError`` after ``NotEnoughData``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
import yaml
from asyncua import ua
from asyncua.server import uaprocessor
from asyncua.ua.ua_binary import struct_from_binary
from structlog.testing import capture_logs

from gateway.config.loader import load_config
from gateway.runtime import logs
from shopfloor_gateway.adapters import probe as probe_cli
from shopfloor_gateway.adapters.base import ConnectError
from shopfloor_gateway.adapters.opcua.adapter import OpcUaAdapter
from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig, OpcUaSignalConfig
from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_server import (
    OpcUaMachineServer,
    ensure_certificates,
    trusted_dir,
)
from tests.brokers import MosquittoBroker
from tests.gatewayproc import gateway_process

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NAME = "cnc-01"
#: The name the server knows the gateway's machine by (not this machine's host name).
SEEN_AS = "edge-01.plant.example"


@dataclass
class Secure:
    """A running secured simulator and the gateway's certificate made by ``opcua-cert``."""

    server: OpcUaMachineServer
    folder: Path
    server_cert: Path
    client_cert: Path
    client_key: Path

    def trust_client(self) -> None:
        """Do what the hint says: put the gateway's certificate into the trusted folder."""
        shutil.copy(self.client_cert, trusted_dir(self.folder) / "gateway.pem")

    def distrust_client(self) -> None:
        """Empty the server's trusted folder (the state right after its first start)."""
        for path in trusted_dir(self.folder).iterdir():
            path.unlink()

    def connection(self, **kw: Any) -> OpcUaConnectionConfig:
        """A secure connection to the simulator as the commissioning guide configures it."""
        return OpcUaConnectionConfig(
            url=self.server.endpoint,
            timeout=2.0,
            mode="polling",
            security={
                "policy": "Basic256Sha256",
                "certificate": self.client_cert,
                "private_key": self.client_key,
                "trust": [self.server_cert],
            },
            **kw,
        )


def opcua_cert(out: Path) -> None:
    """``shopfloor opcua-cert`` as the README shows it, in its own process."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "opcua-cert",
            "--out",
            str(out),
            "--application-uri",
            "urn:edge-01:shopfloor",
            "--hostname",
            SEEN_AS,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    """One secured simulator for the module; its trusted folder starts empty."""
    base = tmp_path_factory.mktemp("commissioning")
    folder = base / "server-pki"
    server_cert, _ = await ensure_certificates(folder, NAME)
    opcua_cert(base / "gateway-pki")
    server = OpcUaMachineServer(CncModel(seed=5, name=NAME), port=free_port(), security=folder)
    async with server:
        yield Secure(
            server,
            folder,
            server_cert,
            base / "gateway-pki" / "client-cert.pem",
            base / "gateway-pki" / "client-key.pem",
        )


@pytest.fixture
def refusing_channel() -> Iterator[None]:
    """The server answers an OpenSecureChannel from a client certificate with a ServiceFault.

    Several servers refuse an unknown certificate this way instead of with an ERR message;
    asyncua's own server checks only at CreateSession, so its channel step is replaced here.
    """
    original = uaprocessor.UaProcessor.open_secure_channel

    def refuse(self: Any, algohdr: Any, seqhdr: Any, body: Any) -> None:
        if not algohdr.SenderCertificate:
            return original(self, algohdr, seqhdr, body)  # type: ignore[no-any-return]
        request = struct_from_binary(ua.OpenSecureChannelRequest, body)
        self._connection.select_policy(
            algohdr.SecurityPolicyURI, algohdr.SenderCertificate, request.Parameters.SecurityMode
        )
        fault = ua.ServiceFault()
        fault.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadSecurityChecksFailed)
        self.send_response(
            request.RequestHeader.RequestHandle, seqhdr, fault, ua.MessageType.SecureOpen
        )
        return None

    uaprocessor.UaProcessor.open_secure_channel = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        uaprocessor.UaProcessor.open_secure_channel = original  # type: ignore[method-assign]


def signals() -> dict[str, OpcUaSignalConfig]:
    """One standard node every server has (ServerStatus/CurrentTime)."""
    return {"now": OpcUaSignalConfig(node_id="i=2258")}


async def refused_twice(adapter: OpcUaAdapter) -> list[dict[str, Any]]:
    """Two failed connects; the adapter's log entries."""
    with capture_logs() as entries:
        for _ in range(2):
            async with asyncio.timeout(10):
                with pytest.raises(ConnectError):
                    await adapter.__aenter__()
    return entries


def assert_recognised(entries: list[dict[str, Any]], client_cert: Path) -> str:
    refused = [e for e in entries if e["event"] == "opcua.certificate_refused"]
    assert [e["log_level"] for e in refused] == ["warning", "debug"], entries
    message = str(refused[0]["error"])
    assert str(client_cert) in message and "trusted certificate folder" in message
    return message


async def test_empty_trusted_folder_is_a_certificate_refusal(secure: Secure) -> None:
    secure.distrust_client()
    adapter = OpcUaAdapter("cnc-c1", secure.connection(), signals(), 1.0)
    message = assert_recognised(await refused_twice(adapter), secure.client_cert)
    assert "BadCertificateUntrusted" in message


@pytest.mark.usefixtures("refusing_channel")
async def test_a_refused_secure_channel_is_a_certificate_refusal(secure: Secure) -> None:
    adapter = OpcUaAdapter("cnc-c2", secure.connection(), signals(), 1.0)
    message = assert_recognised(await refused_twice(adapter), secure.client_cert)
    assert "AssertionError" in message and "broke off the secure channel" in message


@pytest.fixture
def real_log() -> Iterator[io.StringIO]:
    """The gateway's real log pipeline (JSON) into a buffer, asyncua's loggers included."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure("info", json=True, stream=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_a_certificate_made_as_documented_connects_without_hostname_warnings(
    secure: Secure, real_log: io.StringIO
) -> None:
    secure.trust_client()
    try:
        for _ in range(2):
            async with OpcUaAdapter("cnc-c3", secure.connection(), signals(), 1.0) as adapter:
                async with asyncio.timeout(10):
                    batch = await anext(adapter.samples())
                assert batch[0].signal == "now" and batch[0].value is not None
    finally:
        secure.distrust_client()
    text = real_log.getvalue()
    assert "does not contain the hostname" not in text, text
    assert "does not contain the application uri" not in text, text


async def test_a_new_cause_inside_one_outage_is_one_warning(
    secure: Secure, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Server down, then up but refusing: two warnings with the two causes, no more."""
    secure.distrust_client()
    down = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway: {id: gw-comm, site: plant-c, topic_prefix: comm}\n"
        f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
        "logging: {level: info, format: json, levels: {gateway.runtime.devices: debug}}\n"
        "health: {listen: null}\n"  # 9108 may be taken: run would refuse
        f"state_dir: {tmp_path / 'state'}\n"
        "machines:\n"
        "  - id: cnc-01\n"
        "    area: machining\n"
        "    line: line-3\n"
        "    profile: machine-tool-umati\n"
        "    connection:\n"
        "      protocol: opcua\n"
        f"      url: opc.tcp://127.0.0.1:{down}/\n"
        "      timeout: 2.0\n"
        "      security:\n"
        "        policy: Basic256Sha256\n"
        f"        certificate: {secure.client_cert}\n"
        f"        private_key: {secure.client_key}\n"
        f"        trust: [{secure.server_cert}]\n"
    )
    log_path = tmp_path / "gw.log"

    def entries() -> list[dict[str, Any]]:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    async def logged(event: str, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(20):
            # The log file has no change notification: poll it under the timeout.
            while len(found := [e for e in entries() if e.get("event") == event]) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        return found

    async with gateway_process(cfg, log_path):
        await logged("device.unreachable", 1)
        # The same machine address now answers, through a forwarder to the secured server.
        forward = await _forwarder(down, secure.server.port)
        async with forward:
            (changed,) = await logged("device.unreachable_cause", 1)
            refused = await logged("opcua.certificate_refused", 1)
            # One more failed attempt with the same cause: at debug, no further warning.
            (again,) = await logged("device.still_unreachable", 1)
    assert "refused the gateway's certificate" in changed["error"]
    assert again["error"] == changed["error"] and again["level"] == "debug"
    assert changed["level"] == "warning" and refused[0]["level"] == "warning"
    warnings = [
        e
        for e in entries()
        if e.get("machine") == "cnc-01" and e.get("level") == "warning"
        if str(e.get("event", "")).startswith("device.")
    ]
    assert [e["event"] for e in warnings] == ["device.unreachable", "device.unreachable_cause"]


async def _forwarder(port: int, target: int) -> asyncio.Server:
    """A TCP forwarder from ``port`` to the simulator (the server 'comes back' on ``port``)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", port)


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]


async def test_retries_log_each_library_warning_once_and_tracebacks_as_text(
    secure: Secure, real_log: io.StringIO, refusing_channel: None
) -> None:
    """Three refused attempts through the real log pipeline: no line per retry."""
    secure.distrust_client()
    adapter = OpcUaAdapter("cnc-c4", secure.connection(), signals(), 1.0)
    for _ in range(3):
        async with asyncio.timeout(10):
            with pytest.raises(ConnectError):
                await adapter.__aenter__()
    lines = json_lines(real_log)
    loud = [(e["logger"], e["event"]) for e in lines if e["level"] in ("warning", "error")]
    assert len(loud) == len(set(loud)), loud
    assert ("shopfloor_gateway.adapters.opcua.adapter", "opcua.certificate_refused") in loud
    # asyncua's own report of the broken-off channel carries its traceback as text.
    (parsing,) = [e for e in lines if "while parsing message from server" in e["event"]]
    assert "exc_info" not in parsing
    assert "Traceback (most recent call last)" in parsing["exception"]
    assert "NotEnoughData" in parsing["exception"]
    assert "<traceback object" not in real_log.getvalue()


async def test_a_refused_session_does_not_log_service_faults_per_retry(
    secure: Secure, real_log: io.StringIO
) -> None:
    secure.distrust_client()
    adapter = OpcUaAdapter("cnc-c5", secure.connection(), signals(), 1.0)
    for _ in range(3):
        async with asyncio.timeout(10):
            with pytest.raises(ConnectError):
                await adapter.__aenter__()
    lines = json_lines(real_log)
    assert not [e for e in lines if e["event"].startswith("ServiceFault")], lines
    refused = [e for e in lines if e["event"] == "opcua.certificate_refused"]
    assert [e["level"] for e in refused] == ["warning"]


async def probe(secure: Secure, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``shopfloor probe opcua`` against the secured simulator."""
    parser = argparse.ArgumentParser()
    probe_cli.add_arguments(parser)
    args = parser.parse_args(["opcua", secure.server.endpoint, "--timeout", "2", *extra])
    out = io.StringIO()
    async with asyncio.timeout(30):
        code = await probe_cli.run(args, out)
    return code, out.getvalue()


def security_options(secure: Secure) -> list[str]:
    return [
        "--policy",
        "Basic256Sha256",
        "--certificate",
        str(secure.client_cert),
        "--private-key",
        str(secure.client_key),
        "--trust",
        str(secure.server_cert),
    ]


async def test_probe_reaches_a_secure_server_and_emits_every_variable(
    secure: Secure, tmp_path: Path
) -> None:
    code, text = await probe(secure)
    assert code == 1 and "error:" in text, text
    secure.distrust_client()
    code, text = await probe(secure, *security_options(secure))
    assert code == 1 and "refused the gateway's certificate" in text, text
    secure.trust_client()
    try:
        code, text = await probe(secure, *security_options(secure), "--emit-config")
    finally:
        secure.distrust_client()
    assert code == 0, text
    # The browse tree: one line per node, a variable's with its type and value.
    variables = [
        line for line in text.splitlines() if re.search(r"\]  (\w+ = |\(unreadable)", line)
    ]
    snippet = text[text.index("# Generated by shopfloor probe") :]
    machine = yaml.safe_load(snippet)["machines"][0]
    signals = machine["signals"]
    # Every variable has its own signal (the simulator repeats browse names, e.g. Name).
    assert len(signals) == len(variables) > 30
    node_ids = [body["node_id"] for body in signals.values()]
    assert len(set(node_ids)) == len(node_ids)
    server_nodes = [n for n in node_ids if not n.startswith("i=")]  # namespace 0 stays i=
    assert server_nodes and all(
        n.startswith(f"nsu={secure.server.namespace};") for n in server_nodes
    ), node_ids
    assert machine["connection"]["security"]["policy"] == "Basic256Sha256"
    # The snippet is a config the gateway loads, with every signal.
    cfg = tmp_path / "gw.yaml"
    machine.update(id="cnc-01", area="machining", line="line-3")
    machine["connection"]["publishing_interval"] = 1.0
    cfg.write_text(
        "gateway: {id: gw-probe, site: plant-p}\n"
        "broker: {host: 127.0.0.1, port: 1883}\n"
        f"state_dir: {tmp_path}\n" + yaml.safe_dump({"machines": [machine]})
    )
    plan = load_config(cfg)
    assert set(plan.machines[0].signals) == set(signals)
