"""The Sparkplug B edge node on a real Mosquitto, checked with Eclipse Tahu's own codec.

What the gateway process publishes is decoded by Tahu's JavaScript ``sparkplug-payload``
(tests/sparkplug_js, ``make sparkplug-js``), a decoder this project did not write: every
metric of a BIRTH and a DATA. A host application asks for a rebirth with an NCMD that
Tahu encoded; killing the process makes the broker publish the NDEATH (the last will).
The primary host STATE test runs the edge node in-process against the same kind of broker.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.core.model import Sample
from gateway.delivery.mqtt.publisher import BrokerSettings, TlsSettings, tls_context
from gateway.delivery.sparkplug import codec
from gateway.delivery.sparkplug.client import SparkplugNode, SparkplugSettings, publish_packet
from gateway.delivery.sparkplug.node import ORDER_METRICS
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber
from tests.gatewayproc import gateway_process
from tests.integration.test_publisher import _make_pki
from tests.sparkplug import by_name, tahu_decode, tahu_encode

GROUP = "Plant A"
NODE = "gw-spb"
BASE = f"spBv1.0/{GROUP}"
#: Tahu's names of the datatypes the node uses.
TYPE_NAMES = {4: "Int64", 10: "Double", 11: "Boolean", 12: "String", 13: "DateTime"}
#: The sewing station's signals (the badge, ``operator``, is dropped by the default policy).
SEWING = {
    "state",
    "good_count",
    "scrap_count",
    "target_count",
    "alarm_code",
    "stitch_rate",
    "order_id",
    "cycle_time",
}


def kind(m: Received) -> str:
    return m.topic.split("/")[2]


def write_config(tmp_path: Path, broker: MosquittoBroker, port: int) -> Path:
    cfg = tmp_path / "gw.yaml"
    spb = {
        "name": "spb",
        "host": broker.host,
        "port": broker.port,
        "format": "sparkplug",
        "group_id": GROUP,
        "edge_node_id": NODE,
    }
    cfg.write_text(
        "\n".join(
            [
                "gateway: {id: gw-1, site: plant-1, topic_prefix: spt}",
                f"state_dir: {tmp_path / 'state'}",
                "logging: {level: info, format: json}",
                "health: {listen: null}",
                "destinations:",
                f"  - {{name: cloud, host: {broker.host}, port: {broker.port}}}",
                f"  - {json.dumps(spb)}",
                "machines:",
                "  - {id: box-01, area: sewing, line: line-1, profile: sewing-station,"
                " poll_interval: 0.1,"
                f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}",
            ]
        )
        + "\n"
    )
    return cfg


def same_metric(tahu: dict[str, Any], ours: codec.Metric) -> None:
    """Tahu's reading of a metric agrees with ours, field by field."""
    assert tahu.get("name") == ours.name
    assert tahu["alias"] == ours.alias
    assert tahu["timestamp"] == ours.timestamp
    assert tahu["type"] == TYPE_NAMES[ours.datatype or 0]
    assert tahu.get("isHistorical", False) == ours.is_historical
    if ours.is_null:
        assert tahu["value"] is None
    else:
        assert tahu["value"] == ours.value


async def test_what_the_gateway_publishes_decodes_with_tahu_and_a_host_gets_a_rebirth(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    port = free_port()
    script = [Idle(0.3), RunOrder("SP-1", target=100_000, piece_seconds=0.1), Idle(60)]
    cfg = write_config(tmp_path, mosquitto, port)
    async with (
        Subscriber(mosquitto.host, mosquitto.port, "spBv1.0/#") as sub,
        SimulatedFloor([StationSpec("box-01", port, StationModel(script, name="box-01"))]),
        gateway_process(cfg, tmp_path / "gw.log") as proc,
    ):

        def births_then_data(ms: list[Received]) -> bool:
            kinds = [kind(m) for m in ms]
            return "DBIRTH" in kinds and "DDATA" in kinds[kinds.index("DBIRTH") :]

        try:
            msgs = await sub.wait_for(births_then_data, timeout=20)
        except AssertionError:
            raise AssertionError((tmp_path / "gw.log").read_text()[-3000:]) from None
        assert [kind(m) for m in msgs[:2]] == ["NBIRTH", "DBIRTH"]
        nbirth, dbirth = msgs[0], msgs[1]
        assert nbirth.topic == f"{BASE}/NBIRTH/{NODE}"
        assert dbirth.topic == f"{BASE}/DBIRTH/{NODE}/box-01"
        assert not nbirth.retain and not dbirth.retain
        ddata = next(m for m in msgs[2:] if kind(m) == "DDATA")

        t_nbirth, t_dbirth, t_ddata = await tahu_decode(
            [nbirth.payload, dbirth.payload, ddata.payload]
        )
        # NBIRTH: seq 0, bdSeq and the rebirth control.
        assert t_nbirth["seq"] == 0
        node_metrics = by_name(t_nbirth)
        assert {n: (m["type"], m["value"]) for n, m in node_metrics.items()} == {
            "bdSeq": ("Int64", 0),
            "Node Control/Rebirth": ("Boolean", False),
        }
        # DBIRTH: every metric, each as Tahu and our decoder read it.
        assert t_dbirth["seq"] == 1
        ours = codec.decode(dbirth.payload)
        assert len(t_dbirth["metrics"]) == len(ours.metrics)
        for tm, om in zip(t_dbirth["metrics"], ours.metrics, strict=True):
            same_metric(tm, om)
        birth = by_name(t_dbirth)
        assert set(birth) == set(ORDER_METRICS) | SEWING
        assert {n: birth[n]["type"] for n in ORDER_METRICS} == {
            n: TYPE_NAMES[dt] for n, dt in ORDER_METRICS.items()
        }
        assert birth["good_count"]["type"] == "Int64"
        assert birth["stitch_rate"]["type"] == "Double"
        assert birth["state"]["type"] == "String"
        assert birth["state"]["value"] in {"idle", "running"}
        aliases = {m["alias"]: m for m in t_dbirth["metrics"]}
        assert len(aliases) == len(birth)
        # DDATA: by alias only, each with the datatype and a timestamp, values as ours.
        assert t_ddata["seq"] == 2
        ours = codec.decode(ddata.payload)
        assert t_ddata["metrics"]
        for tm, om in zip(t_ddata["metrics"], ours.metrics, strict=True):
            same_metric(tm, om)
            assert "name" not in tm
            assert tm["type"] == aliases[tm["alias"]]["type"]

        # The order reaches the metrics: Order/Id and growing Order/Good.
        alias_of = {n: m["alias"] for n, m in birth.items()}

        async def order_values() -> dict[str, Any]:
            data = [m.payload for m in sub.messages if kind(m) == "DDATA"]
            seen: dict[str, Any] = {}
            for p in await tahu_decode(data):
                for m in p["metrics"]:
                    seen[m["alias"]] = m["value"]
            return {n: seen.get(a) for n, a in alias_of.items() if n in ORDER_METRICS}

        async with asyncio.timeout(15):
            while (got := await order_values())["Order/Good"] in (None, 0):
                seen = len(sub.messages)
                await sub.wait_for(lambda ms, seen=seen: len(ms) > seen)
        assert got["Order/Id"] == "SP-1"
        assert got["Order/Status"] == "running"
        assert got["Machine/State"] == "running"
        assert isinstance(got["Order/Good"], int) and got["Order/Good"] > 0

        # A host application asks for a rebirth (an NCMD encoded by Tahu).
        ncmd = await tahu_encode(
            {
                "timestamp": int(time.time() * 1000),
                "metrics": [{"name": "Node Control/Rebirth", "type": "Boolean", "value": True}],
            }
        )
        before = len(sub.messages)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="host-app") as host:
            await host.publish(f"{BASE}/NCMD/{NODE}", ncmd, qos=1)

        def reborn(ms: list[Received]) -> bool:
            kinds = [kind(m) for m in ms[before:]]
            return "NBIRTH" in kinds and "DBIRTH" in kinds[kinds.index("NBIRTH") :]

        msgs = await sub.wait_for(reborn, timeout=10)
        again = msgs[before:]
        i = [kind(m) for m in again].index("NBIRTH")
        t_nb2, t_db2 = await tahu_decode([again[i].payload, again[i + 1].payload])
        assert kind(again[i + 1]) == "DBIRTH"
        assert t_nb2["seq"] == 0 and t_db2["seq"] == 1
        assert by_name(t_nb2)["bdSeq"]["value"] == 0  # same session, same bdSeq
        birth2 = by_name(t_db2)
        assert {n: m["alias"] for n, m in birth2.items()} == alias_of
        assert birth2["Order/Id"]["value"] == "SP-1"
        assert birth2["Order/Good"]["value"] >= got["Order/Good"]

        # Killed: the broker publishes the NDEATH, bdSeq matching the NBIRTH.
        proc.kill()
        msgs = await sub.wait_for(lambda ms: any(kind(m) == "NDEATH" for m in ms), timeout=10)
        ndeath = next(m for m in msgs if kind(m) == "NDEATH")
        assert ndeath.topic == f"{BASE}/NDEATH/{NODE}"
        (t_nd,) = await tahu_decode([ndeath.payload])
        assert "seq" not in t_nd
        assert {n: m["value"] for n, m in by_name(t_nd).items()} == {"bdSeq": 0}
    log = (tmp_path / "gw.log").read_text()
    assert "Traceback" not in log
    assert '"sparkplug.machine_skipped"' not in log


def _settings(broker: MosquittoBroker, **kwargs: Any) -> SparkplugSettings:
    return SparkplugSettings(
        name="spb",
        broker=BrokerSettings(host=broker.host, port=broker.port, client_id="edge-1"),
        group_id="g",
        edge_node_id="e",
        **kwargs,
    )


async def _until(
    node: SparkplugNode,
    pred: Any,
    what: str,
    timeout: float = 5.0,  # noqa: ASYNC109 - a bound for the test, as Subscriber.wait_for
) -> None:
    """Wait for a condition of the node, woken by its ``changed`` event."""
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                node.changed.clear()
                await node.changed.wait()
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def test_publishing_holds_while_the_primary_host_is_offline_and_replays_history(
    mosquitto: MosquittoBroker,
) -> None:
    node = SparkplugNode(_settings(mosquitto, primary_host_id="scada"))
    state_topic = "spBv1.0/STATE/scada"
    t = 1_700_000_000.0

    def feed(i: int) -> None:
        node.observe("m1", [Sample("m1", "n", i, t + i)])

    async with (
        Subscriber(mosquitto.host, mosquitto.port, "spBv1.0/g/#") as sub,
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="scada") as host,
    ):

        async def host_state(online: bool, stamp: int) -> None:
            body = json.dumps({"online": online, "timestamp": stamp})
            await host.publish(state_topic, body, qos=1, retain=True)

        await host_state(False, 1)
        runner = asyncio.create_task(node.run())
        try:
            await _until(node, lambda: node.connected, "connected")
            for i in range(3):
                feed(i)
            assert node.health()["live"] is False and node.node.held == 3

            # The host comes online: births, then the held values as history, then live.
            await host_state(True, 2)
            msgs = await sub.wait_for(lambda ms: len(ms) >= 3)
            assert [kind(m) for m in msgs] == ["NBIRTH", "DBIRTH", "DDATA"]
            feed(3)
            msgs = await sub.wait_for(lambda ms: len(ms) >= 4)
            decoded = await tahu_decode([m.payload for m in msgs])
            nbirth, dbirth, history, live = decoded
            assert by_name(nbirth)["bdSeq"]["value"] == 0
            assert by_name(dbirth)["n"]["value"] == 2
            alias = by_name(dbirth)["n"]["alias"]
            assert [
                (m["alias"], m["value"], m.get("isHistorical")) for m in history["metrics"]
            ] == [(alias, i, True) for i in range(3)]
            assert [(m["value"], m.get("isHistorical", False)) for m in live["metrics"]] == [
                (3, False)
            ]
            assert [p["seq"] for p in decoded] == [0, 1, 2, 3]

            # Offline: an explicit NDEATH, a new session (bdSeq 1), changes held.
            await host_state(False, 3)
            msgs = await sub.wait_for(lambda ms: kind(ms[-1]) == "NDEATH")
            (ndeath,) = await tahu_decode([msgs[-1].payload])
            assert by_name(ndeath)["bdSeq"]["value"] == 0
            await _until(node, lambda: node.connected and node.node.bd_seq == 1, "reconnected")
            feed(4)
            feed(5)
            # A STATE older than the last one seen is ignored.
            await host_state(True, 2)
            await host_state(False, 3)
            assert node.node.held == 2 and not node.node.live
            count = len(sub.messages)

            await host_state(True, 4)
            msgs = await sub.wait_for(lambda ms: len(ms) >= count + 3)
            back = msgs[count:]
            assert [kind(m) for m in back] == ["NBIRTH", "DBIRTH", "DDATA"]
            nbirth, dbirth, history = await tahu_decode([m.payload for m in back])
            assert by_name(nbirth)["bdSeq"]["value"] == 1
            assert by_name(dbirth)["n"]["alias"] == alias
            assert [(m["value"], m["isHistorical"]) for m in history["metrics"]] == [
                (4, True),
                (5, True),
            ]
            # Nothing went out between the NDEATH and the new NBIRTH.
            kinds = [kind(m) for m in sub.messages]
            assert kinds[kinds.index("NDEATH") + 1] == "NBIRTH"
        finally:
            await node.close(timeout=2)
            async with asyncio.timeout(5):
                await runner
        msgs = await sub.wait_for(lambda ms: kind(ms[-1]) == "NDEATH")
        (last,) = await tahu_decode([msgs[-1].payload])
        assert by_name(last)["bdSeq"]["value"] == 1


async def test_a_bad_state_or_ncmd_payload_is_logged_and_changes_nothing(
    mosquitto: MosquittoBroker,
) -> None:
    node = SparkplugNode(_settings(mosquitto, primary_host_id="scada"))
    async with (
        Subscriber(mosquitto.host, mosquitto.port, "spBv1.0/g/#") as sub,
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="scada") as host,
    ):
        runner = asyncio.create_task(node.run())
        try:
            await _until(node, lambda: node.connected, "connected")
            for bad in (b"online", b'{"online": "yes"}', b"[]", b"\xff"):
                await host.publish("spBv1.0/STATE/scada", bad, qos=1)
            await host.publish("spBv1.0/g/NCMD/e", b"\x12\x05ab", qos=1)
            await host.publish(
                "spBv1.0/STATE/scada", json.dumps({"online": True, "timestamp": 1}), qos=1
            )
            msgs = await sub.wait_for(lambda ms: any(kind(m) == "NBIRTH" for m in ms))
            assert [kind(m) for m in msgs] == ["NCMD", "NBIRTH"]
            assert node.connected and node.node.live
        finally:
            await node.close(timeout=2)
            async with asyncio.timeout(5):
                await runner


async def test_changes_during_a_broker_outage_are_replayed_as_history(tmp_path: Path) -> None:
    # QoS 0 (all Sparkplug BIRTH and DATA) is queued for the watching session while it
    # reconnects, so the test sees what the node sent right after the restart.
    broker = MosquittoBroker(tmp_path / "broker", extra_config="queue_qos0_messages true")
    broker.start()
    node = SparkplugNode(_settings(broker))
    t = 1_700_000_000.0
    try:
        async with Subscriber(broker.host, broker.port, "spBv1.0/g/#", session="watch") as sub:
            runner = asyncio.create_task(node.run())
            try:
                await _until(node, lambda: node.connected, "connected")
                node.observe("m1", [Sample("m1", "n", 0, t)])
                await sub.wait_for(lambda ms: [kind(m) for m in ms] == ["NBIRTH", "DBIRTH"])

                broker.stop()
                await _until(node, lambda: not node.connected, "link lost")
                node.observe("m1", [Sample("m1", "n", 1, t + 1)])
                node.observe("m1", [Sample("m1", "n", 2, t + 2)])
                assert node.node.held == 2
                broker.start()

                def replayed(ms: list[Received]) -> bool:
                    return [kind(m) for m in ms if kind(m) != "NDEATH"][2:] == [
                        "NBIRTH",
                        "DBIRTH",
                        "DDATA",
                    ]

                msgs = await sub.wait_for(replayed, timeout=15)
                # The broker lets the old session die (its will) around its restart.
                deaths = [m.payload for m in msgs if kind(m) == "NDEATH"]
                for death in await tahu_decode(deaths):
                    assert by_name(death)["bdSeq"]["value"] == 0
                back = [m for m in msgs if kind(m) != "NDEATH"][2:]
                nbirth, dbirth, history = await tahu_decode([m.payload for m in back])
                assert by_name(nbirth)["bdSeq"]["value"] == 1
                assert by_name(dbirth)["n"]["value"] == 2
                assert [
                    (m["value"], m["timestamp"], m["isHistorical"]) for m in history["metrics"]
                ] == [(1, int((t + 1) * 1000), True), (2, int((t + 2) * 1000), True)]
                assert node.node.held == 0
            finally:
                await node.close(timeout=2)
                async with asyncio.timeout(5):
                    await runner
    finally:
        broker.stop()


async def test_bdseq_goes_on_counting_across_restarts(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    state = tmp_path / "sparkplug-spb.bdseq"
    births: list[int] = []
    async with Subscriber(mosquitto.host, mosquitto.port, "spBv1.0/g/#") as sub:
        for _ in range(3):
            node = SparkplugNode(_settings(mosquitto, state_file=state))
            runner = asyncio.create_task(node.run())
            seen = len(sub.messages)
            try:
                msgs = await sub.wait_for(lambda ms, n=seen: len(ms) > n)
            finally:
                await node.close(timeout=2)
                async with asyncio.timeout(5):
                    await runner
            (nbirth,) = await tahu_decode([msgs[seen].payload])
            births.append(by_name(nbirth)["bdSeq"]["value"])
        assert births == [0, 1, 2]
        assert state.read_text().strip() == "2"

        # A damaged file is reported and counting starts afresh.
        state.write_text("not a number\n")
        node = SparkplugNode(_settings(mosquitto, state_file=state))
        assert node.node.bd_seq == -1
        state.write_text("300\n")
        assert SparkplugNode(_settings(mosquitto, state_file=state)).node.bd_seq == -1


async def test_large_births_and_mqtt5_go_out_whole(mosquitto: MosquittoBroker) -> None:
    # The node writes its own QoS 0 PUBLISH packets: a remaining length of three bytes
    # (a DBIRTH of 2,000 metrics) and MQTT 5's property length must come out right.
    settings = _settings(mosquitto)
    node = SparkplugNode(
        SparkplugSettings(
            name="spb",
            broker=BrokerSettings(
                host=mosquitto.host, port=mosquitto.port, client_id="edge-5", protocol="5"
            ),
            group_id="g",
            edge_node_id=settings.edge_node_id,
        )
    )
    t = 1_700_000_000.0
    wide = [Sample("m1", f"tag_{i:04d}", i * 0.5, t) for i in range(2000)]
    async with Subscriber(mosquitto.host, mosquitto.port, "spBv1.0/g/#") as sub:
        runner = asyncio.create_task(node.run())
        try:
            await _until(node, lambda: node.connected, "connected")
            node.observe("m1", wide)
            node.observe("m1", [s._replace(value=-1 - s.value, source_time=t + 1) for s in wide])
            msgs = await sub.wait_for(lambda ms: len(ms) >= 3)
            assert [kind(m) for m in msgs] == ["NBIRTH", "DBIRTH", "DDATA"]
            assert len(msgs[1].payload) > 16384
            _, dbirth, ddata = await tahu_decode([m.payload for m in msgs])
            birth = by_name(dbirth)
            assert [birth[f"tag_{i:04d}"]["value"] for i in range(2000)] == [
                i * 0.5 for i in range(2000)
            ]
            value_of = {m["alias"]: m["value"] for m in ddata["metrics"]}
            assert [value_of[birth[f"tag_{i:04d}"]["alias"]] for i in range(2000)] == [
                -1 - i * 0.5 for i in range(2000)
            ]
            assert node.wire_bytes == sum(
                len(publish_packet(m.topic, m.payload, v5=True)) for m in msgs
            )
        finally:
            await node.close(timeout=2)
            async with asyncio.timeout(5):
                await runner


async def test_over_tls_every_message_goes_through(tmp_path: Path) -> None:
    # Over TLS the node leaves the writing to paho (no direct batched send).
    pki = _make_pki(tmp_path)
    broker = MosquittoBroker(
        tmp_path / "mosquitto",
        extra_config=(
            f"cafile {pki['ca']}.crt\ncertfile {pki['server']}.crt\n"
            f"keyfile {pki['server']}.key\nrequire_certificate true"
        ),
    )
    tls = TlsSettings(
        ca_file=pki["ca"] + ".crt",
        cert_file=pki["client"] + ".crt",
        key_file=pki["client"] + ".key",
    )
    t = 1_700_000_000.0
    with broker:
        node = SparkplugNode(
            SparkplugSettings(
                name="spb",
                broker=BrokerSettings(
                    host=broker.host, port=broker.port, client_id="edge-tls", tls=tls
                ),
                group_id="g",
                edge_node_id="e",
            )
        )
        async with aiomqtt.Client(
            broker.host, broker.port, identifier="watch", tls_context=tls_context(tls)
        ) as watch:
            await watch.subscribe("spBv1.0/g/#", qos=1)
            runner = asyncio.create_task(node.run())
            try:
                await _until(node, lambda: node.connected, "connected")
                for i in range(200):
                    node.observe("m1", [Sample("m1", "n", i, t + i)])
                got: list[bytes] = []
                async with asyncio.timeout(10):
                    async for message in watch.messages:
                        assert isinstance(message.payload, bytes)
                        got.append(message.payload)
                        if len(got) == 201:
                            break
                decoded = await tahu_decode(got)
                assert [p["seq"] for p in decoded] == [i % 256 for i in range(201)]
                assert [p["metrics"][0]["value"] for p in decoded[2:]] == list(range(1, 200))
            finally:
                await node.close(timeout=2)
                async with asyncio.timeout(5):
                    await runner
