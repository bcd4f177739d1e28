"""Running it in a factory: /healthz, /metrics, the status summary, and InfluxDB history.

The gateway runs as its own process with the health endpoint and an InfluxDB v2 sink
(victoria-metrics speaks the v2 write API). The time-series database is down when the
gateway starts: the events of that time must still reach it, from the outbox.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle, RunOrder
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Received, Subscriber, VictoriaMetrics
from tests.gatewayproc import events, gateway_process, short

PREFIX = "ops"
SITE = "plant-1"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_http(url: str, status: int, within: float = 15.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: tuple[int, str] | None = None
    while loop.time() < deadline:
        try:
            last = await asyncio.to_thread(http_get, url)
        except OSError:
            last = None
        if last is not None and last[0] == status:
            return last[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url}: wanted {status}, last answer {last}")


def delivery_histograms(text: str) -> dict[str, dict[str, float]]:
    """``shopfloor_event_delivery_seconds`` buckets: destination -> le -> cumulative count."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "shopfloor_event_delivery_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                out.setdefault(sample.labels["destination"], {})[le] = sample.value
    return out


def device_samples(text: str, machine: str) -> dict[str, float]:
    """One machine's ``shopfloor_device_*`` samples (histogram buckets left out)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name.startswith("shopfloor_device_")
        and sample.labels.get("machine") == machine
        and "le" not in sample.labels
    }


async def test_health_metrics_status_and_history(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    health = free_port()
    vm = VictoriaMetrics(tmp_path / "vm")
    script = [Idle(1.0), RunOrder("PO-H1", target=6, piece_seconds=0.1), Idle(60.0)]
    stations = [StationSpec("sew-01", port, StationModel(script, name="sew-01"))]
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"gateway: {{id: gw-ops, site: {SITE}, topic_prefix: {PREFIX}}}\n"
        f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
        "logging: {level: info, format: json}\n"
        f"health: {{listen: '127.0.0.1:{health}'}}\n"
        f"influxdb: {{url: '{vm.url}', org: factory, bucket: shopfloor, token: t0k3n,"
        " flush_interval: 0.2}\n"
        "machines:\n"
        "  - {id: sew-01, area: sewing, line: line-1, profile: sewing-station,"
        f" poll_interval: 0.1, connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}}}}\n"
    )
    async with (
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/#") as sub,
        SimulatedFloor(stations),
        gateway_process(cfg, tmp_path / "gw.log"),
    ):
        base = f"http://127.0.0.1:{health}"
        body = json.loads(await wait_http(base + "/healthz", 200))
        assert body["status"] == "ok" and body["gateway_id"] == "gw-ops", body

        def completed(ms: list[Received]) -> bool:
            return any(short(e) == "order.completed" for e in events(ms))

        await sub.wait_for(completed, timeout=20)
        metrics = await wait_http(base + "/metrics", 200)
        assert 'machine="sew-01"' in metrics
        assert "order.completed" in metrics
        assert "process_resident_memory_bytes" in metrics or "process_" in metrics
        device = device_samples(metrics, "sew-01")
        # Modbus polls: counted as polls, each one timed; a subscription's batches apart.
        polls = device["shopfloor_device_polls_total"]
        assert polls >= 1, device
        assert device["shopfloor_device_notifications_total"] == 0
        assert device["shopfloor_device_poll_duration_seconds_count"] == polls, device
        assert 0 < device["shopfloor_device_poll_duration_seconds_sum"] < polls * 0.5, device
        assert "shopfloor_device_missed_deadlines_total" in device
        assert device["shopfloor_device_rejected_readings_total"] == 0, device

        # Every event the subscriber has is acknowledged and timed, each within a second
        # on loopback; nothing reached the history yet (it is down).
        received = len(events(sub.messages))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            delivery = delivery_histograms(metrics)
            if delivery.get("default", {}).get("+Inf", 0) >= received:
                break
            assert loop.time() < deadline, (received, delivery)
            await asyncio.sleep(0.2)
            metrics = await wait_http(base + "/metrics", 200)
        assert delivery["default"]["1.0"] == delivery["default"]["+Inf"], delivery
        assert delivery.get("influxdb", {}).get("+Inf", 0) == 0, delivery

        # The retained status carries the health summary for platforms that cannot scrape.
        status = f"{PREFIX}/{SITE}/gateway/gw-ops/status"
        await sub.wait_for(
            lambda ms: any(
                m.topic == status and "devices_online" in json.loads(m.payload) for m in ms
            ),
            timeout=15,
        )
        last = [json.loads(m.payload) for m in sub.messages if m.topic == status][-1]
        assert last["devices_online"] == 1 and last["devices_total"] == 1

        # InfluxDB comes up only now: what happened meanwhile waits in the outbox.
        vm.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                rows = await asyncio.to_thread(vm.export)
                names = {r["metric"]["__name__"] for r in rows}
                done = [
                    r
                    for r in rows
                    if r["metric"].get("type") == "order.completed"
                    and r["metric"].get("machine") == "sew-01"
                ]
                telemetry = any(n.startswith("shopfloor_telemetry") for n in names)
                # Events (from the outbox) and telemetry (from memory) are written by two
                # runners, each retrying on its own backoff: wait for both.
                if done and telemetry:
                    break
                assert loop.time() < deadline, (
                    f"history incomplete (order.completed: {bool(done)}, telemetry: "
                    f"{telemetry}): {names}"
                )
                await asyncio.sleep(0.2)
            assert done[0]["metric"].get("order") == "PO-H1"
            # Telemetry series are keyed without the order (influxdb.order_tag: false).
            tele = [r for r in rows if r["metric"]["__name__"].startswith("shopfloor_telemetry")]
            assert not [r for r in tele if "order" in r["metric"]], tele[:2]
            # The operator badge is personal data: it never reaches the history.
            assert not any("operator" in n for n in names), names
        finally:
            vm.stop()
    log = (tmp_path / "gw.log").read_text()
    assert "t0k3n" not in log
