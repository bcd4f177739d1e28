"""The published MQTT contract: committed files, real payloads against schemas, AsyncAPI shape."""

from __future__ import annotations

import argparse
import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.contract import envelope, schema
from gateway.contract import models as contract
from gateway.contract.envelope import encode_event, encode_state, encode_status, new_event_id
from gateway.contract.models import (
    EVENT_TYPES,
    CommandError,
    decode_command,
    encode_response,
    error_response,
    parse_event,
)
from gateway.core.model import Event, Location, Quality, Sample
from gateway.core.tracker import (
    AssignOrder,
    CancelOrder,
    CommandResult,
    MachineTracker,
    TrackerSettings,
)

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_DIR = ROOT / "docs" / "contract"
CONTRACT_DOC = ROOT / "docs" / "contract.md"
REGENERATE = "shopfloor schema --out docs/contract --docs docs/contract.md"

LOC = Location(site="plant1", area="assembly", line="l1", machine="cnc-3")
GW = "gw-test"
T0 = 1_795_327_200.0  # 2026-11-22T06:00:00Z


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    return schema.json_schemas()


@pytest.fixture(scope="module")
def validators(schemas: dict[str, dict[str, Any]]) -> dict[str, jsonschema.Draft202012Validator]:
    return {name: jsonschema.Draft202012Validator(s) for name, s in schemas.items()}


@pytest.fixture(scope="module")
def asyncapi_doc() -> dict[str, Any]:
    return schema.asyncapi()


def errors(validator: jsonschema.Draft202012Validator, doc: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


# ------------------------------------------------------------------------------ drift


def test_committed_contract_files_match_the_models() -> None:
    generated = schema.generated_files()
    committed = {p.name: p.read_text(encoding="utf-8") for p in CONTRACT_DIR.glob("*.json")}
    assert sorted(committed) == sorted(generated), (
        f"docs/contract/ has other files than the generator makes; run: {REGENERATE}"
    )
    stale = [name for name, text in generated.items() if committed[name] != text]
    assert not stale, f"docs/contract/ is out of date ({', '.join(stale)}); run: {REGENERATE}"


def test_examples_in_the_contract_doc_are_the_real_ones() -> None:
    text = CONTRACT_DOC.read_text(encoding="utf-8")
    assert schema.render_docs(text) == text, f"examples in docs/contract.md are stale: {REGENERATE}"
    shown = set(re.findall(r"<!-- example: ([A-Za-z0-9_.-]+) -->", text))
    assert set(EVENT_TYPES) <= shown, "every event type needs an example in docs/contract.md"
    assert {"state", "status", "assign-order", "cancel-order", "assign-order-response"} <= shown


def test_render_docs_names_an_unknown_example() -> None:
    with pytest.raises(ValueError, match="unknown example 'nope'"):
        schema.render_docs("<!-- example: nope -->\n```json\n{}\n```\n")


# ------------------------------------------------------------------------------ schemas


def test_schemas_are_valid_2020_12_with_urn_ids(schemas: dict[str, dict[str, Any]]) -> None:
    assert list(schemas) == list(schema.SCHEMAS)
    for name, s in schemas.items():
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert s["$id"] == f"urn:shopfloor:schema:v1:{name}"
    # The URNs the envelope module writes on the wire are the ones published here.
    for short in EVENT_TYPES:
        assert schemas[short]["$id"] == envelope.SCHEMA_PREFIX + short
    assert schemas["state"]["$id"] == envelope.STATE_SCHEMA
    assert schemas["status"]["$id"] == envelope.STATUS_SCHEMA
    assert schemas["state"]["properties"]["schema"]["const"] == envelope.STATE_SCHEMA
    assert schemas["status"]["properties"]["schema"]["const"] == envelope.STATUS_SCHEMA


def test_outbound_schemas_forbid_unknown_fields(validators: dict[str, Any]) -> None:
    data = {
        "order_id": "A",
        "source": "device",
        "target": None,
        "due": None,
        "good": 0,
        "scrap": 0,
        "started_at": "2026-11-22T06:00:00.000Z",
        "gap_free": True,
        "unobserved_s": 0.0,
        "gap_started_at": None,
        "gap_ended_at": None,
    }
    assert errors(validators["order.started"], data) == []
    # A customer name must never reach an event: the schema would catch the drift.
    assert errors(validators["order.started"], {**data, "customer": "ACME"})
    missing = dict(data)
    del missing["target"]
    assert errors(validators["order.started"], missing)
    assert errors(validators["order.started"], {**data, "started_at": "2026-11-22 06:00"})


# ------------------------------------------------------------------------------ real payloads


def _s(t: float, **signals: Any) -> list[Sample]:
    return [Sample(LOC.machine, k, v, T0 + t, Quality.GOOD) for k, v in signals.items()]


class Recorder:
    """Drives trackers and keeps every event and snapshot, encoded as on the wire."""

    def __init__(self) -> None:
        self.events: list[tuple[Event, bytes]] = []
        self.states: list[bytes] = []
        self.responses: list[bytes] = []
        self._rng = random.Random(7)

    def take(self, tracker: MachineTracker, events: list[Event], t: float) -> None:
        for ev in events:
            event_id = new_event_id(ev.time, self._rng.getrandbits(74))
            self.events.append((ev, encode_event(ev, LOC, gateway_id=GW, event_id=event_id)))
        self.states.append(encode_state(tracker.snapshot(), LOC, gateway_id=GW, now=T0 + t))

    def observe(self, tracker: MachineTracker, t: float, **signals: Any) -> None:
        self.take(tracker, tracker.observe(_s(t, **signals), T0 + t), t)

    def connection(self, tracker: MachineTracker, t: float, up: bool, reason: str) -> None:
        self.take(tracker, tracker.connection(up, T0 + t, reason), t)

    def tick(self, tracker: MachineTracker, t: float) -> None:
        self.take(tracker, tracker.tick(T0 + t), t)

    def command(
        self, tracker: MachineTracker, t: float, cmd: AssignOrder | CancelOrder
    ) -> CommandResult:
        result, events = tracker.command(cmd, T0 + t)
        self.take(tracker, events, t)
        name = "assign-order" if isinstance(cmd, AssignOrder) else "cancel-order"
        self.responses.append(
            encode_response(
                result,
                command=name,
                machine=LOC.machine,
                command_id=cmd.command_id or None,
                order_id=cmd.order_id,
                now=T0 + t,
            )
        )
        return result


def _device_orders(r: Recorder) -> None:
    """Device orders: resets, wraps, alarms, offline, overrun, order changes and clears."""
    tr = MachineTracker(LOC.machine, TrackerSettings(counter_wrap=65536, progress_interval=60))
    r.take(tr, [], 0)  # snapshot of a tracker that knows nothing yet
    r.observe(tr, 0, state="setup", order_id="A-1", target_count=50, good_count=65530)
    r.observe(tr, 10, state="running", good_count=65535, scrap_count=1)
    r.observe(tr, 70, good_count=20)  # wrapped
    r.observe(tr, 80, alarm_code=4, alarm_text="Oil low")  # warning, still running
    r.observe(tr, 90, alarm_code=9, alarm_text="Spindle", state="fault")  # clear + raise
    r.observe(tr, 95, alarm_text="Spindle overload")  # better text, snapshot only
    r.observe(tr, 200, alarm_code=0, state="running", good_count=25)
    r.connection(tr, 230, False, "connection refused")
    r.connection(tr, 260, True, "reconnected")
    r.observe(tr, 270, state="running", good_count=3)  # the operator reset the counter
    r.observe(tr, 400, good_count=40)  # target reached
    r.observe(tr, 410, good_count=44)  # overrun
    r.observe(tr, 420, order_id="A-2", target_count=0, good_count=0)  # no target
    r.observe(tr, 500, good_count=7, scrap_count=2)
    r.tick(tr, 600)
    r.observe(tr, 610, order_id="A-3", good_count=0)  # order_changed
    r.observe(tr, 620, order_id="", state="idle")  # order_cleared
    r.observe(tr, 630, state="maintenance")
    r.observe(tr, 640, state="stopped")


def _platform_orders(r: Recorder) -> None:
    """Platform orders: queue, at risk with and without an eta, back on track, cancel."""
    tr = MachineTracker(
        LOC.machine, TrackerSettings(order_source="platform", progress_step_percent=10)
    )
    r.observe(tr, 0, state="idle", good_count=100)
    assert r.command(tr, 5, AssignOrder("P-1", 100, due=T0 + 60, command_id="c1")).accepted
    r.command(tr, 6, AssignOrder("P-2", 100, due=T0 + 1500, customer="ACME", command_id="c2"))
    r.command(tr, 7, AssignOrder("P-1", 5, command_id="c3"))  # refused: already running
    r.command(tr, 8, AssignOrder("P-2", 30, command_id="c2"))  # duplicate command id
    r.tick(tr, 90)  # due passed without a rate: at risk, eta null
    r.observe(tr, 100, state="running", good_count=110)
    r.command(tr, 120, CancelOrder("P-1", command_id="c4"))  # cancelled, P-2 starts
    r.command(tr, 121, CancelOrder("nope"))
    for i in range(1, 11):
        r.observe(tr, 121 + 30 * i, good_count=110 + i)  # slow: P-2 at risk with an eta
    for i in range(1, 16):
        r.observe(tr, 421 + 30 * i, good_count=120 + 6 * i)  # fast: back on track, done


def _mixed_orders(r: Recorder) -> None:
    """Device orders over platform ones, lifetime counters, no completion on target."""
    tr = MachineTracker(
        LOC.machine,
        TrackerSettings(
            order_source="device_then_platform",
            counter_mode="lifetime",
            scrap_source="total_minus_good",
            complete_on_target=False,
        ),
    )
    r.observe(tr, 0, state="running", order_id="", good_count=1000, total_count=1000)
    r.command(tr, 1, AssignOrder("Q-1", 5, command_id="q1"))
    r.observe(tr, 60, good_count=1004, total_count=1005)
    r.observe(tr, 120, order_id="D-9", good_count=1010, total_count=1012)  # replaced
    r.observe(tr, 200, good_count=1040, total_count=1050)
    r.command(tr, 210, AssignOrder("Q-2", 5, command_id="q2"))
    r.observe(tr, 300, order_id="", good_count=1041)  # cleared: Q-2 starts
    r.observe(tr, 400, good_count=1060, total_count=1070)  # percent above 100


@pytest.fixture(scope="module")
def recorded() -> Recorder:
    r = Recorder()
    _device_orders(r)
    _platform_orders(r)
    _mixed_orders(r)
    return r


def test_the_scenario_covers_the_whole_contract(recorded: Recorder) -> None:
    seen = {ev.type for ev, _ in recorded.events}
    assert seen == set(EVENT_TYPES)
    data = [(ev.type, ev.data) for ev, _ in recorded.events]
    reasons = {d["reason"] for t, d in data if t == "order.completed"}
    assert reasons == {"target_reached", "order_changed", "order_cleared", "cancelled", "replaced"}
    assert {d["reason"] for t, d in data if t == "machine.state.changed"} == {
        "device",
        "alarm",
        "offline",
    }
    assert {d["severity"] for t, d in data if t == "machine.alarm.raised"} == {"fault", "warning"}
    assert any(t == "order.at_risk" and d["eta"] is None for t, d in data)
    assert any(t == "order.at_risk" and d["eta"] is not None for t, d in data)
    assert any(t == "order.progress" and (d["percent"] or 0) > 100 for t, d in data)
    assert any(t == "order.started" and d["target"] is None for t, d in data)
    assert {json.loads(p)["accepted"] for p in recorded.responses} == {True, False}


def test_every_real_event_validates(recorded: Recorder, validators: dict[str, Any]) -> None:
    for ev, payload in recorded.events:
        doc = json.loads(payload)
        assert errors(validators["envelope"], doc) == [], doc
        assert errors(validators[ev.type], doc["data"]) == [], doc
        env, data = parse_event(payload)  # the pydantic models agree with the schemas
        assert env.sequence == ev.sequence
        assert type(data) is EVENT_TYPES[ev.type]


def test_every_real_snapshot_validates(recorded: Recorder, validators: dict[str, Any]) -> None:
    shapes = set()
    for payload in recorded.states:
        doc = json.loads(payload)
        assert errors(validators["state"], doc) == [], doc
        contract.MachineSnapshot.model_validate_json(payload)
        order = doc["order"]
        shapes.add((doc["state"] is None, order and order["status"], doc["alarm"] is None))
    # Nothing known yet, running and completed orders, with and without an alarm.
    assert (True, None, True) in shapes
    assert {s[1] for s in shapes} >= {None, "running", "completed"}
    assert {s[2] for s in shapes} == {True, False}


def test_every_command_response_validates(recorded: Recorder, validators: dict[str, Any]) -> None:
    for payload in recorded.responses:
        assert errors(validators["command-response"], json.loads(payload)) == []
        contract.CommandResponse.model_validate_json(payload)


@pytest.mark.parametrize(
    ("status", "reason"),
    [("online", None), ("offline", "shutdown"), ("offline", "connection lost")],
)
def test_gateway_status_validates(status: Any, reason: str | None, validators: Any) -> None:
    payload = encode_status(
        status, gateway_id=GW, version="0.1.0", started_at=T0, now=T0 + 5, reason=reason
    )
    assert errors(validators["status"], json.loads(payload)) == []
    contract.GatewayStatus.model_validate_json(payload)


def test_examples_validate(validators: dict[str, Any]) -> None:
    for name, doc in schema.example_messages().items():
        if name in EVENT_TYPES:
            assert errors(validators["envelope"], doc) == []
            assert errors(validators[name], doc["data"]) == []
        else:
            target = (
                "command-response"
                if name.endswith("-response")
                else "status"
                if name.startswith("status")
                else name
            )
            assert errors(validators[target], doc) == [], name


def test_parse_event_checks_consistency() -> None:
    ev = Event(
        LOC.machine,
        "machine.alarm.cleared",
        T0,
        3,
        {"code": 1, "text": "", "duration_s": 1, "unobserved_s": 0.0},
    )
    doc = json.loads(encode_event(ev, LOC, gateway_id=GW, event_id=new_event_id(T0, 1)))
    _env, data = parse_event(json.dumps(doc).encode())
    assert data == contract.MachineAlarmCleared(code=1, text="", duration_s=1.0, unobserved_s=0.0)
    with pytest.raises(ValueError, match="does not match type"):
        parse_event(json.dumps({**doc, "dataschema": "urn:shopfloor:schema:v1:order.started"}))
    with pytest.raises(ValueError, match="duration_s"):
        parse_event(json.dumps({**doc, "data": {"code": 1, "text": ""}}).encode())
    future = {**doc, "type": "io.shopfloor.machine.energy", "dataschema": envelope.SCHEMA_PREFIX}
    future["dataschema"] += "machine.energy"
    assert parse_event(json.dumps(future).encode())[1] is None  # unknown types pass


# ------------------------------------------------------------------------------ commands


def test_assign_order_decodes_to_the_tracker_command() -> None:
    payload = b'{"order_id":"PO-1","target":20,"due":"2026-11-22T08:00:00+01:00","command_id":"x"}'
    assert decode_command("assign-order", payload) == AssignOrder(
        "PO-1", 20, due=T0 + 3600, customer=None, command_id="x"
    )
    assert decode_command("assign-order", b'{"order_id":"PO-1","target":1}') == AssignOrder(
        "PO-1", 1
    )
    assert decode_command("cancel-order", b'{"order_id":"PO-1"}') == CancelOrder("PO-1")


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("assign-order", b"\xff", "not UTF-8"),
        ("assign-order", b"{", "not JSON"),
        ("assign-order", b"[1]", "must be a JSON object"),
        ("assign-order", b'{"order_id":"A"}', "target: Field required"),
        ("assign-order", b'{"order_id":"A","target":"5"}', "target: Input should be a valid int"),
        ("assign-order", b'{"order_id":"A","target":true}', "target"),
        ("assign-order", b'{"order_id":"A","target":0}', "target: Input should be greater"),
        ("assign-order", b'{"order_id":"A","target":10000001}', "target"),
        ("assign-order", b'{"order_id":"A\\u0007","target":1}', "order_id: String should match"),
        ("assign-order", b'{"order_id":"","target":1}', "order_id"),
        ("assign-order", b'{"order_id":"A","target":1,"due":"2026-11-22T08:00:00"}', "due"),
        ("assign-order", b'{"order_id":"A","target":1,"due":1795334400}', "due"),
        ("assign-order", b'{"order_id":"A","target":1,"priority":1}', "priority: Extra inputs"),
        ("cancel-order", b'{"command_id":"k"}', "order_id: Field required"),
        ("cancel-order", b'{"order_id":"A"}' + b" " * 20_000, "exceeds"),
        ("reboot", b"{}", "unknown command 'reboot'"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(name: str, payload: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        decode_command(name, payload)


def test_refusal_reasons_stay_short() -> None:
    junk = json.dumps({f"field_{i}": i for i in range(300)}).encode()
    with pytest.raises(CommandError) as info:
        decode_command("cancel-order", junk)
    assert len(str(info.value)) <= 500
    assert str(info.value).startswith("order_id: Field required")


def test_refused_command_answer_carries_what_could_be_read(validators: dict[str, Any]) -> None:
    with pytest.raises(CommandError) as info:
        decode_command("assign-order", b'{"order_id":"A-9","target":-1,"command_id":"c-77"}')
    answer = json.loads(
        error_response(info.value, command="assign-order", machine=LOC.machine, now=T0)
    )
    assert errors(validators["command-response"], answer) == []
    assert answer["accepted"] is False
    assert (answer["command_id"], answer["order_id"]) == ("c-77", "A-9")
    assert answer["reason"].startswith("target: Input should be greater than or equal to 1")
    assert contract.response_topic("a/b/cmd/assign-order") == "a/b/cmd/assign-order/response"


# ------------------------------------------------------------------------------ AsyncAPI


def _walk(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def test_asyncapi_top_level(asyncapi_doc: dict[str, Any]) -> None:
    doc = asyncapi_doc
    assert doc["asyncapi"] == "3.0.0"
    assert {"title", "version"} <= set(doc["info"])
    assert {"servers", "channels", "operations", "components"} <= set(doc)
    for server in doc["servers"].values():
        assert {"host", "protocol"} <= set(server)
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert set(EVENT_TYPES) | {"state", "status", "assign-order", "cancel-order"} <= names
    assert doc["components"]["parameters"]["type"]["enum"] == list(EVENT_TYPES)


def test_asyncapi_every_ref_resolves(asyncapi_doc: dict[str, Any]) -> None:
    refs = [n["$ref"] for _, n in _walk(asyncapi_doc) if isinstance(n, dict) and "$ref" in n]
    assert len(refs) > 50
    for ref in refs:
        _resolve(asyncapi_doc, ref)
    for message in asyncapi_doc["components"]["messages"].values():
        target = _resolve(asyncapi_doc, message["payload"]["$ref"])
        assert isinstance(target, dict) and target


def test_asyncapi_channels_and_operations_fit(asyncapi_doc: dict[str, Any]) -> None:
    doc = asyncapi_doc
    for name, channel in doc["channels"].items():
        placeholders = set(re.findall(r"{([^}]+)}", channel["address"]))
        assert placeholders == set(channel.get("parameters", {})), name
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        for m in op["messages"]:
            assert m["$ref"].startswith(channel_ref + "/messages/"), name
        if "reply" in op:
            reply_ref = op["reply"]["channel"]["$ref"]
            for m in op["reply"]["messages"]:
                assert m["$ref"].startswith(reply_ref + "/messages/"), name
        qos = op["bindings"]["mqtt"]["qos"]
        # Telemetry is a value stream: QoS 0 by default (telemetry.qos in the config).
        assert qos == (0 if name == "publishTelemetry" else 1), name
    retained = {n for n, op in doc["operations"].items() if op["bindings"]["mqtt"]["retain"]}
    assert retained == {"publishState", "publishStatus"}


def test_asyncapi_examples_match_their_payload_schema(asyncapi_doc: dict[str, Any]) -> None:
    components = asyncapi_doc["components"]
    for key, message in components["messages"].items():
        root = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": {"schemas": components["schemas"]},
            "$ref": message["payload"]["$ref"],
        }
        validator = jsonschema.Draft202012Validator(root)
        assert message["examples"], key
        for example in message["examples"]:
            assert errors(validator, example["payload"]) == [], key


# ------------------------------------------------------------------------------ command line


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    schema.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_prints_and_writes(tmp_path: Path) -> None:
    out = io.StringIO()
    assert schema.run(_args("--format", "asyncapi"), out) == 0
    assert json.loads(out.getvalue())["asyncapi"] == "3.0.0"
    out = io.StringIO()
    assert schema.run(_args("--format", "jsonschema"), out) == 0
    assert set(json.loads(out.getvalue())) == set(schema.SCHEMAS)

    doc = tmp_path / "contract.md"
    doc.write_text("x\n<!-- example: status -->\n```json\n{}\n```\n", encoding="utf-8")
    out = io.StringIO()
    assert schema.run(_args("--out", str(tmp_path / "c"), "--docs", str(doc)), out) == 0
    assert "examples updated" in out.getvalue()
    written = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "c").iterdir()}
    assert written == schema.generated_files()
    assert '"status": "online"' in doc.read_text(encoding="utf-8")


def test_cli_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    assert schema.run(_args("--out", str(blocker / "sub")), io.StringIO()) == 1
    assert "shopfloor schema:" in capsys.readouterr().err
