"""The OPC UA adapter against real asyncua servers on 127.0.0.1 (module-scoped: starts are slow)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Server, ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from structlog.testing import capture_logs

from gateway.core.model import Quality, Sample
from shopfloor_gateway.adapters.base import ConnectError, ConnectionLost
from shopfloor_gateway.adapters.opcua.adapter import OpcUaAdapter
from shopfloor_gateway.adapters.opcua.cert import make_certificate
from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig, OpcUaSignalConfig
from shopfloor_gateway.adapters.opcua.security import UntrustedServerError

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

HOST = "127.0.0.1"
NS = "urn:shopfloor:test:machine"
SERVER_URI = "urn:shopfloor:test:server"
CLIENT_URI = "urn:shopfloor:test:gateway"
#: Operation limits the shared server advertises and enforces.
READ_LIMIT = 3
MONITOR_LIMIT = 4


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Users:
    """Anonymous and operator/secret are welcome; anything else is refused."""

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, **_: Any
    ) -> User | None:
        """asyncua user-manager hook."""
        if username is None:
            return User(role=UserRole.User)
        if (username, password) == ("operator", "secret"):
            return User(role=UserRole.User)
        return None


@dataclass
class Pki:
    """Certificates of one test run."""

    directory: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path


def _server_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed server certificate (PEM) and key for ``SERVER_URI``."""
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {},
        [
            cert_gen.x509.UniformResourceIdentifier(SERVER_URI),
            cert_gen.x509.DNSName(socket.gethostname()),
        ],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Server, client and an unrelated certificate."""
    directory = tmp_path_factory.mktemp("pki")
    server_cert, server_key = _server_pair(directory, "server")
    stranger, _ = _server_pair(directory, "stranger")
    cert_pem, key_pem = make_certificate(
        CLIENT_URI, socket.gethostname(), common_name="gateway", days=30
    )
    (directory / "client-cert.pem").write_bytes(cert_pem)
    (directory / "client-key.pem").write_bytes(key_pem)
    return Pki(
        directory,
        server_cert,
        server_key,
        directory / "client-cert.pem",
        directory / "client-key.pem",
        stranger,
    )


@dataclass
class OpcServer:
    """A running asyncua server with the machine's nodes, plus request counters."""

    server: Server
    port: int
    ns: int
    nodes: dict[str, Node]
    reads: list[int] = field(default_factory=list)
    monitor_calls: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Endpoint URL."""
        return f"opc.tcp://{HOST}:{self.port}/test/"

    def monitored_items(self) -> int:
        """Monitored items across all live subscriptions on the server."""
        subs = self.server.iserver.subscription_service.subscriptions.values()
        return sum(len(s.monitored_item_srv._monitored_items) for s in subs)

    async def write(self, name: str, value: Any, vtype: ua.VariantType) -> None:
        """Set a value with a fresh source timestamp."""
        await self.nodes[name].write_value(
            ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=datetime.now(UTC))
        )


async def start_server(
    port: int,
    pki: Pki | None = None,
    *,
    limits: tuple[int, int] | None = None,
    values: dict[str, Any] | None = None,
) -> OpcServer:
    """A server with ``Machine/Monitoring/*`` variables; optionally secure and limited."""
    server = Server(user_manager=Users())  # type: ignore[arg-type]
    await server.init()
    server.set_endpoint(f"opc.tcp://{HOST}:{port}/test/")
    await server.set_application_uri(SERVER_URI)
    policies = [ua.SecurityPolicyType.NoSecurity]
    if pki is not None:
        await server.load_certificate(str(pki.server_cert))
        await server.load_private_key(str(pki.server_key))
        policies += [
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
        ]
    server.set_security_policy(policies)
    server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
    # An unrelated namespace first, so the machine's index is not the usual 2: addressing
    # by URI (nsu= and aliases) is what keeps the config portable.
    await server.register_namespace("urn:shopfloor:test:other")
    ns = await server.register_namespace(NS)
    machine = await server.nodes.objects.add_object(ns, "Machine")
    monitoring = await machine.add_object(ns, "Monitoring")
    v = {
        "State": (1, ua.VariantType.Int32),
        "Count": (10, ua.VariantType.UInt32),
        "Speed": (1200.5, ua.VariantType.Double),
        "Temp": (0.1, ua.VariantType.Float),
        "Program": ("P-100", ua.VariantType.String),
        "Label": (ua.LocalizedText("Spindel", "de"), ua.VariantType.LocalizedText),
        "Started": (datetime(2026, 3, 1, 6, 0, tzinfo=UTC), ua.VariantType.DateTime),
        "Flags": ([3, 5, 7], ua.VariantType.Int32),
        "On": (True, ua.VariantType.Boolean),
    }
    for key, value in (values or {}).items():
        v[key] = (value, v[key][1])
    nodes: dict[str, Node] = {}
    for name, (value, vtype) in v.items():
        nodes[name] = await monitoring.add_variable(
            ua.NodeId(f"Machine.{name}", ns), ua.QualifiedName(name, ns), value, vtype
        )
    ts = OpcServer(server, port, ns, nodes)
    if limits is not None:
        await _enforce_limits(ts, *limits)
    await server.start()
    return ts


async def _enforce_limits(ts: OpcServer, max_read: int, max_monitor: int) -> None:
    """Advertise operation limits and refuse bigger requests, as strict servers do."""
    iserver = ts.server.iserver
    for node_id, limit in (
        (ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead, max_read),
        (
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
            max_monitor,
        ),
    ):
        await ts.server.write_attribute_value(
            ua.NodeId(node_id), ua.DataValue(ua.Variant(limit, ua.VariantType.UInt32))
        )
    read = iserver.attribute_service.read

    def limited_read(params: ua.ReadParameters) -> list[ua.DataValue]:
        ts.reads.append(len(params.NodesToRead))
        if len(params.NodesToRead) > max_read:
            raise ServiceError(ua.StatusCodes.BadTooManyOperations)
        return read(params)

    iserver.attribute_service.read = limited_read  # type: ignore[method-assign]
    create = iserver.subscription_service.create_monitored_items

    async def limited_create(params: ua.CreateMonitoredItemsParameters) -> Any:
        ts.monitor_calls.append(len(params.ItemsToCreate))
        if len(params.ItemsToCreate) > max_monitor:
            raise ServiceError(ua.StatusCodes.BadTooManyOperations)
        return await create(params)

    iserver.subscription_service.create_monitored_items = limited_create  # type: ignore[method-assign]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(pki: Pki) -> AsyncIterator[OpcServer]:
    """One secure, user-checking, operation-limited server for most tests."""
    ts = await start_server(free_port(), pki, limits=(READ_LIMIT, MONITOR_LIMIT))
    try:
        yield ts
    finally:
        await ts.server.stop()


def conn(url: str, **kw: Any) -> OpcUaConnectionConfig:
    """A connection config with short timeouts and the machine namespace alias."""
    base: dict[str, Any] = {
        "url": url,
        "timeout": 2.0,
        "watchdog_interval": 0.3,
        "publishing_interval": 0.05,
        "namespaces": {"m": NS},
        "default_namespace": "m",
    }
    base.update(kw)
    return OpcUaConnectionConfig(**base)


def signals(**extra: dict[str, Any]) -> dict[str, OpcUaSignalConfig]:
    """The machine's signals, by NodeId (nsu=), by browse path, and with array_index."""
    table: dict[str, dict[str, Any]] = {
        "state": {"browse_path": "Machine/Monitoring/State"},
        "good_count": {"node_id": f"nsu={NS};s=Machine.Count"},
        "speed": {"browse_path": "m:Machine/m:Monitoring/Speed"},
        "temp": {"node_id": f"nsu={NS};s=Machine.Temp"},
        "program": {"node_id": f"nsu={NS};s=Machine.Program"},
        "label": {"node_id": f"nsu={NS};s=Machine.Label"},
        "started": {"node_id": f"nsu={NS};s=Machine.Started"},
        "flag1": {"node_id": f"nsu={NS};s=Machine.Flags", "array_index": 1},
        "on": {"node_id": f"nsu={NS};s=Machine.On"},
    }
    table.update(extra)
    return {name: OpcUaSignalConfig(**body) for name, body in table.items()}


def by_signal(batch: Sequence[Sample]) -> dict[str, Sample]:
    """Last sample per signal."""
    return {s.signal: s for s in batch}


async def next_batch(stream: AsyncIterator[list[Sample]], wait: float = 5.0) -> list[Sample]:
    """The adapter's next batch, or a test failure after ``wait`` seconds."""
    async with asyncio.timeout(wait):
        return await anext(stream)


async def until(
    stream: AsyncIterator[list[Sample]],
    predicate: Callable[[dict[str, Sample]], bool],
    wait: float = 5.0,
) -> dict[str, Sample]:
    """Consume batches until the merged view of the latest samples satisfies ``predicate``."""
    seen: dict[str, Sample] = {}
    async with asyncio.timeout(wait):
        async for batch in stream:
            seen.update(by_signal(batch))
            if predicate(seen):
                return seen
    raise AssertionError("stream ended")


# -- values, addressing, bad nodes -------------------------------------------------------


async def test_subscription_initial_values_types_and_changes(shared: OpcServer) -> None:
    """First batch is a full read with mapped types; a server change arrives as a notification."""
    sigs = signals(missing={"node_id": f"nsu={NS};s=Machine.DoesNotExist"})
    adapter = OpcUaAdapter("cnc-1", conn(shared.url), sigs, 1.0)
    with capture_logs() as logs:
        async with adapter:
            stream = adapter.samples()
            first = by_signal(await next_batch(stream))
            assert set(first) == set(sigs)
            assert first["state"].value == 1 and first["state"].quality is Quality.GOOD
            assert first["good_count"].value == 10
            assert first["speed"].value == 1200.5
            assert first["temp"].value == 0.1  # Float, not 0.10000000149011612
            assert first["program"].value == "P-100"
            assert first["label"].value == "Spindel"
            assert first["started"].value == datetime(2026, 3, 1, 6, 0, tzinfo=UTC).timestamp()
            assert first["flag1"].value == 5
            assert first["on"].value is True
            # The unknown node is bad; everything else flows.
            assert first["missing"].quality is Quality.BAD and first["missing"].value is None

            await shared.write("Count", 11, ua.VariantType.UInt32)
            seen = await until(stream, lambda s: "good_count" in s and s["good_count"].value == 11)
            assert seen["good_count"].quality is Quality.GOOD
            # Source timestamps come from the server.
            assert abs(seen["good_count"].source_time - datetime.now(UTC).timestamp()) < 5
            await stream.aclose()
        assert adapter.monitored_items == 0
    unresolved = [e for e in logs if e["event"] == "opcua.signal_unresolved"]
    assert [e["signal"] for e in unresolved] == ["missing"]
    assert "BadNodeIdUnknown" in unresolved[0]["reason"]


async def test_unresolvable_browse_path_is_bad_and_logged_once(shared: OpcServer) -> None:
    """A path that does not exist: that signal is bad across reconnects, one warning only."""
    sigs = signals(ghost={"browse_path": "Machine/Monitoring/Ghost"})
    adapter = OpcUaAdapter("cnc-2", conn(shared.url, mode="polling"), sigs, 0.05)
    with capture_logs() as logs:
        for _ in range(2):
            async with adapter:
                batch = by_signal(await next_batch(adapter.samples()))
                assert batch["ghost"].quality is Quality.BAD
                assert batch["state"].quality is Quality.GOOD
    warnings = [e for e in logs if e.get("signal") == "ghost" and e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "does not resolve" in warnings[0]["reason"]


async def test_uncertain_and_bad_status_codes(shared: OpcServer) -> None:
    """Uncertain keeps the value; a bad status gives a bad sample, never an exception."""
    adapter = OpcUaAdapter("cnc-3", conn(shared.url, mode="polling"), signals(), 0.05)
    node = shared.nodes["Speed"]
    try:
        await node.write_value(
            ua.DataValue(
                ua.Variant(99.0, ua.VariantType.Double),
                StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
            )
        )
        async with adapter:
            stream = adapter.samples()
            batch = by_signal(await next_batch(stream))
            assert batch["speed"].quality is Quality.UNCERTAIN and batch["speed"].value == 99.0
            await node.write_value(
                ua.DataValue(
                    ua.Variant(0.0, ua.VariantType.Double),
                    StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure),
                )
            )
            seen = await until(stream, lambda s: s["speed"].quality is Quality.BAD)
            assert seen["speed"].value is None
            assert seen["state"].quality is Quality.GOOD
    finally:
        await shared.write("Speed", 1200.5, ua.VariantType.Double)


# -- operation limits --------------------------------------------------------------------


async def test_polling_reads_are_chunked_by_max_nodes_per_read(shared: OpcServer) -> None:
    """Reads per cycle = ceil(nodes / MaxNodesPerRead); the strict server refuses more."""
    sigs = signals()
    adapter = OpcUaAdapter("cnc-4", conn(shared.url, mode="polling"), sigs, 0.02)
    async with adapter:
        assert adapter.limits[0] == READ_LIMIT
        stream = adapter.samples()
        await next_batch(stream)
        before, server_before = adapter.read_requests, len(shared.reads)
        for _ in range(3):
            batch = await next_batch(stream)
            assert all(s.quality is Quality.GOOD for s in batch)
        per_cycle = math.ceil(len(sigs) / READ_LIMIT)
        assert adapter.read_requests - before == 3 * per_cycle
        assert all(n <= READ_LIMIT for n in shared.reads[server_before:])
        await shared.write("State", 3, ua.VariantType.Int32)
        seen = await until(stream, lambda s: s["state"].value == 3)
        assert seen["state"].quality is Quality.GOOD
    await shared.write("State", 1, ua.VariantType.Int32)


async def test_monitored_items_are_created_in_chunks(shared: OpcServer) -> None:
    """CreateMonitoredItems calls = ceil(items / MaxMonitoredItemsPerCall)."""
    sigs = signals()
    adapter = OpcUaAdapter("cnc-5", conn(shared.url), sigs, 1.0)
    start = len(shared.monitor_calls)
    async with adapter:
        assert adapter.monitored_items == len(sigs)
        assert adapter.monitor_requests == math.ceil(len(sigs) / MONITOR_LIMIT)
        assert all(n <= MONITOR_LIMIT for n in shared.monitor_calls[start:])
        assert shared.monitored_items() == len(sigs)
    assert shared.monitored_items() == 0


async def test_deadband_is_applied_by_the_server(shared: OpcServer) -> None:
    """Changes within the absolute deadband are not notified; bigger ones are."""
    sigs = {
        "speed": OpcUaSignalConfig(node_id=f"nsu={NS};s=Machine.Speed", deadband=10.0),
        "state": OpcUaSignalConfig(node_id=f"nsu={NS};s=Machine.State"),
    }
    adapter = OpcUaAdapter("cnc-6", conn(shared.url), sigs, 1.0)
    try:
        async with adapter:
            stream = adapter.samples()
            await next_batch(stream)
            await shared.write("Speed", 1201.0, ua.VariantType.Double)  # within the deadband
            await shared.write("Speed", 1300.0, ua.VariantType.Double)  # outside
            seen: list[float] = []
            async with asyncio.timeout(5):
                while 1300.0 not in seen:
                    seen += [s.value for s in await anext(stream) if s.signal == "speed"]  # type: ignore[misc]
            assert 1201.0 not in seen
    finally:
        await shared.write("Speed", 1200.5, ua.VariantType.Double)


# -- security and identity ---------------------------------------------------------------


def secure(url: str, pki: Pki, trust: list[Path], **kw: Any) -> OpcUaConnectionConfig:
    """A Basic256Sha256 SignAndEncrypt connection with the gateway's certificate."""
    security: dict[str, Any] = {
        "policy": "Basic256Sha256",
        "mode": "SignAndEncrypt",
        "certificate": pki.client_cert,
        "private_key": pki.client_key,
        "trust": trust,
    }
    security.update(kw.pop("security", {}))
    return conn(url, security=security, mode="polling", **kw)


async def test_basic256sha256_sign_and_encrypt_with_trusted_server(
    shared: OpcServer, pki: Pki
) -> None:
    """Encrypted channel, server certificate in the trust list, username identity."""
    cfg = secure(shared.url, pki, [pki.server_cert], username="operator", password="secret")
    adapter = OpcUaAdapter("cnc-7", cfg, signals(), 0.05)
    async with adapter:
        batch = by_signal(await next_batch(adapter.samples()))
        assert batch["program"].value == "P-100"


async def test_aes256_rsapss_sign_with_a_trusted_directory(shared: OpcServer, pki: Pki) -> None:
    """Another policy and mode; the trust entry is a directory of certificates."""
    trust_dir = pki.directory / "trusted"
    trust_dir.mkdir(exist_ok=True)
    (trust_dir / "server.pem").write_bytes(pki.server_cert.read_bytes())
    cfg = secure(
        shared.url, pki, [trust_dir], security={"policy": "Aes256_Sha256_RsaPss", "mode": "Sign"}
    )
    async with OpcUaAdapter("cnc-8", cfg, signals(), 0.05) as adapter:
        batch = by_signal(await next_batch(adapter.samples()))
        assert batch["state"].value == 1


async def test_untrusted_server_is_refused_with_how_to_trust(
    shared: OpcServer, pki: Pki, tmp_path: Path
) -> None:
    """Unknown certificate: refused, saved, and the message says which file to move where."""
    trust_dir = tmp_path / "trusted"
    trust_dir.mkdir()
    (trust_dir / "stranger.pem").write_bytes(pki.stranger_cert.read_bytes())
    rejected = tmp_path / "rejected"
    cfg = secure(shared.url, pki, [trust_dir], security={"rejected_dir": rejected})
    adapter = OpcUaAdapter("cnc-9", cfg, signals(), 0.05)
    with capture_logs() as logs, pytest.raises(UntrustedServerError) as info:
        await adapter.__aenter__()
    saved = list(rejected.iterdir())
    assert len(saved) == 1
    message = str(info.value)
    assert "not in security.trust" in message
    assert str(saved[0]) in message and str(trust_dir) in message
    assert any(e["event"] == "opcua.server_refused" for e in logs)
    # Following the advice is all it takes.
    saved[0].rename(trust_dir / saved[0].name)
    async with adapter:
        assert by_signal(await next_batch(adapter.samples()))["state"].value == 1


async def test_wrong_password_is_refused_with_a_clear_log_line(shared: OpcServer) -> None:
    """Username auth: a wrong password is a ConnectError naming the user, logged once."""
    adapter = OpcUaAdapter(
        "cnc-10", conn(shared.url, username="operator", password="wrong"), signals(), 1.0
    )
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(ConnectError) as info:
                await adapter.__aenter__()
            assert "refused user 'operator'" in str(info.value)
            assert "check username and password" in str(info.value)
    refused = [e for e in logs if e["event"] == "opcua.auth_refused"]
    assert [e["log_level"] for e in refused] == ["warning", "debug"]
    assert "BadUserAccessDenied" in refused[0]["error"]


async def test_no_server_is_a_connect_error() -> None:
    """A closed port gives ConnectError quickly, naming the URL."""
    url = f"opc.tcp://{HOST}:{free_port()}/"
    adapter = OpcUaAdapter("cnc-11", conn(url), signals(), 1.0)
    async with asyncio.timeout(5):
        with pytest.raises(ConnectError, match=url):
            await adapter.__aenter__()


# -- restarts and reconnects -------------------------------------------------------------


async def test_server_restart_reconnect_reread_and_no_duplicate_items(pki: Pki) -> None:
    """Restart mid-run: ConnectionLost, then re-entering re-reads, re-subscribes, no duplicates."""
    port = free_port()
    ts = await start_server(port)
    sigs = signals()
    adapter = OpcUaAdapter("cnc-12", conn(ts.url), sigs, 1.0)
    try:
        async with adapter:
            stream = adapter.samples()
            assert by_signal(await next_batch(stream))["good_count"].value == 10
            await ts.server.stop()
            with pytest.raises(ConnectionLost):
                async with asyncio.timeout(5):
                    async for _ in stream:
                        pass
        # The value changed while the gateway was away: the first read after the restart
        # must show it even though no notification will ever report it.
        ts = await start_server(port, values={"Count": 42})
        for attempt in range(4):
            async with adapter:
                assert ts.monitored_items() == len(sigs), attempt
                stream = adapter.samples()
                first = by_signal(await next_batch(stream))
                assert first["good_count"].value == 42 + attempt
                await ts.write("Count", 43 + attempt, ua.VariantType.UInt32)
                await until(stream, lambda s, a=attempt: s["good_count"].value == 43 + a)
                await stream.aclose()
        assert ts.monitored_items() == 0
    finally:
        with contextlib.suppress(Exception):
            await ts.server.stop()


async def test_polling_mode_detects_a_stopped_server(pki: Pki) -> None:
    """Polling: the next cycle after the server went away raises ConnectionLost."""
    ts = await start_server(free_port())
    adapter = OpcUaAdapter("cnc-13", conn(ts.url, mode="polling"), signals(), 0.05)
    try:
        async with adapter:
            stream = adapter.samples()
            await next_batch(stream)
            await ts.server.stop()
            with pytest.raises(ConnectionLost):
                async with asyncio.timeout(5):
                    async for _ in stream:
                        pass
    finally:
        with contextlib.suppress(Exception):
            await ts.server.stop()
