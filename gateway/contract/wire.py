"""Operations on the wire form of events: redacting, marking and batching encoded CloudEvents.

The typed rules live in :mod:`gateway.core.routing`; these apply them to the bytes a
destination receives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.core.routing import OperatorPolicy, redact

#: MQTT content type of a CloudEvents batch (JSON array of structured events).
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


def redact_payload(payload: bytes, policy: OperatorPolicy, secret: bytes | None) -> bytes:
    """Redact a JSON payload; untouched (same bytes) when it cannot name an operator."""
    # '"operator' finds both keys, "operator" and "operators".
    if policy == "pass" or b'"operator' not in payload:
        return payload
    try:
        doc = json.loads(payload)
    except ValueError:
        return payload  # not JSON we made; nothing to redact
    return _dumps(redact(doc, policy, secret))


def mark_delayed(payload: bytes) -> bytes:
    """Add ``"delayed":true`` to a structured CloudEvent (a compact JSON object)."""
    if not payload.endswith(b"}") or b'"delayed":' in payload:
        return payload
    return payload[:-1] + b',"delayed":true}'


def batch_payload(payloads: Sequence[bytes]) -> bytes:
    """A CloudEvents JSON batch: the structured events as one JSON array."""
    return b"[" + b",".join(payloads) + b"]"


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
