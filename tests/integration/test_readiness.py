"""/healthz tells the truth: not ready while a connected broker acknowledges nothing.

The gateway publishes through a fault proxy to a real Mosquitto. Once it is ready, the proxy
drops everything the broker sends (PUBACKs and PINGRESPs) while the connection stays open:
events pile up in the outbox, whether the publisher still counts itself connected or has
given the silent link up and reconnects into the same silence. Readiness must
fail once the oldest undelivered event is older than ``health.max_pending_age`` and say
why, and come back when the broker's answers do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shopfloor_gateway.simulators.faultproxy import FaultProxy, FaultStep
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker
from tests.gatewayproc import gateway_process
from tests.integration.test_operations import wait_http

pytestmark = pytest.mark.integration


async def test_dropped_pubacks_make_the_gateway_unready_then_ready_again(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    health = free_port()
    # Pieces every 0.2 s: progress events keep coming while the broker is silent.
    script = [Idle(0.5), RunOrder("PO-R1", target=10_000, piece_seconds=0.2), Idle(60.0)]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    async with FaultProxy(mosquitto.host, mosquitto.port, framing="raw") as proxy:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            "gateway: {id: gw-ready, site: plant}\n"
            f"broker: {{host: 127.0.0.1, port: {proxy.port}, keepalive: 60}}\n"
            "logging: {level: info, format: json}\n"
            f"health: {{listen: '127.0.0.1:{health}', max_pending_age: 2}}\n"
            "tracker: {progress_interval: 0.5}\n"
            "machines:\n"
            "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
            f" poll_interval: 0.1, connection: {{protocol: modbus, host: 127.0.0.1,"
            f" port: {port}}}}}\n"
        )
        async with SimulatedFloor(stations), gateway_process(cfg, tmp_path / "gw.log"):
            base = f"http://127.0.0.1:{health}/healthz"
            await wait_http(base, 200)
            proxy.inject(FaultStep(fault="drop", direction="down", count=1_000_000))
            body = json.loads(await wait_http(base, 503, within=15))
            assert body["checks"]["destinations"] is False, body
            # Connected but silent, or already given up on by the publisher's PUBACK timer:
            # either way the age of what waits is the reason.
            assert any("oldest pending message" in p for p in body["problems"]), body
            proxy.inject(FaultStep(fault="heal"))
            # The link is half dead: paho notices the missing PINGRESP or the gateway's
            # pending PUBACKs time out, reconnects, and resends from the outbox.
            await wait_http(base, 200, within=90)
