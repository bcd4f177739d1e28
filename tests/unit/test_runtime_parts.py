"""The runtime's parts on their own: customer tracking and the retained state per destination."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from gateway.config.plans import MachinePlan
from gateway.contract.envelope import Topics
from gateway.core.mapping import Mapper
from gateway.core.model import Location
from gateway.core.routing import RouteRules
from gateway.core.tracker import MachineTracker, TrackerSettings
from gateway.delivery.mqtt.publisher import Message
from gateway.delivery.registry import Output
from gateway.runtime.devices import Machine
from gateway.runtime.emitter import _FINISHED_CUSTOMERS, Customers, everywhere
from gateway.runtime.retained import RetainedState

LOC = Location(site="plant-1", area="sewing", line="line-1", machine="sew-01")
TOPICS = Topics(prefix="sf", site="plant-1", gateway_id="gw-1")


class Collecting:
    """Stands in for an output's runner: keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        #: Its sink takes everything (events, state, status).
        self.sink = SimpleNamespace(accepts=lambda kind: True)

    def submit(self, message: Message) -> None:
        self.sent.append(message)


def order(order_id: str, customer: str | None) -> dict[str, Any]:
    return {"order_id": order_id, "customer": customer}


def test_customers_keep_live_orders_and_forget_the_oldest_finished() -> None:
    customers = Customers()
    customers.learn("m", {"order": order("PO-1", "acme"), "queue": [order("PO-2", None)]})
    assert customers.customer_of("m", "PO-1") == "acme"
    assert customers.of("m") == {"PO-1": "acme", "PO-2": None}
    # PO-1 finished; then many more orders ran and finished after it.
    for i in range(_FINISHED_CUSTOMERS + 1):
        customers.learn("m", {"order": order(f"X-{i}", "beta"), "queue": []})
    customers.learn("m", {"order": None, "queue": [order("PO-2", None)]})
    assert customers.customer_of("m", "PO-1") is None  # the oldest finished, forgotten
    assert customers.customer_of("m", f"X-{_FINISHED_CUSTOMERS}") == "beta"
    assert "PO-2" in customers.of("m")  # still queued: always kept
    assert customers.customer_of("other", "PO-2") is None


def output(name: str, rules: RouteRules | None = None, *, durable: bool = True) -> Output:
    """An output as the registry builds it: a runner, its rules, an outbox queue or none."""
    queue: Any = object() if durable else None
    return Output(name, Collecting(), rules=rules or RouteRules(), queue=queue)  # type: ignore[arg-type]


def test_everywhere_only_without_per_event_routing() -> None:
    plain = [output("a"), output("b"), output("influxdb"), output("memory-only", durable=False)]
    assert everywhere(plain) == {"a", "b", "influxdb"}
    scoped = [output("a"), output("b", RouteRules(customers=("acme",)))]
    assert everywhere(scoped) is None


def machine() -> Machine:
    plan = MachinePlan(
        id="sew-01",
        location=LOC,
        protocol=None,  # type: ignore[arg-type]
        profile=None,
        connection=None,  # type: ignore[arg-type]
        signals={},
        poll_interval=1.0,
        tracker=TrackerSettings(),
    )
    return Machine(plan, MachineTracker("sew-01", plan.tracker), Mapper({}))


def test_retained_state_follows_each_destinations_routing() -> None:
    outs = [
        output("all"),
        output("acme", RouteRules(customers=("acme",))),
        output("elsewhere", RouteRules(machines=("cut-01",))),
    ]
    pubs: dict[str, Collecting] = {o.name: o.runner for o in outs}  # type: ignore[misc]
    state = RetainedState(
        gateway_id="gw-1",
        topics=TOPICS,
        outputs=outs,
        secret=None,
        customer_of=lambda machine, order_id: "beta" if order_id == "PO-1" else None,
        routed=True,
    )
    snapshot = {"machine": "sew-01", "state": "running", "order": {"order_id": "PO-1"}}
    state.publish(machine(), snapshot, 1_700_000_000.0)
    assert pubs["elsewhere"].sent == []  # it may not see the machine at all
    (seen_all,) = pubs["all"].sent
    (seen_acme,) = pubs["acme"].sent
    assert seen_all.topic == seen_acme.topic == TOPICS.state(LOC)
    assert seen_all.retain and seen_acme.retain
    assert json.loads(seen_all.payload)["order"] == {"order_id": "PO-1"}
    # Another customer's order is hidden from acme's platform.
    assert json.loads(seen_acme.payload)["order"] is None

    state.clear("sew-01", LOC)
    assert [m.payload for m in pubs["all"].sent[1:]] == [b""]
    assert [m.payload for m in pubs["acme"].sent[1:]] == [b""]
    assert pubs["elsewhere"].sent == []
