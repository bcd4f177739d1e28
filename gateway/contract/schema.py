"""Published contract files: JSON Schemas, the AsyncAPI document and real examples.

Everything here is generated from :mod:`gateway.contract.models` (the models) and, for the
examples, from a scripted shift run through the real :class:`~gateway.core.tracker.MachineTracker`
and :mod:`gateway.contract.envelope`: no payload is written by hand. ``shopfloor schema --out
docs/contract`` writes the files that ship in the repository; a unit test fails when they
differ from what this module generates now.

Pure apart from :func:`write`, :func:`update_docs` and :func:`run`, which do the file and
terminal I/O of the command.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.contract import models as contract
from gateway.contract.envelope import (
    EVENT_QOS,
    EVENT_TYPE_PREFIX,
    STATE_QOS,
    STATUS_QOS,
    TELEMETRY_QOS,
    Topics,
    encode_event,
    encode_state,
    encode_status,
    new_event_id,
)
from gateway.contract.models import (
    COMMANDS,
    EVENT_TYPES,
    PAYLOADS,
    decode_command,
    encode_response,
    schema_id,
)
from gateway.contract.telemetry import TelemetryMessage, encode_telemetry
from gateway.contract.wire import redact_payload
from gateway.core.model import Event, Location, Quality, Sample
from gateway.core.tracker import MachineTracker, TrackerSettings

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_VERSION = "3.0.0"
#: Version of the MQTT bindings objects used in the AsyncAPI document.
MQTT_BINDING_VERSION = "0.2.0"
#: ``info.version`` of the AsyncAPI document: major = contract version, minor = additions.
#: Minor 1: order.completed ``rule`` and ``device_ended``; gap fields on order events.
#: Minor 2: the telemetry payload.
API_VERSION = f"{contract.CONTRACT_VERSION}.2.0"
ASYNCAPI_FILE = "asyncapi.json"
EXAMPLES_FILE = "examples.json"

# Where the example shift happens: illustrative names, fixed so the files are stable.
EXAMPLE_TOPICS = Topics(prefix="shopfloor", site="plant1", gateway_id="gw-01")
#: The examples' sequence space (``epoch``): when the example gateway's outbox began, in ms.
EXAMPLE_EPOCH = 1_795_852_800_000
EXAMPLE_LOCATION = Location(site="plant1", area="sewing", line="line-2", machine="sew-07")
EXAMPLE_VERSION = "0.1.0"
_T0 = datetime(2026, 11, 22, 6, 0, tzinfo=UTC).timestamp()

#: Every payload with a published schema: the contract models plus the telemetry message
#: (its own module, :mod:`gateway.contract.telemetry`).
SCHEMAS: dict[str, type[Any]] = {**PAYLOADS, "telemetry": TelemetryMessage}

_DOC_EXAMPLE = re.compile(
    r"(<!-- example: (?P<name>[A-Za-z0-9_.-]+) -->\n```json\n)(?P<body>.*?)(\n```)", re.DOTALL
)


# ------------------------------------------------------------------------------ JSON Schema


def _tidy(node: Any) -> Any:
    """Drop per-property titles (noise next to the key) and RST double backticks."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {
                    name: _tidy({k: v for k, v in sub.items() if k != "title"})
                    for name, sub in value.items()
                }
            elif key == "description" and isinstance(value, str):
                out[key] = value.replace("``", "`")
            else:
                out[key] = _tidy(value)
        return out
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    return node


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema 2020-12 per payload, keyed by name; ``$id`` is its URN."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in SCHEMAS.items():
        body = _tidy(model.model_json_schema(by_alias=True, mode="validation"))
        out[name] = {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id(name), **body}
    return out


# ------------------------------------------------------------------------------ examples


def _sample(signal: str, value: Any, t: float) -> Sample:
    return Sample(EXAMPLE_LOCATION.machine, signal, value, t, Quality.GOOD)


def _shift() -> tuple[list[Event], list[tuple[str, dict[str, Any], bytes]], dict[str, Any], float]:
    """Run one scripted shift; return events, command exchanges and a mid-order snapshot."""
    machine = EXAMPLE_LOCATION.machine
    tracker = MachineTracker(
        machine,
        TrackerSettings(
            order_source="device_then_platform", counter_wrap=65536, progress_interval=300.0
        ),
    )
    events: list[Event] = []
    exchanges: list[tuple[str, dict[str, Any], bytes]] = []
    snapshot: dict[str, Any] = {}
    snapshot_time = _T0

    def command(name: str, doc: dict[str, Any], t: float) -> None:
        cmd = decode_command(name, json.dumps(doc).encode())
        result, evs = tracker.command(cmd, t)
        events.extend(evs)
        answer = encode_response(
            result,
            command=name,
            machine=machine,
            command_id=doc.get("command_id"),
            order_id=doc.get("order_id"),
            now=t,
        )
        exchanges.append((name, doc, answer))

    good = 65_500  # a 16-bit lifetime counter close to its wrap
    t = _T0
    events += tracker.observe(
        [
            _sample("state", "idle", t),
            _sample("good_count", good, t),
            _sample("alarm_code", 0, t),
            _sample("operator", "B-1042", t),
        ],
        t,
    )
    t += 240
    due = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    command(
        "assign-order",
        {
            "order_id": "PO-4711",
            "target": 120,
            "due": due.isoformat().replace("+00:00", "Z"),
            "customer": "ACME GmbH",
            "command_id": "c-0001",
        },
        t,
    )
    # One piece a minute: too slow for the due time, the order becomes at risk.
    for minute in range(1, 16):
        t = _T0 + 240 + 60 * minute
        good = (good + 1) % 65536
        batch = [_sample("good_count", good, t)]
        if minute == 1:
            batch.append(_sample("state", "running", t))
        if minute == 10:
            batch.append(_sample("operator", "B-2077", t))  # a shift change mid-order
        events += tracker.observe(batch, t)
    # A thread break: alarm and fault in one poll, cleared five minutes later.
    t += 30
    events += tracker.observe(
        [
            _sample("alarm_text", "Thread break", t),
            _sample("alarm_code", 17, t),
            _sample("state", "fault", t),
        ],
        t,
    )
    t += 300
    events += tracker.observe([_sample("alarm_code", 0, t), _sample("state", "running", t)], t)
    # Three pieces a minute: back on track.
    for _ in range(12):
        t += 60
        good = (good + 3) % 65536
        events += tracker.observe([_sample("good_count", good, t)], t)
        if not snapshot and events[-1].type == "order.back_on_track":
            snapshot, snapshot_time = tracker.snapshot(), t
    # The network to the machine drops; pieces made meanwhile show up as a counter jump.
    t += 20
    events += tracker.connection(False, t, "timed out after 2.0 s")
    t += 180
    good = (good + 9) % 65536
    events += tracker.observe([_sample("good_count", good, t), _sample("state", "running", t)], t)
    t += 30
    # The next order waits in the queue and starts when this one reaches its target.
    command("assign-order", {"order_id": "PO-4712", "target": 40, "command_id": "c-0002"}, t)
    while not any(e.type == "order.completed" for e in events):
        t += 60
        good = (good + 3) % 65536
        events += tracker.observe([_sample("good_count", good, t)], t)
    t += 90
    command("cancel-order", {"order_id": "PO-4712", "command_id": "c-0003"}, t)
    return events, exchanges, snapshot, snapshot_time


def _null_count(data: Mapping[str, Any]) -> int:
    return sum(v is None for v in data.values())


# Which event of a type shows it best in the docs; otherwise the first with fewest nulls.
_PREFERRED: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "machine.connection.changed": lambda d: d["connected"] is False,
    "machine.state.changed": lambda d: d["reason"] == "alarm",
    "order.completed": lambda d: d["reason"] == "target_reached",
    "order.progress": lambda d: (d["percent"] or 0) >= 40,
}


#: The examples show badges as a destination with ``operator: pseudonymise`` sees them.
_EXAMPLE_SECRET = b"example-site-secret"


def example_messages() -> dict[str, dict[str, Any]]:
    """Real example payloads, keyed like :func:`json_schemas` (events as full envelopes)."""
    events, exchanges, snapshot, snapshot_time = _shift()
    rng = random.Random(2026)
    gw = EXAMPLE_TOPICS.gateway_id
    encoded: list[tuple[Event, dict[str, Any]]] = []
    for event in events:
        event_id = new_event_id(event.time, rng.getrandbits(74))
        payload = encode_event(
            event, EXAMPLE_LOCATION, gateway_id=gw, event_id=event_id, epoch=EXAMPLE_EPOCH
        )
        payload = redact_payload(payload, "pseudonymise", _EXAMPLE_SECRET)
        encoded.append((event, json.loads(payload)))
    out: dict[str, dict[str, Any]] = {}
    for short in EVENT_TYPES:
        candidates = [doc for ev, doc in encoded if ev.type == short]
        if not candidates:
            raise RuntimeError(f"the example shift emits no {short} event")
        prefer = _PREFERRED.get(short)
        chosen = [d for d in candidates if prefer(d["data"])] if prefer else []
        out[short] = (chosen or sorted(candidates, key=lambda d: _null_count(d["data"])))[0]
    state = encode_state(snapshot, EXAMPLE_LOCATION, gateway_id=gw, now=snapshot_time)
    out["state"] = json.loads(redact_payload(state, "pseudonymise", _EXAMPLE_SECRET))
    started = _T0 - 3600
    out["status"] = json.loads(
        encode_status(
            "online", gateway_id=gw, version=EXAMPLE_VERSION, started_at=started, now=started
        )
    )
    out["status-heartbeat"] = json.loads(
        encode_status(
            "online",
            gateway_id=gw,
            version=EXAMPLE_VERSION,
            started_at=started,
            now=_T0,
            extra={"uptime_s": 3600.0, "devices_online": 5, "devices_total": 6, "backlog": 0},
        )
    )
    out["status-offline"] = json.loads(
        encode_status(
            "offline",
            gateway_id=gw,
            version=EXAMPLE_VERSION,
            started_at=started,
            now=started,
            reason="connection lost",
        )
    )
    out["telemetry"] = _telemetry_example()
    for name in COMMANDS:
        name_, doc, answer = next(x for x in exchanges if x[0] == name)
        out[name_] = doc
        out[f"{name_}-response"] = json.loads(answer)
    return out


def _telemetry_example() -> dict[str, Any]:
    """One poll of a sewing station on change: the values that moved, a bad read, the badge
    as the pseudonymise policy sends it."""
    t = _T0 + 1800.25
    samples = [
        Sample(EXAMPLE_LOCATION.machine, "good_count", 412, t),
        Sample(EXAMPLE_LOCATION.machine, "stitch_rate", 2875.5, t),
        Sample(EXAMPLE_LOCATION.machine, "cycle_time", None, t, Quality.BAD),
        Sample(EXAMPLE_LOCATION.machine, "operator", "op-5b0d8c51f0a4e2c1", t),
    ]
    payload = encode_telemetry(
        EXAMPLE_LOCATION, samples, gateway_id=EXAMPLE_TOPICS.gateway_id, now=t + 0.012
    )
    assert payload is not None
    doc: dict[str, Any] = json.loads(payload)
    return doc


# ------------------------------------------------------------------------------ AsyncAPI


def _camel(name: str) -> str:
    parts = re.split(r"[._-]", name)
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _hoist(schemas: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Schemas as AsyncAPI components: ``$defs`` lifted, refs rewritten, no ``$id``."""
    out: dict[str, Any] = {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    v.replace("#/$defs/", "#/components/schemas/")
                    if k == "$ref" and isinstance(v, str)
                    else rewrite(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, schema in schemas.items():
        body = {k: v for k, v in schema.items() if k not in ("$schema", "$id", "$defs")}
        for def_name, definition in schema.get("$defs", {}).items():
            lifted = rewrite(definition)
            if out.setdefault(def_name, lifted) != lifted:
                raise ValueError(f"two different schemas named {def_name!r}")
        if name in out:
            raise ValueError(f"schema name {name!r} clashes with a shared definition")
        out[name] = rewrite(body)
    return out


def _parameters() -> dict[str, Any]:
    ident = "1-64 letters, digits, `-`, `_` or `.`, starting with a letter or digit."
    return {
        "prefix": {
            "description": "Topic prefix of the gateway (`topic_prefix` in its config), may "
            "contain `/`.",
            "default": "shopfloor",
            "examples": ["shopfloor", "acme/shopfloor"],
        },
        "site": {"description": f"ISA-95 site. {ident}", "examples": ["plant1"]},
        "area": {"description": f"ISA-95 area. {ident}", "examples": ["sewing"]},
        "line": {"description": f"ISA-95 line (work centre). {ident}", "examples": ["line-2"]},
        "machine": {"description": f"Machine id. {ident}", "examples": ["sew-07"]},
        "gateway_id": {"description": f"Gateway id. {ident}", "examples": ["gw-01"]},
        "type": {
            "description": "Short event type: the CloudEvents `type` without `io.shopfloor.`.",
            "enum": list(EVENT_TYPES),
        },
    }


def _params(*names: str) -> dict[str, Any]:
    return {n: {"$ref": f"#/components/parameters/{n}"} for n in names}


def _qos(qos: int, retain: bool) -> dict[str, Any]:
    return {"mqtt": {"qos": qos, "retain": retain, "bindingVersion": MQTT_BINDING_VERSION}}


def _example(name: str, payload: dict[str, Any], summary: str) -> dict[str, Any]:
    return {"name": name, "summary": summary, "payload": payload}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the gateway's MQTT interface, as a JSON-ready dict."""
    schemas = json_schemas()
    components = _hoist(schemas)
    examples = example_messages()
    machine_root = "{prefix}/{site}/{area}/{line}/{machine}"
    loc_params = ("prefix", "site", "area", "line", "machine")

    messages: dict[str, Any] = {}
    event_keys: list[str] = []
    for short, model in EVENT_TYPES.items():
        envelope_name = f"{short}.event"
        components[envelope_name] = {
            "description": f"CloudEvents envelope carrying `{short}` data.",
            "allOf": [{"$ref": "#/components/schemas/envelope"}],
            "properties": {
                "type": {"const": EVENT_TYPE_PREFIX + short},
                "dataschema": {"const": schema_id(short)},
                "data": {"$ref": f"#/components/schemas/{short}"},
            },
        }
        key = _camel(short)
        event_keys.append(key)
        messages[key] = {
            "name": short,
            "title": short,
            "summary": (model.__doc__ or "").split(": ", 1)[-1].strip(),
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{envelope_name}"},
            "examples": [_example(short, examples[short], "From a scripted shift.")],
        }
    messages["machineState"] = {
        "name": "state",
        "title": "Machine state snapshot",
        "summary": "Retained current state of a machine, for late joiners.",
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/state"},
        "examples": [_example("state", examples["state"], "Mid-order, after catching up.")],
    }
    messages["machineTelemetry"] = {
        "name": "telemetry",
        "title": "Machine telemetry",
        "summary": "The values of one poll that are due, each with quality and source time.",
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/telemetry"},
        "examples": [_example("telemetry", examples["telemetry"], "On change, one poll.")],
    }
    messages["gatewayStatus"] = {
        "name": "status",
        "title": "Gateway status",
        "summary": "Retained online/offline status of a gateway; the offline one is its will.",
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/status"},
        "examples": [
            _example("online", examples["status"], "Published on every connect."),
            _example("last-will", examples["status-offline"], "Sent by the broker."),
        ],
    }
    command_binding = {
        "mqtt": {
            "responseTopic": {
                "type": "string",
                "description": "MQTT 5 only: where to send the answer (else `.../response`).",
            },
            "correlationData": {
                "type": "string",
                "description": "MQTT 5 only: opaque bytes, copied into the answer.",
            },
            "bindingVersion": MQTT_BINDING_VERSION,
        }
    }
    for name in COMMANDS:
        key = _camel(name)
        messages[key] = {
            "name": name,
            "title": name,
            "summary": (PAYLOADS[name].__doc__ or "").split(": ", 1)[-1].strip(),
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "bindings": command_binding,
            "examples": [_example(name, examples[name], "Sent by a platform.")],
        }
        messages[f"{key}Response"] = {
            "name": f"{name}-response",
            "title": f"{name} response",
            "summary": "The gateway's answer: accepted or not, and why.",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/command-response"},
            "examples": [
                _example(f"{name}-response", examples[f"{name}-response"], "Real answer.")
            ],
        }

    def refs(keys: list[str]) -> dict[str, Any]:
        return {k: {"$ref": f"#/components/messages/{k}"} for k in keys}

    channels: dict[str, Any] = {
        "machineEvents": {
            "address": f"{machine_root}/event/{{type}}",
            "title": "Machine events",
            "description": "CloudEvents JSON, QoS 1, not retained. At least once: deduplicate "
            "by `id`, detect gaps with the per-machine `sequence`.",
            "parameters": _params(*loc_params, "type"),
            "messages": refs(event_keys),
        },
        "machineState": {
            "address": f"{machine_root}/state",
            "title": "Machine state",
            "description": "Retained snapshot, QoS 1, replaced after every batch of events. "
            "An empty retained message means the machine was removed from the gateway.",
            "parameters": _params(*loc_params),
            "messages": refs(["machineState"]),
        },
        "machineTelemetry": {
            "address": f"{machine_root}/telemetry",
            "title": "Machine telemetry",
            "description": "Tag values: one message per machine and poll with the values "
            "due by the publish rules (every poll, on change, deadband, min/max interval). "
            "QoS 0 and not retained unless configured (`telemetry.qos`, `telemetry.retain`); "
            "only to destinations whose routing admits `telemetry`. Under pressure the oldest "
            "telemetry is dropped first: it is a value stream, not a record.",
            "parameters": _params(*loc_params),
            "messages": refs(["machineTelemetry"]),
        },
        "gatewayStatus": {
            "address": "{prefix}/{site}/gateway/{gateway_id}/status",
            "title": "Gateway status",
            "description": "Retained, QoS 1. `online` on every connect; `offline` with reason "
            "`shutdown` on a clean stop, or the last will (`connection lost`) from the broker.",
            "parameters": _params("prefix", "site", "gateway_id"),
            "messages": refs(["gatewayStatus"]),
        },
    }
    operations: dict[str, Any] = {
        "publishEvents": {
            "action": "send",
            "channel": {"$ref": "#/channels/machineEvents"},
            "title": "Publish machine and order events",
            "bindings": _qos(EVENT_QOS, False),
            "messages": [{"$ref": f"#/channels/machineEvents/messages/{k}"} for k in event_keys],
        },
        "publishState": {
            "action": "send",
            "channel": {"$ref": "#/channels/machineState"},
            "title": "Publish the retained state snapshot",
            "bindings": _qos(STATE_QOS, True),
            "messages": [{"$ref": "#/channels/machineState/messages/machineState"}],
        },
        "publishTelemetry": {
            "action": "send",
            "channel": {"$ref": "#/channels/machineTelemetry"},
            "title": "Publish tag telemetry",
            "bindings": _qos(TELEMETRY_QOS, False),
            "messages": [{"$ref": "#/channels/machineTelemetry/messages/machineTelemetry"}],
        },
        "publishStatus": {
            "action": "send",
            "channel": {"$ref": "#/channels/gatewayStatus"},
            "title": "Publish the retained gateway status (and register it as last will)",
            "bindings": _qos(STATUS_QOS, True),
            "messages": [{"$ref": "#/channels/gatewayStatus/messages/gatewayStatus"}],
        },
    }
    for name in COMMANDS:
        key = _camel(name)
        channels[key] = {
            "address": f"{machine_root}/cmd/{name}",
            "title": f"{name} command",
            "description": "Downlink from a platform, QoS 1, never retained.",
            "parameters": _params(*loc_params),
            "messages": refs([key]),
        }
        channels[f"{key}Response"] = {
            "address": f"{machine_root}/cmd/{name}/response",
            "title": f"{name} response",
            "description": "Default answer topic, used when the command carried no MQTT 5 "
            "response topic. QoS 1, not retained.",
            "parameters": _params(*loc_params),
            "messages": refs([f"{key}Response"]),
        }
        operations[f"receive{key[:1].upper()}{key[1:]}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "title": f"Receive {name}",
            "description": "The gateway answers every command once (again for a redelivery): "
            "on the MQTT 5 response topic with the correlation data when the command has "
            "them, else on the channel below.",
            "bindings": _qos(1, False),
            "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
            "reply": {
                "channel": {"$ref": f"#/channels/{key}Response"},
                "messages": [{"$ref": f"#/channels/{key}Response/messages/{key}Response"}],
            },
        }

    status_topic = "{prefix}/{site}/gateway/{gateway_id}/status"
    server_binding = {
        "mqtt": {
            # The gateway keeps its backlog itself, not in a broker session.
            "cleanSession": True,
            "keepAlive": 30,
            "lastWill": {"topic": status_topic, "qos": STATUS_QOS, "retain": True},
            "bindingVersion": MQTT_BINDING_VERSION,
        }
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:shopfloor:asyncapi:v1",
        "info": {
            "title": "Shopfloor Gateway MQTT contract",
            "version": API_VERSION,
            "description": "Order-status events, machine state and downlink order commands of "
            "a Shopfloor Gateway, over MQTT 3.1.1 or 5. Read docs/contract.md for the "
            "delivery guarantees and the versioning policy. Consumers must ignore unknown "
            "fields and event types: v1 may add them.",
            "license": {
                "name": "Apache-2.0",
                "url": "https://www.apache.org/licenses/LICENSE-2.0",
            },
        },
        "servers": {
            "tls": {
                "host": "broker.example.com:8883",
                "protocol": "secure-mqtt",
                "protocolVersion": "3.1.1",
                "description": "Placeholder: the factory's broker, MQTT over TLS.",
                "bindings": server_binding,
            },
            "plain": {
                "host": "broker.example.com:1883",
                "protocol": "mqtt",
                "protocolVersion": "3.1.1",
                "description": "Placeholder: plain TCP, for a broker inside the factory network.",
                "bindings": server_binding,
            },
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": components,
            "messages": messages,
            "parameters": _parameters(),
        },
    }


# ------------------------------------------------------------------------------ files


def dumps(doc: Any) -> str:
    """Stable text of a JSON document: 2-space indent, keys as generated, final newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def generated_files() -> dict[str, str]:
    """Every file of ``docs/contract/``: name to text."""
    files = {f"{name}.json": dumps(schema) for name, schema in json_schemas().items()}
    files[ASYNCAPI_FILE] = dumps(asyncapi())
    files[EXAMPLES_FILE] = dumps(example_messages())
    return files


def write(directory: str | Path, fmt: str = "all") -> list[Path]:
    """Write the contract files (``fmt``: all, jsonschema, asyncapi) into ``directory``."""
    files = generated_files()
    if fmt == "jsonschema":
        files = {n: t for n, t in files.items() if n not in (ASYNCAPI_FILE, EXAMPLES_FILE)}
    elif fmt == "asyncapi":
        files = {ASYNCAPI_FILE: files[ASYNCAPI_FILE]}
    elif fmt != "all":
        raise ValueError(f"unknown format {fmt!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def render_docs(markdown: str) -> str:
    """``markdown`` with every ``<!-- example: NAME -->`` JSON block set to the real example."""
    examples = example_messages()

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in examples:
            raise ValueError(f"unknown example {name!r}; known: {', '.join(examples)}")
        return match[1] + json.dumps(examples[name], indent=2, ensure_ascii=False) + match[4]

    return _DOC_EXAMPLE.sub(fill, markdown)


def update_docs(path: str | Path) -> bool:
    """Refresh the example blocks of a Markdown file in place; True when it changed."""
    p = Path(path)
    old = p.read_text(encoding="utf-8")
    new = render_docs(old)
    if new != old:
        p.write_text(new, encoding="utf-8")
    return new != old


# ------------------------------------------------------------------------------ command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shopfloor schema``."""
    parser.add_argument(
        "--format",
        choices=["all", "jsonschema", "asyncapi"],
        default="all",
        help="what to generate (default: all)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write files into DIR instead of printing to stdout"
    )
    parser.add_argument(
        "--docs",
        metavar="FILE",
        help="also refresh the example blocks of a Markdown file (docs/contract.md)",
    )


def run(args: argparse.Namespace, stdout: Any = None) -> int:
    """``shopfloor schema``: print or write the contract files; 0 on success, 1 on error."""
    stream = stdout or sys.stdout
    try:
        if args.out:
            written = write(args.out, args.format)
            stream.write(f"wrote {len(written)} file(s) to {args.out}\n")
        else:
            doc: Any
            if args.format == "jsonschema":
                doc = json_schemas()
            elif args.format == "asyncapi":
                doc = asyncapi()
            else:
                doc = {"asyncapi": asyncapi(), "schemas": json_schemas()}
            stream.write(dumps(doc))
        if args.docs:
            changed = update_docs(args.docs)
            stream.write(f"{args.docs}: {'examples updated' if changed else 'up to date'}\n")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"shopfloor schema: {exc}\n")
        return 1
    return 0


def _main() -> None:  # pragma: no cover - convenience until the CLI wiring lands
    parser = argparse.ArgumentParser(prog="python -m gateway.contract.schema")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":  # pragma: no cover
    _main()


__all__ = [
    "add_arguments",
    "asyncapi",
    "example_messages",
    "generated_files",
    "json_schemas",
    "render_docs",
    "run",
    "update_docs",
    "write",
]
