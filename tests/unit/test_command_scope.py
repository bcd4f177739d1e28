"""The command downlink's pure parts: scoping by destination, reply topics, the rate limit."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
import structlog

from gateway.core.model import Location
from gateway.core.routing import RouteRules
from gateway.core.tracker import (
    RECENT_COMMANDS,
    AssignOrder,
    CancelOrder,
    CommandResult,
    MachineTracker,
    TrackerSettings,
)
from gateway.runtime.commands import LISTENER_BACKOFF, TokenBucket, handle, reply_topic, scope

LOC = Location("plant-1", "sewing", "line-1", "sew-01")
MACHINES = {"sew-01": LOC, "sew-02": Location("plant-1", "sewing", "line-1", "sew-02")}
TOPIC = "sf/plant-1/sewing/line-1/sew-01/cmd/assign-order"


@dataclass
class FakeRuntime:
    """Stands in for the runtime: records commands, knows which order is whose."""

    customers: dict[str, str] = field(default_factory=dict)
    applied: list[AssignOrder | CancelOrder] = field(default_factory=list)

    def apply_command(
        self, machine: str, command: AssignOrder | CancelOrder, now: float
    ) -> CommandResult:
        self.applied.append(command)
        return CommandResult(True, "started")

    def customer_of(self, machine: str, order_id: str) -> str | None:
        return self.customers.get(order_id)


ACME_ONLY = RouteRules(customers=("acme",))


def test_unscoped_destination_passes_commands_unchanged() -> None:
    cmd = AssignOrder("SO-1", 5, customer="zeta")
    assert scope(RouteRules(), "sew-01", cmd, FakeRuntime()) == (cmd, "")


def test_single_customer_destination_fills_in_its_customer() -> None:
    out, _ = scope(ACME_ONLY, "sew-01", AssignOrder("SO-1", 5), FakeRuntime())
    assert isinstance(out, AssignOrder) and out.customer == "acme"


def test_a_platform_cannot_assign_for_another_customer() -> None:
    out, why = scope(ACME_ONLY, "sew-01", AssignOrder("SO-1", 5, customer="zeta"), FakeRuntime())
    assert out is None and "zeta" in why


def test_order_id_patterns_scope_too() -> None:
    rules = RouteRules(order_ids=("ACME-*",))
    ok, _ = scope(rules, "sew-01", AssignOrder("ACME-7", 5), FakeRuntime())
    assert ok is not None
    out, why = scope(rules, "sew-01", AssignOrder("ZETA-7", 5), FakeRuntime())
    assert out is None and "customer" in why


def test_cancel_of_another_platforms_order_looks_like_an_unknown_order() -> None:
    runtime = FakeRuntime(customers={"SO-9": "zeta", "SO-1": "acme"})
    out, why = scope(ACME_ONLY, "sew-01", CancelOrder("SO-9"), runtime)
    assert out is None and why == "unknown order 'SO-9'"
    ok, _ = scope(ACME_ONLY, "sew-01", CancelOrder("SO-1"), runtime)
    assert ok is not None


def _handle(rules: RouteRules, topic: str, body: dict[str, object], runtime: FakeRuntime) -> dict:
    reply = handle(
        prefix="sf",
        machines=MACHINES,
        target=runtime,
        rules=rules,
        topic=topic,
        payload=json.dumps(body).encode(),
        retained=False,
        response_topic=None,
        correlation_data=None,
        now=1.0,
    )
    assert reply is not None
    assert reply.topic == topic + "/response"
    return dict(json.loads(reply.payload))


def test_handle_hides_machines_the_destination_may_not_see() -> None:
    runtime = FakeRuntime()
    rules = RouteRules(machines=("sew-02",))
    answer = _handle(rules, TOPIC, {"order_id": "SO-1", "target": 5}, runtime)
    assert answer["accepted"] is False and "unknown machine" in answer["reason"]
    assert runtime.applied == []


def test_handle_runs_a_scoped_command_with_the_customer_filled_in() -> None:
    runtime = FakeRuntime()
    answer = _handle(
        ACME_ONLY, TOPIC, {"command_id": "c", "order_id": "SO-1", "target": 5}, runtime
    )
    assert answer["accepted"] is True
    assert runtime.applied == [
        AssignOrder("SO-1", 5, customer="acme", command_id="c", private=True)
    ]


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (None, TOPIC + "/response"),
        (TOPIC + "/response", TOPIC + "/response"),
        (TOPIC + "/response/platform-7", TOPIC + "/response/platform-7"),
        # Anywhere else, inside the gateway's tree or outside it: the default.
        ("platform/replies", TOPIC + "/response"),
        ("other-gateway/plant-1/sewing/line-1/sew-01/event/order.started", TOPIC + "/response"),
        ("sf/plant-1/sewing/line-1/sew-01/event/order.started", TOPIC + "/response"),
        ("sf/plant-1/x/response", TOPIC + "/response"),
        (TOPIC + "/responses", TOPIC + "/response"),
        (TOPIC + "/response/#", TOPIC + "/response"),
        ("replies/#", TOPIC + "/response"),
    ],
)
def test_reply_topic_stays_in_the_commands_response_tree(
    requested: str | None, expected: str
) -> None:
    assert reply_topic("sf", TOPIC, requested) == expected


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1) is True  # one token back after 0.1 s at 10/s
    assert bucket.take(0.1) is False


def _reply(topic: str, body: bytes, runtime: FakeRuntime | None = None) -> dict:
    reply = handle(
        prefix="sf",
        machines=MACHINES,
        target=runtime or FakeRuntime(),
        topic=topic,
        payload=body,
        retained=False,
        response_topic=None,
        correlation_data=None,
        now=2_000_000_000.0,
    )
    assert reply is not None
    return dict(json.loads(reply.payload))


@pytest.mark.parametrize("command_id", ["c-1\nforged log line", "c\x00", "tab\there", "del\x7f"])
def test_command_ids_with_control_characters_are_refused(command_id: str) -> None:
    runtime = FakeRuntime()
    body = json.dumps({"command_id": command_id, "order_id": "SO-1", "target": 5}).encode()
    answer = _reply(TOPIC, body, runtime)
    assert answer["accepted"] is False and "command_id" in answer["reason"]
    assert answer["command_id"] is None  # never echoed
    assert runtime.applied == []


def test_topic_text_from_outside_is_clipped_in_logs_and_answers() -> None:
    huge = "m" * 20_000
    topic = f"sf/plant-1/{'a' * 5_000}/line-1/{huge}/cmd/{'x' * 5_000}"
    with structlog.testing.capture_logs() as logs:
        reply = handle(
            prefix="sf",
            machines=MACHINES,
            target=FakeRuntime(),
            topic=topic,
            payload=b"{}",
            retained=False,
            response_topic=None,
            correlation_data=None,
            now=1.0,
        )
    assert reply is not None
    (line,) = logs
    assert all(len(str(v)) <= 300 for v in line.values()), {k: len(str(v)) for k, v in line.items()}
    assert len(reply.payload) < 1_000


def test_a_past_due_time_is_accepted_with_a_warning() -> None:
    body = {"command_id": "c", "order_id": "SO-1", "target": 5, "due": "2026-01-01T00:00:00Z"}
    answer = _reply(TOPIC, json.dumps(body).encode())
    assert answer["accepted"] is True
    assert answer["reason"] == (
        "started; due 2026-01-01T00:00:00.000Z is already past: the order is late"
    )
    body["due"] = "2036-01-01T00:00:00Z"
    body["command_id"] = "c2"
    assert _reply(TOPIC, json.dumps(body).encode())["reason"] == "started"


def test_the_listener_waits_at_most_five_seconds_between_attempts() -> None:
    assert max(LISTENER_BACKOFF.ceiling(n) for n in range(100)) == 5.0
    rng = random.Random(1)
    assert all(LISTENER_BACKOFF.delay(n, rng) <= 5.0 for n in range(1_000))


def test_one_platforms_many_commands_never_push_out_anothers_verdicts() -> None:
    tracker = MachineTracker("sew-01", TrackerSettings(order_source="platform"))
    first, _ = tracker.command(AssignOrder("A-1", 5, command_id="a-1", origin="acme"), 1.0)
    assert first == CommandResult(True, "started")
    # zeta sends more commands than the table keeps (each one refused, each one remembered).
    for i in range(RECENT_COMMANDS + 10):
        tracker.command(CancelOrder(f"Z-{i}", command_id=f"z-{i}", origin="zeta"), 2.0)
    again, events = tracker.command(AssignOrder("A-1", 5, command_id="a-1", origin="acme"), 3.0)
    assert again == CommandResult(True, "duplicate command: started") and events == []
    # zeta's own oldest ids are the ones forgotten.
    old, _ = tracker.command(CancelOrder("Z-0", command_id="z-0", origin="zeta"), 4.0)
    assert old == CommandResult(False, "unknown order 'Z-0'")
    recent, _ = tracker.command(CancelOrder("Z-999", command_id="z-999", origin="zeta"), 4.0)
    assert recent.reason.startswith("duplicate command: ")
