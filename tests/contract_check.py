"""Validate received MQTT messages against the published JSON Schemas in docs/contract/.

The integration tests receive what a platform would; checking every message against the
committed schema files (not the models) proves the published contract holds on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

CONTRACT_DIR = Path(__file__).resolve().parents[1] / "docs" / "contract"


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((CONTRACT_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def schema_for(topic: str) -> str | None:
    """Which published schema a topic's payload follows."""
    parts = topic.split("/")
    if parts[-1] == "response":
        return "command-response"
    if parts[-1] == "state":
        return "state"
    if parts[-1] == "status":
        return "status"
    if parts[-1] == "telemetry":
        return "telemetry"
    if len(parts) >= 2 and parts[-2] == "event":
        return parts[-1]
    return None


def problems(topic: str, payload: bytes) -> list[str]:
    """Schema violations of one message (envelope and data for events)."""
    name = schema_for(topic)
    if name is None or not payload:
        return []
    doc: Any = json.loads(payload)
    out = []
    if name not in {"state", "status", "command-response", "telemetry"}:
        out += [f"envelope: {e.message}" for e in _validator("envelope").iter_errors(doc)]
        doc = doc.get("data")
    out += [f"{name}: {e.message}" for e in _validator(name).iter_errors(doc)]
    return [f"{topic}: {p}" for p in out]


def assert_valid(messages: Iterable[Any]) -> int:
    """Assert every message (with ``.topic``, ``.payload``) is schema-valid; returns the count."""
    errors: list[str] = []
    n = 0
    for m in messages:
        if schema_for(m.topic) is not None and m.payload:
            n += 1
            errors += problems(m.topic, m.payload)
    assert not errors, "\n".join(errors[:20])
    return n
