"""Routing rules and redaction per destination (pure)."""

from __future__ import annotations

import json

import pytest

from gateway.contract.wire import batch_payload, mark_delayed, redact_payload
from gateway.core.routing import (
    Route,
    RouteRules,
    Subject,
    accepts,
    destinations_for,
    pseudonym,
    redact,
    state_view,
)

ACME = RouteRules(customers=("acme",))
LINE1 = RouteRules(machines=("sew-0*",), event_types=("order.*", "machine.state.changed"))


@pytest.mark.parametrize(
    ("rules", "subject", "expected"),
    [
        (RouteRules(), Subject("m", "event", "order.started", "PO-1"), True),
        (LINE1, Subject("sew-01", "event", "order.progress", "PO-1"), True),
        (LINE1, Subject("cut-01", "event", "order.progress", "PO-1"), False),
        (LINE1, Subject("sew-01", "event", "machine.alarm.raised"), False),
        (LINE1, Subject("sew-01", "state"), True),
        (LINE1, Subject("cut-01", "state"), False),
        (LINE1, Subject("sew-01", "telemetry"), False),
        (RouteRules(event_types=("telemetry",)), Subject("m", "telemetry"), True),
        # Telemetry is opt-in: no rules, or a glob matching every event, do not admit it.
        (RouteRules(), Subject("m", "telemetry"), False),
        (RouteRules(event_types=("*",)), Subject("m", "telemetry"), False),
        (RouteRules(event_types=("*", "telemetry")), Subject("m", "telemetry"), True),
        (ACME, Subject("m", "event", "order.started", "PO-1", "acme"), True),
        (ACME, Subject("m", "event", "order.started", "PO-1", "globex"), False),
        (ACME, Subject("m", "event", "order.started", "PO-1", None), False),
        (ACME, Subject("m", "event", "machine.state.changed"), True),
        (RouteRules(order_ids=("A-*",)), Subject("m", "event", "order.completed", "A-7"), True),
        (RouteRules(order_ids=("A-*",)), Subject("m", "event", "order.completed", "B-7"), False),
    ],
)
def test_accepts(rules: RouteRules, subject: Subject, expected: bool) -> None:
    assert accepts(rules, subject) is expected


def test_each_platform_gets_only_its_orders() -> None:
    routes = [Route("acme", ACME), Route("globex", RouteRules(customers=("globex",))), Route("all")]
    assert destinations_for(routes, Subject("m", "event", "order.started", "1", "acme")) == {
        "acme",
        "all",
    }
    assert destinations_for(routes, Subject("m", "event", "machine.alarm.raised")) == {
        "acme",
        "globex",
        "all",
    }


def test_state_view_hides_foreign_orders() -> None:
    snap = {"machine": "m", "order": {"order_id": "PO-1"}, "state": "running"}
    assert state_view(ACME, snap, "acme") is snap
    hidden = state_view(ACME, snap, "globex")
    assert hidden["order"] is None and hidden["state"] == "running"
    assert state_view(RouteRules(), snap, None) is snap


def test_redaction_policies() -> None:
    doc = {"data": {"operator": "anna", "good": 3}, "list": [{"operator": "bo"}]}
    assert redact(doc, "drop", None) == {"data": {"good": 3}, "list": [{}]}
    assert redact(doc, "pass", None) == doc
    pseud = redact(doc, "pseudonymise", b"site-secret")
    assert pseud["data"]["operator"] == pseudonym(b"site-secret", "anna") != "anna"
    assert pseudonym(b"other", "anna") != pseud["data"]["operator"]
    # Without a secret a pseudonym would be guessable: drop instead.
    assert redact(doc, "pseudonymise", None) == {"data": {"good": 3}, "list": [{}]}


def test_payload_helpers() -> None:
    raw = b'{"id":"x","data":{"good":1}}'
    assert redact_payload(raw, "drop", None) is raw
    red = redact_payload(b'{"data":{"operator":"anna"}}', "drop", None)
    assert json.loads(red) == {"data": {}}
    assert json.loads(mark_delayed(raw))["delayed"] is True
    assert mark_delayed(mark_delayed(raw)) == mark_delayed(raw)
    assert json.loads(batch_payload([raw, raw])) == [json.loads(raw)] * 2


def test_order_attribution_is_removed_whole_or_pseudonymised() -> None:
    shares = [
        {"operator": "anna", "seconds": 60.0, "good": 5, "scrap": 1},
        {"operator": None, "seconds": 5.0, "good": 1, "scrap": 0},
    ]
    raw = json.dumps({"data": {"good": 6, "operators": shares}}).encode()
    # Pieces per (anonymous) worker are personal data too: the whole list goes.
    assert json.loads(redact_payload(raw, "drop", None)) == {"data": {"good": 6}}
    assert json.loads(redact_payload(raw, "pseudonymise", None)) == {"data": {"good": 6}}
    assert redact_payload(raw, "pass", None) is raw
    pseud = json.loads(redact_payload(raw, "pseudonymise", b"site-secret"))
    assert pseud["data"]["operators"] == [
        {**shares[0], "operator": pseudonym(b"site-secret", "anna")},
        shares[1],
    ]


def test_operator_policy_of_a_telemetry_only_destination_acts_on_a_badge_machine() -> None:
    from gateway.core.routing import idle_operator_policies

    values = Route("values", RouteRules(event_types=("telemetry",)), "pass")
    elsewhere = Route("other", RouteRules(machines=("cut-*",), event_types=("telemetry",)), "pass")
    # The badge goes out in telemetry (and the retained state) of sew-01: the policy acts.
    assert idle_operator_policies([values], ["sew-01"]) == []
    (warning,) = idle_operator_policies([elsewhere], ["sew-01"])
    assert warning.startswith("destination other: operator: pass never acts")
