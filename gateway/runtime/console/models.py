"""The console API's answers as pydantic models; the OpenAPI 3.1 document is made from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gateway import __version__
from gateway.contract.models import AssignOrderCommand, CancelOrderCommand, CommandResponse


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventView(_View):
    """One event as the gateway emitted it."""

    type: str = Field(description="Short contract type, e.g. order.progress.")
    time: float = Field(description="Event time, Unix seconds.")
    sequence: int
    data: dict[str, Any]


class MachineSummary(_View):
    """One machine on the floor page."""

    id: str
    area: str
    line: str
    state: str | None
    connected: bool
    order_id: str | None
    order_status: str | None
    good: int | None
    scrap: int | None
    target: int | None
    percent: float | None = Field(description="Progress towards the target, 0..100 or more.")
    eta: float | None = Field(description="Expected completion, Unix seconds.")
    at_risk: bool = Field(description="The running order will probably miss its due time.")
    queued: int
    alarm: str | None
    last_event: EventView | None


class Floor(_View):
    """Every machine of the gateway."""

    gateway_id: str
    site: str
    machines: list[MachineSummary]


class SignalValue(_View):
    """The last value read for one signal."""

    signal: str
    value: bool | int | float | str | None
    quality: str
    source_time: float


class ConnectionChange(_View):
    """The device link came up or dropped."""

    time: float
    connected: bool
    reason: str


class QueuedOrder(_View):
    """A platform order waiting for the machine."""

    order_id: str
    customer: str | None


class OrderView(_View):
    """An order seen on a machine recently, with its events (newest last)."""

    machine: str
    order_id: str
    status: str
    events: list[EventView]


class MachineDetail(_View):
    """The machine page."""

    summary: MachineSummary
    signals: list[SignalValue]
    events: list[EventView]
    connections: list[ConnectionChange]
    alarms: list[EventView]
    queue: list[QueuedOrder]
    orders: list[OrderView]


class Orders(_View):
    """Active and recent orders, newest first."""

    orders: list[OrderView]


class Delivery(_View):
    """One destination (MQTT broker) or the history sink."""

    name: str
    kind: Literal["destination", "history"]
    connected: bool
    backlog: int
    oldest_unacknowledged_s: float | None
    last_error: str | None
    sent: int = Field(description="Events sent: acknowledged plus in flight.")
    in_flight: int = Field(description="Sent and not yet acknowledged.")
    acknowledged: int
    dropped: int
    limit: int | None


class Deliveries(_View):
    """Every destination and sink."""

    deliveries: list[Delivery]


class Reload(_View):
    """The last config reload."""

    time: float
    applied: bool
    problems: list[str]


class ConfigPage(_View):
    """The running config, secrets masked."""

    config: dict[str, Any]
    last_reload: Reload | None
    writable: bool = Field(description="Whether order commands are accepted over HTTP.")


class Problem(_View):
    """A refused request."""

    error: str


#: The answers of the read endpoints (and the refusals).
READ_MODELS: list[type[BaseModel]] = [
    Floor,
    MachineDetail,
    Orders,
    Deliveries,
    ConfigPage,
    Problem,
]


def openapi() -> dict[str, Any]:
    """The API as an OpenAPI 3.1 document, schemas generated from the models."""
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (m, "serialization") for m in READ_MODELS
    ]
    wanted.append((CommandResponse, "serialization"))
    wanted += [
        (AssignOrderCommand, "validation"),
        (CancelOrderCommand, "validation"),
    ]
    _, defs = models_json_schema(wanted, ref_template="#/components/schemas/{model}")

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(name: str, text: str) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {"schema": ref(name)}}}

    def get(name: str, summary: str, *, params: bool = False) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": answer(name, "OK")},
        }
        if params:
            op["parameters"] = [machine_param]
            op["responses"]["404"] = answer("Problem", "No such machine")
        return {"get": op}

    machine_param = {
        "name": "machine",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }

    def command(body: str, summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": [{"token": []}],
                "parameters": [machine_param],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref(body)}},
                },
                "responses": {
                    "200": answer("CommandResponse", "Accepted"),
                    "401": answer("Problem", "Missing or wrong token"),
                    "403": answer("Problem", "Read-only console, or a cross-site request"),
                    "404": answer("CommandResponse", "Unknown machine"),
                    "413": {"description": "Body too large"},
                    "415": answer("Problem", "Body is not application/json"),
                    "422": answer("CommandResponse", "Refused: same answer as over MQTT"),
                },
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Shopfloor Gateway console API",
            "version": __version__,
            "description": (
                "Read the floor, machines, orders, deliveries and config; assign and cancel "
                "orders with the console token. Live updates: GET /api/stream "
                "(text/event-stream, event `machines` with a list of MachineSummary)."
            ),
        },
        "paths": {
            "/api/floor": get("Floor", "Every machine, grouped by area and line"),
            "/api/machines/{machine}": get("MachineDetail", "One machine", params=True),
            "/api/orders": get("Orders", "Active and recent orders"),
            "/api/deliveries": get("Deliveries", "Destinations and the history sink"),
            "/api/config": get("ConfigPage", "The running config, secrets masked"),
            "/api/machines/{machine}/assign-order": command(
                "AssignOrderCommand", "Assign an order (as the MQTT command assign-order)"
            ),
            "/api/machines/{machine}/cancel-order": command(
                "CancelOrderCommand", "Cancel an order (as the MQTT command cancel-order)"
            ),
        },
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
    }


if __name__ == "__main__":  # pragma: no cover - writes docs/console-openapi.json
    import json
    import pathlib
    import sys

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console-openapi.json")
    out.write_text(json.dumps(openapi(), indent=2) + "\n")
