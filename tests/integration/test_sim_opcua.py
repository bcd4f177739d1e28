"""Integration tests: the simulated CNC machine and robot served over real OPC UA on loopback.

asyncua servers cost about a second of CPU to start, so the servers are module-scoped and
shared: a frozen CNC and robot (scenario time barely moves) for the address space, a fast
CNC for live values and restarts, one secured server with users.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from shopfloor_gateway.simulators import cnc, opcua_cli, robot
from shopfloor_gateway.simulators.cnc import CncModel
from shopfloor_gateway.simulators.modbus_server import free_port
from shopfloor_gateway.simulators.opcua_common import NS_DI, NS_MACHINE_TOOL, NS_ROBOTICS, NS_UA
from shopfloor_gateway.simulators.opcua_server import (
    OpcUaMachineServer,
    certificate_paths,
    trusted_dir,
)
from shopfloor_gateway.simulators.robot import RobotModel
from shopfloor_gateway.simulators.scenario import Changeover, Fault, RunOrder, Stop

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROFILES = Path(__file__).resolve().parents[2] / "config" / "profiles"
FROZEN = 1e-9  # scenario seconds per wall-clock second: values stay at their start


def client_for(server: OpcUaMachineServer) -> Client:
    """An insecure asyncua client with short timeouts."""
    return Client(server.endpoint, timeout=3)


async def node(client: Client, server: OpcUaMachineServer, key: str) -> Node:
    """The client-side node of a simulator node key, by its string NodeId."""
    index = await client.get_namespace_index(server.namespace)
    return client.get_node(ua.NodeId(server.model.address_space.node_id(key), index))


async def by_browse_path(client: Client, root: Node, path: str, aliases: Mapping[str, str]) -> Node:
    """Follow a profile browse path from ``root`` (``0:`` = OPC UA base namespace)."""
    segments = []
    for part in path.split("/"):
        prefix, _, name = part.partition(":")
        uri = NS_UA if prefix == "0" else aliases[prefix]
        segments.append(f"{await client.get_namespace_index(uri)}:{name}")
    return await root.get_child(segments)


async def wait_for(predicate: Any, every: float = 0.02) -> None:
    """Poll ``predicate()`` (sync or async) until true; callers bound it with a timeout."""
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(every)


def cnc_script() -> list[Any]:
    return [
        RunOrder("PO-24117", target=8, piece_seconds=30.0, scrap_every=4),
        Stop(60.0),
        Changeover(60.0),
    ]


# ---------------------------------------------------------------------------- fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def frozen_cnc() -> AsyncIterator[OpcUaMachineServer]:
    model = CncModel(cnc_script(), name="cnc-01")
    model.advance(100.0)  # three parts made, the fourth (scrap) not yet
    async with OpcUaMachineServer(model, port=free_port(), speed=FROZEN) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def frozen_robot() -> AsyncIterator[OpcUaMachineServer]:
    model = RobotModel([RunOrder("PO-1", target=50, piece_seconds=9.0)], name="robot-01")
    model.advance(40.0)
    async with OpcUaMachineServer(model, port=free_port(), speed=FROZEN) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live_cnc() -> AsyncIterator[OpcUaMachineServer]:
    # A part every 20 ms: counters move between any two reads.
    model = CncModel([RunOrder("PO-9", target=100_000, piece_seconds=0.02)], name="cnc-02")
    async with OpcUaMachineServer(
        model, port=free_port(), tick=0.02, missing=[cnc.K_SPINDLE_SPEED]
    ) as server:
        yield server


# ---------------------------------------------------------------------------- address space


async def check_profile_reads(
    server: OpcUaMachineServer, profile: str, aliases: Mapping[str, str]
) -> dict[str, Any]:
    signals = yaml.safe_load((PROFILES / profile).read_text(encoding="utf-8"))["signals"]
    expected = server.model.values()
    read: dict[str, Any] = {}
    async with client_for(server) as client:
        root = await node(client, server, "")
        for name, body in signals.items():
            found = await by_browse_path(client, root, body["browse_path"], aliases)
            value = await found.read_data_value()
            assert value.StatusCode.is_good(), name
            assert value.SourceTimestamp is not None, name
            key = found.nodeid.Identifier.removeprefix(server.model.address_space.root_id + "/")
            raw = value.Value.Value
            read[name] = raw.Text if isinstance(raw, ua.LocalizedText) else raw
            assert read[name] == expected[key], name
    return read


async def test_cnc_profile_nodes_resolve_and_read(frozen_cnc: OpcUaMachineServer) -> None:
    aliases = {"mt": NS_MACHINE_TOOL, "sim": cnc.CNC_NAMESPACE}
    read = await check_profile_reads(frozen_cnc, "machine-tool-umati.yaml", aliases)
    assert read["state"] == "Running"
    assert (read["order_id"], read["good_count"], read["total_count"]) == ("PO-24117", 3, 3)
    # RunsPlanned counts every run (OPC 40501): 8 good at every fourth run scrap take 10.
    assert read["target_count"] == 10
    assert read["order_ended"] == "Running"  # the job's state, mapped to a bit by the profile
    assert read["program"] == cnc.program_for("PO-24117")


async def test_robot_profile_nodes_resolve_and_read(frozen_robot: OpcUaMachineServer) -> None:
    aliases = {"rob": NS_ROBOTICS, "di": NS_DI, "sim": robot.ROBOT_NAMESPACE}
    read = await check_profile_reads(frozen_robot, "robot-opc40010.yaml", aliases)
    assert read["state"] == "Executing"
    assert read["program"] == robot.program_for("PO-1")
    assert read["emergency_stop"] is False


async def test_root_sits_below_the_machines_folder(frozen_cnc: OpcUaMachineServer) -> None:
    async with client_for(frozen_cnc) as client:
        machinery = await client.get_namespace_index("http://opcfoundation.org/UA/Machinery/")
        inst = await client.get_namespace_index(cnc.CNC_NAMESPACE)
        found = await client.nodes.objects.get_child([f"{machinery}:Machines", f"{inst}:cnc-01"])
        assert found.nodeid == ua.NodeId("MachineTool", inst)
        # Spec properties are properties, so generic clients show them as such.
        serial = await node(client, frozen_cnc, "Identification/SerialNumber")
        assert await serial.read_node_class() == ua.NodeClass.Variable
        refs = await serial.get_references(ua.ObjectIds.HasTypeDefinition)
        assert refs[0].NodeId == ua.NodeId(ua.ObjectIds.PropertyType)


# ---------------------------------------------------------------------------- live values


async def test_values_change_with_fresh_source_timestamps(live_cnc: OpcUaMachineServer) -> None:
    async with client_for(live_cnc) as client:
        good = await node(client, live_cnc, cnc.K_PARTS_GOOD)
        first = await good.read_data_value()
        seen: list[ua.DataValue] = []

        async def moved() -> bool:
            seen.append(await good.read_data_value())
            return bool(seen[-1].Value.Value >= first.Value.Value + 5)

        async with asyncio.timeout(5):
            await wait_for(moved)
        last = seen[-1]
        assert last.SourceTimestamp is not None and first.SourceTimestamp is not None
        assert last.SourceTimestamp > first.SourceTimestamp
        lifetime = await (await node(client, live_cnc, cnc.K_LIFETIME)).read_value()
        assert lifetime >= last.Value.Value


async def test_missing_and_removed_nodes_answer_bad_node_id_unknown(
    live_cnc: OpcUaMachineServer,
) -> None:
    async with client_for(live_cnc) as client:
        speed = await node(client, live_cnc, cnc.K_SPINDLE_SPEED)
        value = await speed.read_data_value(raise_on_bad_status=False)
        assert value.StatusCode.value == ua.StatusCodes.BadNodeIdUnknown

        alarm = await node(client, live_cnc, cnc.K_ALARM_TEXT)
        assert (await alarm.read_data_value()).StatusCode.is_good()
        await live_cnc.remove_node(cnc.K_ALARM_TEXT)
        value = await alarm.read_data_value(raise_on_bad_status=False)
        assert value.StatusCode.value == ua.StatusCodes.BadNodeIdUnknown
        # Neighbours keep updating.
        good = await node(client, live_cnc, cnc.K_PARTS_GOOD)
        assert (await good.read_data_value()).StatusCode.is_good()
    with pytest.raises(KeyError):
        await live_cnc.remove_node(cnc.K_ALARM_TEXT)


async def test_restart_on_same_port_keeps_the_scenario_going(
    live_cnc: OpcUaMachineServer,
) -> None:
    async with client_for(live_cnc) as client:
        before = await (await node(client, live_cnc, cnc.K_PARTS_GOOD)).read_value()
    await live_cnc.stop()
    assert not live_cnc.is_serving()
    with pytest.raises((OSError, TimeoutError, ua.UaError)):
        async with client_for(live_cnc):
            pass
    # The machine keeps producing while nobody can reach it.
    async with asyncio.timeout(5):
        await wait_for(lambda: live_cnc.model.values()[cnc.K_PARTS_GOOD] >= before + 10)
    await live_cnc.start()
    assert live_cnc.is_serving()
    async with client_for(live_cnc) as client:
        after = await (await node(client, live_cnc, cnc.K_PARTS_GOOD)).read_value()
    assert after >= before + 10
    await live_cnc.start()  # already serving: nothing happens


async def test_scripted_machine_finishes() -> None:
    model = CncModel(
        [RunOrder("PO-1", target=3, piece_seconds=0.05), Fault(0.1, alarm_code=7002)],
        name="cnc-03",
    )
    async with OpcUaMachineServer(model, port=free_port(), tick=0.02) as server:
        await server.wait_finished(timeout=5)
        async with client_for(server) as client:
            good = await (await node(client, server, cnc.K_PARTS_GOOD)).read_value()
            state = await (await node(client, server, cnc.K_PROGRAM_STATE)).read_value()
    assert good == 3 and state.Text == "Ended"
    assert model.truth["PO-1"].completed


# ---------------------------------------------------------------------------- security


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[OpcUaMachineServer, Path]]:
    folder = tmp_path_factory.mktemp("opcua-security")
    users = {"operator": "s3cret-pass"}
    model = RobotModel(name="robot-09")
    async with OpcUaMachineServer(
        model, port=free_port(), security=folder, users=users, speed=FROZEN
    ) as server:
        yield server, folder


async def client_cert(folder: Path, name: str) -> tuple[Path, Path, str]:
    """Create a client key and certificate in ``folder``; return (cert, key, application uri)."""
    uri = f"urn:shopfloor-gateway:test:{name}"
    cert, key = folder / f"{name}-cert.der", folder / f"{name}-key.pem"
    await setup_self_signed_certificate(
        key, cert, uri, "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": name}
    )
    return cert, key, uri


async def secure_client(
    server: OpcUaMachineServer, folder: Path, cert: Path, key: Path, uri: str, password: str
) -> Client:
    client = Client(server.endpoint, timeout=3)
    client.application_uri = uri
    server_cert, _ = certificate_paths(folder, server.model.name)
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(cert),
        private_key=str(key),
        server_certificate=str(server_cert),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    client.set_user("operator")
    client.set_password(password)
    return client


async def test_secured_server_accepts_trusted_client_with_password(
    secured: tuple[OpcUaMachineServer, Path], tmp_path: Path
) -> None:
    server, folder = secured
    assert certificate_paths(folder, "robot-09")[0].is_file()
    cert, key, uri = await client_cert(tmp_path, "gateway")
    shutil.copy(cert, trusted_dir(folder) / cert.name)  # trusting needs no restart

    endpoints = await Client(server.endpoint, timeout=3).connect_and_get_server_endpoints()
    assert {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints} == {
        (SecurityPolicyBasic256Sha256.URI, ua.MessageSecurityMode.SignAndEncrypt)
    }
    client = await secure_client(server, folder, cert, key, uri, "s3cret-pass")
    async with client:
        mode = await (await node(client, server, robot.K_OPERATIONAL_MODE)).read_value()
    assert mode == robot.OPERATIONAL_MODES["AUTOMATIC"]

    client = await secure_client(server, folder, cert, key, uri, "wrong-pass")
    with pytest.raises(ua.UaError):
        async with client:
            pass


async def test_secured_server_refuses_untrusted_and_plain_clients(
    secured: tuple[OpcUaMachineServer, Path], tmp_path: Path
) -> None:
    server, folder = secured
    cert, key, uri = await client_cert(tmp_path, "stranger")
    client = await secure_client(server, folder, cert, key, uri, "s3cret-pass")
    with pytest.raises((ua.UaError, OSError, TimeoutError)):
        async with client:
            pass
    with pytest.raises((ua.UaError, OSError, TimeoutError)):
        async with client_for(server):
            pass


# ---------------------------------------------------------------------------- CLI


async def test_cli_serves_a_robot_with_a_user() -> None:
    parser = argparse.ArgumentParser()
    opcua_cli.add_arguments(parser, "robot")
    port = free_port()
    args = parser.parse_args(["--port", str(port), "--user", "cell:pw-1234", "--speed", "5"])
    task = asyncio.create_task(opcua_cli.run(args))
    try:
        client = Client(f"opc.tcp://127.0.0.1:{port}/", timeout=3)
        client.set_user("cell")
        client.set_password("pw-1234")

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        async with asyncio.timeout(15):
            await wait_for(listening, every=0.05)
        await client.connect()
        try:
            index = await client.get_namespace_index(robot.ROBOT_NAMESPACE)
            node_id = ua.NodeId(f"{robot.ROOT_ID}/{robot.K_PROGRAM_LOADED}", index)
            assert await client.get_node(node_id).read_value() in (True, False)
        finally:
            await client.disconnect()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_cli_rejects_a_broken_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- run_order: {order_id: PO-1, target: zero, piece_seconds: 1}\n")
    parser = argparse.ArgumentParser()
    opcua_cli.add_arguments(parser, "cnc")
    assert await opcua_cli.run(parser.parse_args(["--scenario", str(bad)])) == 2
