"""Routing and redaction rules per destination (pure: no clock, no I/O).

A *destination* is one broker with its own rules. :func:`accepts` decides whether a message
about a machine goes to a destination:

* ``machines``: glob patterns on the machine id; empty means every machine.
* ``event_types``: glob patterns on the short event type (``order.*``); empty means every
  type. Telemetry (tag values, every poll) goes only where this names ``telemetry``
  literally: a value stream is many times the volume of the events, so a destination opts
  in. The retained state of a machine goes wherever the machine is visible.
* ``customers`` / ``order_ids``: when either is set the destination is *order-scoped*: an
  event about an order goes there only when the order was assigned by one of the
  ``customers`` or its id matches one of the ``order_ids`` globs. Events without an order
  (state, alarms, connection) follow the machine rule. The retained state of a visible
  machine carries the running order only if that order is visible too (:func:`state_view`),
  so a platform never learns another platform's order ids.

Redaction of workers' personal data is per destination: the ``operator`` badge anywhere
in a payload and the ``operators`` attribution of order events (who worked on the order,
for how long, pieces each; see :mod:`gateway.core.attribution`). ``drop`` (the default) removes
both, the attribution as a whole (pieces per anonymous worker still single people out);
``pseudonymise`` replaces each badge with a keyed hash (HMAC-SHA256 with the site secret,
so the same worker gets the same pseudonym and nobody without the secret can reverse it);
``pass`` sends them unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from gateway.core.vocabulary import OPERATOR_SIGNAL, OPERATORS_KEY

OperatorPolicy = Literal["drop", "pseudonymise", "pass"]
SubjectKind = Literal["event", "state", "telemetry"]

#: The signal that names a worker; redacted according to the destination's policy.
OPERATOR_KEY = OPERATOR_SIGNAL


@dataclass(frozen=True, slots=True)
class RouteRules:
    """Which machines, event types and orders a destination may see; empty means all."""

    machines: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    customers: tuple[str, ...] = ()
    order_ids: tuple[str, ...] = ()

    @property
    def order_scoped(self) -> bool:
        """True when the destination sees only some orders."""
        return bool(self.customers or self.order_ids)


@dataclass(frozen=True, slots=True)
class Route:
    """One destination's name, rules and delivery options."""

    name: str
    rules: RouteRules = RouteRules()
    operator: OperatorPolicy = "drop"
    batch: bool = False


@dataclass(frozen=True, slots=True)
class Subject:
    """What a message is about, as far as routing cares."""

    machine: str
    kind: SubjectKind
    event_type: str | None = None
    order_id: str | None = None
    customer: str | None = None


def _any_match(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(value, p) for p in patterns)


def machine_visible(rules: RouteRules, machine: str) -> bool:
    """True when the destination may see anything of ``machine``."""
    return not rules.machines or _any_match(machine, rules.machines)


def order_visible(rules: RouteRules, order_id: str | None, customer: str | None) -> bool:
    """True when the destination may see the order (always true without an order)."""
    if order_id is None or not rules.order_scoped:
        return True
    if customer is not None and customer in rules.customers:
        return True
    return _any_match(order_id, rules.order_ids)


def accepts(rules: RouteRules, subject: Subject) -> bool:
    """True when a message about ``subject`` goes to a destination with ``rules``."""
    if not machine_visible(rules, subject.machine):
        return False
    if subject.kind == "event":
        if rules.event_types and not _any_match(subject.event_type or "", rules.event_types):
            return False
    elif subject.kind == "telemetry":
        if "telemetry" not in rules.event_types:
            return False
    else:
        # The retained state of a visible machine always goes; state_view() hides the order.
        return True
    return order_visible(rules, subject.order_id, subject.customer)


def destinations_for(routes: Sequence[Route], subject: Subject) -> frozenset[str]:
    """Names of the destinations that receive a message about ``subject``."""
    return frozenset(r.name for r in routes if accepts(r.rules, subject))


def state_view(
    rules: RouteRules,
    snapshot: Mapping[str, Any],
    customer: str | None,
    queue: Sequence[tuple[str, str | None]] | None = None,
) -> Mapping[str, Any]:
    """The state snapshot as this destination may see it (the order hidden if not visible).

    With the machine's ``queue`` ((order id, customer) pairs), an order-scoped destination's
    ``queued`` counts only the waiting orders it may see: the length of the whole queue would
    tell it of other platforms' orders.
    """
    view = snapshot
    if rules.order_scoped and queue is not None:
        mine = sum(1 for order_id, who in queue if order_visible(rules, order_id, who))
        if mine != snapshot.get("queued"):
            view = {**view, "queued": mine}
    order = snapshot.get("order")
    if not isinstance(order, Mapping):
        return view
    order_id = order.get("order_id")
    if order_visible(rules, order_id if isinstance(order_id, str) else None, customer):
        return view
    return {**view, "order": None}


def idle_operator_policies(routes: Iterable[Route], badge_machines: Iterable[str]) -> list[str]:
    """Warnings for ``pass`` / ``pseudonymise`` policies that no visible machine can feed.

    A badge reaches a destination three ways, all gated by the machine rule alone: the
    ``operators`` of order events and of the retained state (which goes wherever the machine
    is visible, whatever ``event_types`` say), and the ``operator`` value of telemetry. So a
    policy acts exactly when the destination sees a machine that maps ``operator``.
    """
    machines = list(badge_machines)
    out = []
    for r in routes:
        if r.operator == "drop" or any(machine_visible(r.rules, m) for m in machines):
            continue
        where = "no machine" if not machines else "no machine this destination sees"
        out.append(
            f"destination {r.name}: operator: {r.operator} never acts, {where} maps an "
            "`operator` signal (map the badge reader, or leave the policy at drop)"
        )
    return out


def pseudonym(secret: bytes, value: object) -> str:
    """Stable keyed pseudonym of a worker id: same input and secret, same output."""
    digest = hmac.new(secret, str(value).encode("utf-8"), hashlib.sha256).hexdigest()
    return "op-" + digest[:16]


def redact(value: Any, policy: OperatorPolicy, secret: bytes | None) -> Any:
    """Apply the operator policy to every ``operator(s)`` key at any depth; returns new data."""
    if policy == "pass":
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == OPERATORS_KEY and (policy == "drop" or secret is None):
                continue
            if k == OPERATOR_KEY and v is not None:
                if policy == "drop":
                    continue
                if secret is None:
                    # No secret, no pseudonym: dropping is the only safe fallback.
                    continue
                out[k] = pseudonym(secret, v)
            else:
                out[k] = redact(v, policy, secret)
        return out
    if isinstance(value, list | tuple):
        return [redact(v, policy, secret) for v in value]
    return value
