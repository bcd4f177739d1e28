"""The retained state of each machine, per destination: filtered by its routing, redacted by its
operator policy.

Every destination that may see a machine gets its snapshot as a retained message; an
order-scoped destination sees only its own orders (:func:`gateway.core.routing.state_view`), and
the operator badge is dropped, pseudonymised or passed as the destination says
(:func:`gateway.contract.wire.redact_payload`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.contract.envelope import Topics, encode_state
from gateway.core.model import Location
from gateway.core.routing import machine_visible, redact, state_view
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.registry import Observer, Output
from gateway.runtime.devices import Machine


class RetainedState:
    """Publishes and deletes the machines' retained state on every destination's broker."""

    def __init__(
        self,
        *,
        gateway_id: str,
        topics: Topics,
        outputs: Sequence[Output],
        secret: bytes | None,
        customer_of: Callable[[str, str], str | None],
        routed: bool,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.gateway_id = gateway_id
        self.topics = topics
        #: The outputs that take retained state.
        self.outputs = [o for o in outputs if o.accepts("state")]
        self._secret = secret
        self._customer_of = customer_of
        #: Whether some destination filters events (then the waiting orders are counted per
        #: destination).
        self._routed = routed
        #: Outputs told about every snapshot (e.g. a Sparkplug B node's order metrics).
        self._observers = list(observers)

    def publish(self, m: Machine, snapshot: dict[str, Any], now: float) -> None:
        """Retained state to every destination that may see the machine, order filtered."""
        for observer in self._observers:
            observer.state(m.plan.id, snapshot)
        loc = m.plan.location
        order = snapshot.get("order")
        order_id = order.get("order_id") if isinstance(order, dict) else None
        customer = self._customer_of(m.plan.id, order_id) if order_id else None
        topic = self.topics.state(loc)
        # Order-scoped destinations count only the waiting orders they may see.
        queue = m.tracker.queued_orders() if self._routed else None
        gateway_id = self.gateway_id
        # Destinations that see the whole snapshot (the common case: all) share one encoding,
        # and one per operator policy when the snapshot names an operator.
        plain: bytes | None = None
        redacted: dict[str, bytes] = {}
        for o in self.outputs:
            if not machine_visible(o.rules, m.plan.id):
                continue
            view = state_view(o.rules, snapshot, customer, queue)
            whole = view is snapshot
            if not whole:
                payload = encode_state(view, loc, gateway_id=gateway_id, now=now)
            elif plain is None:
                payload = plain = encode_state(view, loc, gateway_id=gateway_id, now=now)
            else:
                payload = plain
            policy = o.operator
            if policy != "pass" and b'"operator' in payload:
                # Redaction acts on the typed snapshot, before it is encoded.
                if whole and policy in redacted:
                    payload = redacted[policy]
                else:
                    typed = redact(view, policy, self._secret)
                    payload = encode_state(typed, loc, gateway_id=gateway_id, now=now)
                    if whole:
                        redacted[policy] = payload
            if o.runner is not None:
                o.runner.submit(Message(topic, payload, 1, True))

    def clear(self, machine: str, loc: Location) -> None:
        """Delete a machine's retained state where it was visible (an empty retained message)."""
        for o in self.outputs:
            if o.runner is not None and machine_visible(o.rules, machine):
                o.runner.submit(Message(self.topics.state(loc), b"", 1, True))
