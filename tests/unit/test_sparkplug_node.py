"""Sparkplug B edge node without I/O: codec, seq and bdSeq, aliases, births, held data, config."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest

from gateway.config.loader import ConfigError, load_config
from gateway.core.model import Quality, Sample
from gateway.core.routing import pseudonym
from gateway.delivery.sparkplug import codec
from gateway.delivery.sparkplug.codec import DataType
from gateway.delivery.sparkplug.node import ORDER_METRICS, EdgeNode

T0 = 1_700_000_000.0


def live_node(**kwargs: object) -> EdgeNode:
    node = EdgeNode("plant", "gw-1", **kwargs)  # type: ignore[arg-type]
    node.new_session(T0)
    node.go_live(T0)
    return node


def drain(node: EdgeNode) -> list[tuple[str, codec.Payload]]:
    out = [(m.topic, codec.decode(m.payload)) for m in node.outgoing]
    node.outgoing.clear()
    return out


def values(p: codec.Payload) -> dict[int | str | None, object]:
    return {m.alias if m.name is None else m.name: m.value for m in p.metrics}


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (DataType.INT64, 0),
        (DataType.INT64, -1),
        (DataType.INT64, 2**63 - 1),
        (DataType.INT64, -(2**63)),
        (DataType.INT32, -5),
        (DataType.UINT32, 2**32 - 1),
        (DataType.DOUBLE, -1.25e300),
        (DataType.FLOAT, 1.5),
        (DataType.BOOLEAN, True),
        (DataType.BOOLEAN, False),
        (DataType.STRING, "Ünïcode ✓"),
        (DataType.DATETIME, 1_700_000_000_123),
        (DataType.STRING, None),
    ],
)
def test_every_value_survives_encode_and_decode(datatype: DataType, value: object) -> None:
    raw = codec.payload(
        5, 7, [codec.metric(name="m", alias=300, timestamp=9, datatype=datatype, value=value)]
    )
    p = codec.decode(raw)
    assert (p.timestamp, p.seq) == (5, 7)
    (m,) = p.metrics
    assert (m.name, m.alias, m.timestamp, m.datatype) == ("m", 300, 9, datatype)
    assert m.value == value
    assert m.is_null is (value is None)


def test_the_decoder_refuses_truncated_bytes_and_skips_unknown_fields() -> None:
    raw = codec.payload(1, 2, [codec.metric(name="x", datatype=DataType.INT64, value=3)])
    for cut in range(1, len(raw)):
        # A cut either ends on a field boundary or is refused: never another exception.
        with contextlib.suppress(codec.DecodeError):
            codec.decode(raw[:cut])
    with pytest.raises(codec.DecodeError):
        codec.decode(b"\x12\x05ab")
    # A body (field 5) and a fixed32 extension field (6) are skipped.
    extra = raw + b"\x2a\x02hi" + b"\x35" + struct.pack("<f", 1.0)
    assert codec.decode(extra).metrics[0].value == 3


def test_births_carry_bdseq_rebirth_and_every_metric_with_alias_and_datatype() -> None:
    node = live_node()
    node.observe("m1", [Sample("m1", "good_count", 5, T0 + 1), Sample("m1", "temp", 21.5, T0)])
    (nbirth_topic, nbirth), (dbirth_topic, dbirth) = drain(node)
    assert nbirth_topic == "spBv1.0/plant/NBIRTH/gw-1"
    assert nbirth.seq == 0
    assert values(nbirth) == {"bdSeq": 0, "Node Control/Rebirth": False}
    assert dbirth_topic == "spBv1.0/plant/DBIRTH/gw-1/m1"
    assert dbirth.seq == 1
    got = {m.name: (m.datatype, m.value) for m in dbirth.metrics}
    assert got == {
        **{name: (dt, None) for name, dt in ORDER_METRICS.items()},
        "good_count": (DataType.INT64, 5),
        "temp": (DataType.DOUBLE, 21.5),
    }
    aliases = [m.alias for m in dbirth.metrics]
    assert len(set(aliases)) == len(aliases) and None not in aliases


def test_data_carries_changes_only_by_alias_and_seq_wraps_after_255() -> None:
    node = live_node()
    node.observe("m1", [Sample("m1", "n", 0, T0), Sample("m1", "fixed", "a", T0)])
    birth = drain(node)[1][1]
    alias = {m.name: m.alias for m in birth.metrics}
    seqs = []
    for i in range(1, 300):
        node.observe("m1", [Sample("m1", "n", i, T0 + i), Sample("m1", "fixed", "a", T0 + i)])
        ((topic, p),) = drain(node)
        assert topic == "spBv1.0/plant/DDATA/gw-1/m1"
        assert [(m.name, m.alias, m.value, m.timestamp) for m in p.metrics] == [
            (None, alias["n"], i, int((T0 + i) * 1000))
        ]
        assert p.seq is not None
        seqs.append(p.seq)
    assert seqs[:3] == [2, 3, 4]
    assert seqs[253:256] == [255, 0, 1]


def test_bdseq_counts_sessions_and_the_ndeath_carries_it() -> None:
    node = EdgeNode("plant", "gw-1")
    bds = []
    for _ in range(258):
        will = codec.decode(node.new_session(T0))
        assert will.seq is None
        (m,) = will.metrics
        assert m.name == "bdSeq" and m.value == node.bd_seq
        bds.append(node.bd_seq)
    assert bds[:2] == [0, 1] and bds[255:] == [255, 0, 1]


def test_a_type_change_rebirths_the_device_with_the_new_datatype() -> None:
    node = live_node()
    node.observe("m1", [Sample("m1", "speed", 3, T0)])
    drain(node)
    node.observe("m1", [Sample("m1", "speed", 3.5, T0 + 1)])
    ((topic, p),) = drain(node)
    assert "/DBIRTH/" in topic
    speed = next(m for m in p.metrics if m.name == "speed")
    assert (speed.datatype, speed.value) == (DataType.DOUBLE, 3.5)
    # An int into the Double metric needs no rebirth.
    node.observe("m1", [Sample("m1", "speed", 4, T0 + 2)])
    ((topic, p),) = drain(node)
    assert "/DDATA/" in topic and p.metrics[0].value == 4.0


def test_bad_quality_is_null_and_a_lost_device_dies_and_is_born_again() -> None:
    node = live_node()
    node.observe("m1", [Sample("m1", "t", 1.0, T0)])
    drain(node)
    node.observe("m1", [Sample("m1", "t", None, T0 + 1, Quality.BAD)])
    ((_, p),) = drain(node)
    assert p.metrics[0].is_null
    node.device_lost("m1", T0 + 2)
    ((topic, p),) = drain(node)
    assert topic == "spBv1.0/plant/DDEATH/gw-1/m1" and p.metrics == ()
    node.order_state("m1", {"state": "offline", "order": None, "updated_at": T0 + 2})
    assert drain(node) == []
    node.observe("m1", [Sample("m1", "t", 2.0, T0 + 3)])
    ((topic, p),) = drain(node)
    assert "/DBIRTH/" in topic
    assert values(p)["Machine/State"] == "offline" and values(p)["t"] == 2.0


def test_changes_while_not_live_replay_as_historical_after_the_births() -> None:
    node = live_node()
    node.observe("m1", [Sample("m1", "n", 0, T0)])
    drain(node)
    node.go_offline()
    for i in range(1, 4):
        node.observe("m1", [Sample("m1", "n", i, T0 + i)])
    assert not node.outgoing and node.held == 3
    node.new_session(T0 + 10)
    node.go_live(T0 + 10)
    out = drain(node)
    assert [t.split("/")[2] for t, _ in out] == ["NBIRTH", "DBIRTH", "DDATA"]
    assert [p.seq for _, p in out] == [0, 1, 2]
    assert values(out[0][1])["bdSeq"] == 1
    birth = {m.name: m for m in out[1][1].metrics}
    assert birth["n"].value == 3 and not birth["n"].is_historical
    replay = out[2][1].metrics
    assert [(m.alias, m.value, m.is_historical) for m in replay] == [
        (birth["n"].alias, i, True) for i in range(1, 4)
    ]
    assert [m.timestamp for m in replay] == [int((T0 + i) * 1000) for i in range(1, 4)]
    assert node.held == 0


def test_held_changes_are_bounded_oldest_first() -> None:
    node = live_node(max_held=5)
    node.observe("m1", [Sample("m1", "n", 0, T0)])
    node.go_offline()
    for i in range(1, 9):
        node.observe("m1", [Sample("m1", "n", i, T0 + i)])
    assert (node.held, node.held_dropped) == (5, 3)
    node.go_live(T0 + 10)
    replay = drain(node)[-1][1]
    assert [m.value for m in replay.metrics] == [4, 5, 6, 7, 8]


def test_rebirth_restarts_seq_and_repeats_every_birth_with_the_same_aliases() -> None:
    node = live_node()
    node.observe("a", [Sample("a", "x", 1, T0)])
    node.observe("b", [Sample("b", "x", 2, T0)])
    first = drain(node)
    node.observe("a", [Sample("a", "x", 5, T0 + 1)])
    drain(node)
    node.rebirth(T0 + 2)
    again = drain(node)
    assert [t for t, _ in again] == [t for t, _ in first]
    assert [p.seq for _, p in again] == [0, 1, 2]
    assert values(again[0][1])["bdSeq"] == 0
    alias = {(t, m.name): m.alias for t, p in first for m in p.metrics}
    assert {(t, m.name): m.alias for t, p in again for m in p.metrics} == alias
    assert values(again[1][1])["x"] == 5


def test_order_status_becomes_metrics() -> None:
    node = live_node()
    node.observe("m1", [Sample("m1", "good_count", 1, T0)])
    drain(node)
    snapshot = {
        "state": "running",
        "order": {
            "order_id": "A-1",
            "status": "running",
            "good": 40,
            "scrap": 2,
            "target": 100,
            "eta": T0 + 3600.5,
        },
        "updated_at": T0 + 5,
    }
    node.order_state("m1", snapshot)
    ((_, p),) = drain(node)
    by_alias = {m.alias: m for m in p.metrics}
    birth_alias = {name: i + 1 for i, name in enumerate(ORDER_METRICS)}
    got = {name: by_alias[a].value for name, a in birth_alias.items()}
    assert got == {
        "Machine/State": "running",
        "Order/Id": "A-1",
        "Order/Status": "running",
        "Order/Good": 40,
        "Order/Scrap": 2,
        "Order/Target": 100,
        "Order/ETA": int((T0 + 3600.5) * 1000),
    }
    node.order_state("m1", snapshot)
    assert drain(node) == []


@pytest.mark.parametrize(
    ("policy", "secret", "expected"),
    [("drop", None, None), ("pass", None, "badge-7"), ("pseudonymise", b"k", "PSEUDO")],
)
def test_the_operator_policy_applies_to_the_badge(
    policy: str, secret: bytes | None, expected: str | None
) -> None:
    node = live_node(operator=policy, secret=secret)
    node.observe("m1", [Sample("m1", "operator", "badge-7", T0), Sample("m1", "n", 1, T0)])
    birth = {m.name: m.value for m in drain(node)[1][1].metrics}
    if expected is None:
        assert "operator" not in birth
    else:
        want = pseudonym(b"k", "badge-7") if expected == "PSEUDO" else expected
        assert birth["operator"] == want


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#b"])
def test_ids_with_mqtt_wildcards_or_slashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"\+ # /"):
        EdgeNode(bad, "gw")
    node = live_node()
    with pytest.raises(ValueError, match="machine id"):
        node.observe(bad, [Sample(bad, "n", 1, T0)])


# ---------------------------------------------------------------------------- config

HEAD = "gateway: {id: gw-1, site: plant-1}\n"
MACHINES = (
    "machines:\n"
    "  - {id: a, area: x, line: y, profile: sewing-station,"
    " connection: {protocol: modbus, host: 127.0.0.1}}\n"
)


def _load(tmp_path: Path, spb: str) -> object:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        HEAD
        + "destinations:\n"
        + "  - {name: cloud, host: 127.0.0.1}\n"
        + f"  - {{name: spb, host: 127.0.0.1, format: sparkplug{spb}}}\n"
        + MACHINES
    )
    return load_config(cfg, env={})


def test_a_sparkplug_destination_compiles_with_defaults_from_the_gateway(tmp_path: Path) -> None:
    plan = _load(tmp_path, "")
    assert [d.name for d in plan.destinations] == ["cloud"]  # type: ignore[attr-defined]
    (spb,) = plan.sparkplug  # type: ignore[attr-defined]
    assert spb.sparkplug.group_id == "plant-1"
    assert spb.sparkplug.edge_node_id == "gw-1"
    assert spb.sparkplug.primary_host_id is None
    assert spb.commands is False
    plan = _load(tmp_path, ", group_id: Plant A, edge_node_id: e1, primary_host_id: scada")
    (spb,) = plan.sparkplug  # type: ignore[attr-defined]
    assert (spb.sparkplug.group_id, spb.sparkplug.primary_host_id) == ("Plant A", "scada")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (", group_id: 'a/b'", "not a valid Sparkplug id"),
        (", edge_node_id: 'e+'", "not a valid Sparkplug id"),
        (", primary_host_id: 'h#'", "not a valid Sparkplug id"),
        (", batch: true", "batch: not available with format: sparkplug"),
        (", routing: {event_types: [order.started]}", "routing.event_types: not available"),
        (", format: kafka", "sparkplug"),
    ],
)
def test_bad_sparkplug_settings_say_what_to_fix(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, extra)
    assert any(message in str(e) for e in info.value.errors), info.value.errors


def test_sparkplug_keys_on_a_cloudevents_destination_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(HEAD + "destinations:\n  - {name: c, host: 127.0.0.1, group_id: g}\n" + MACHINES)
    with pytest.raises(ConfigError, match="group_id: only with format: sparkplug"):
        load_config(cfg, env={})


def test_sparkplug_alone_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        HEAD + "destinations:\n  - {name: s, host: 127.0.0.1, format: sparkplug}\n" + MACHINES
    )
    with pytest.raises(ConfigError, match="need a CloudEvents destination"):
        load_config(cfg, env={})


def test_feeding_the_node_never_raises_into_the_poll() -> None:
    from gateway.delivery.mqtt.publisher import BrokerSettings
    from gateway.delivery.sparkplug.client import SparkplugNode, SparkplugSettings

    node = SparkplugNode(
        SparkplugSettings("spb", BrokerSettings(host="127.0.0.1"), group_id="g", edge_node_id="e")
    )
    for _ in range(3):
        node.observe("a/b", [Sample("a/b", "n", 1, T0)])
        node.order_state("a/b", {"state": "running"})
    node.device_lost("never-seen")
    assert node.feed_errors == 6
    assert node.health()["feed_errors"] == 6


def test_a_sparkplug_destination_gets_the_same_security_warnings(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        HEAD
        + "destinations:\n"
        + "  - {name: cloud, host: 127.0.0.1}\n"
        + "  - {name: spb, host: scada.plant.example, allow_insecure: true, format: sparkplug}\n"
        + MACHINES
    )
    plan = load_config(cfg, env={})
    assert any(w.startswith("destination spb: broker scada") for w in plan.warnings)
    assert "destination spb: anonymous MQTT to scada.plant.example" in plan.warnings
    cfg.write_text(cfg.read_text().replace("allow_insecure: true", "allow_insecure: false"))
    with pytest.raises(ConfigError, match="on another machine"):
        load_config(cfg, env={})


def test_routing_machines_decides_which_machines_become_devices(tmp_path: Path) -> None:
    from gateway.delivery.sparkplug import SparkplugNodes

    plan = _load(tmp_path, ", routing: {machines: ['sew-*']}")
    nodes = SparkplugNodes.from_plan(plan, None)  # type: ignore[arg-type]
    ((_, node),) = nodes.nodes
    node.node.new_session(T0)
    node.node.go_live(T0)
    node.node.outgoing.clear()
    for machine in ("sew-1", "cnc-1"):
        nodes.samples(machine, [Sample(machine, "n", 1, T0)])
        nodes.state(machine, {"state": "running"})
    nodes.connected("sew-1", False)
    nodes.connected("cnc-1", False)
    topics = [m.topic.split("/", 3)[2:] for m in node.node.outgoing]
    assert topics == [
        ["DBIRTH", "gw-1/sew-1"],
        ["DDATA", "gw-1/sew-1"],
        ["DDEATH", "gw-1/sew-1"],
    ]
    assert nodes.health()["spb"]["feed_errors"] == 0
    # bdSeq is kept beside the outbox.
    assert node.settings.state_file == plan.outbox.path.parent / "sparkplug-spb.bdseq"  # type: ignore[attr-defined]
