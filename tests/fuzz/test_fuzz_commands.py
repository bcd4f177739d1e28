"""Fuzz: downlink command payloads and topics, through the decoder and the listener's core."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.contract.models import COMMANDS, CommandError, decode_command
from gateway.core.model import Location
from gateway.core.tracker import AssignOrder, CancelOrder, CommandResult
from gateway.runtime.commands import Command, handle, reply_topic
from tests.fuzz import fuzz

PREFIX = "sf"
LOC = Location(site="s1", area="a1", line="l1", machine="m1")
MACHINES = {"m1": LOC}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def command_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Near-valid command objects: the right keys with wrong, odd or extreme values."""
    doc: dict[str, Any] = {}
    pool = {
        "order_id": st.text(max_size=200) | json_values,
        "target": st.integers(-5, 2**70) | json_values,
        "due": st.sampled_from(["2026-11-22T14:00:00Z", "2026-11-22T14:00:00", "yesterday", ""])
        | json_values,
        "customer": st.text(max_size=300),
        "command_id": st.text(max_size=100) | json_values,
        "extra": json_values,
    }
    for key, strategy in pool.items():
        if draw(st.booleans()):
            doc[key] = draw(strategy)
    return doc


payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    command_docs().map(lambda d: json.dumps(d).encode()),
)


class Recorder:
    """Stands in for the runtime: records commands, accepts every one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Command]] = []

    def apply_command(self, machine: str, command: Command, now: float) -> CommandResult:
        self.calls.append((machine, command))
        return CommandResult(True, "accepted")


@fuzz(150)
@given(st.sampled_from([*COMMANDS, "reboot", ""]), payloads)
@example("assign-order", b'{"order_id": "PO-1", "target": 1e400}')
@example("assign-order", b'{"order_id": "PO-1", "target": 5, "due": "0001-01-01T00:00:00Z"}')
@example("assign-order", b"\xff\xfe")
def test_decode_command_accepts_or_raises_command_error(name: str, payload: bytes) -> None:
    try:
        command = decode_command(name, payload)
    except CommandError as exc:
        assert len(str(exc)) <= 600
        return
    assert isinstance(command, AssignOrder | CancelOrder)
    assert command.order_id
    if isinstance(command, AssignOrder):
        assert command.target >= 1


topic_parts = st.sampled_from(["sf", "s1", "a1", "l1", "m1", "cmd", "assign-order", "x", ""])
# A broker never delivers a PUBLISH whose topic has a wildcard or NUL (MQTT 5, 4.7.3).
topics = st.one_of(
    st.lists(topic_parts, min_size=1, max_size=9).map("/".join),
    st.text(max_size=80),
    st.builds(lambda c: f"sf/s1/a1/l1/m1/cmd/{c}", st.text(max_size=20)),
).filter(lambda t: not any(c in t for c in "+#\x00"))
response_topics = (
    st.none()
    | st.text(max_size=80)
    | st.sampled_from(
        ["sf/s1/a1/l1/m1/state", "sf/s1/a1/l1/m1/event/order.started", "x/y", "sf/x/response"]
    )
)


@fuzz(300)
@given(topics, payloads, st.booleans(), response_topics, st.none() | st.binary(max_size=16))
def test_the_listener_core_never_raises_and_never_answers_into_the_event_tree(
    topic: str, payload: bytes, retained: bool, response: str | None, correlation: bytes | None
) -> None:
    target = Recorder()
    with capture_logs():
        reply = handle(
            prefix=PREFIX,
            machines=MACHINES,
            target=target,
            topic=topic,
            payload=payload,
            retained=retained,
            response_topic=response,
            correlation_data=correlation,
            now=1_800_000_000.0,
        )
    if reply is None:
        assert not target.calls
        return
    assert not any(c in reply.topic for c in "+#\x00")
    if reply.topic.startswith(PREFIX + "/"):
        assert reply.topic.endswith("/response")
    body = json.loads(reply.payload)
    assert isinstance(body, dict)
    if retained:
        assert not target.calls, "a retained command never runs"
    assert len(target.calls) <= 1


@fuzz(200)
@given(st.text(max_size=600))
def test_reply_topic_is_safe(requested: str) -> None:
    topic = reply_topic(PREFIX, "sf/s1/a1/l1/m1/cmd/assign-order", requested)
    assert not any(c in topic for c in "+#\x00") and len(topic) <= 512
