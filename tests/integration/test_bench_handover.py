"""bench.handover: what the gateway hands over reaches the broker through the delivery process.

The experiment's two halves against a real Mosquitto and a real SQLite file: the gateway
side's wrappers (what they send, what they keep), and the delivery process's loop, run
in-process on the other end of a socket pair.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

from bench import handover
from bench.common import write_config
from gateway.delivery.mqtt.publisher import BrokerSettings, Message, MqttPublisher
from gateway.delivery.outbox import Entry, Outbox
from tests.brokers import MosquittoBroker, Subscriber


def _config(tmp_path: Path, port: int) -> Path:
    return write_config(
        tmp_path / "gateway.yaml",
        broker_port=port,
        devices=[{"name": "m1", "port": 1502, "unit_id": 1}],
        signals={"state": {"address": 0, "type": "uint16", "map": {0: "idle", 1: "running"}}},
        poll=1.0,
    )


async def test_handed_over_events_and_states_are_delivered(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    config = _config(tmp_path, mosquitto.port)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    undo = handover.install(ours)
    try:
        async with Subscriber("127.0.0.1", mosquitto.port, "bench/#") as sub:
            delivery = asyncio.create_task(handover.deliver(theirs.detach(), config))
            created = time.time()
            # The gateway's outbox is not even opened: the wrapper hands over, stores nothing.
            gateway_outbox = Outbox(tmp_path / "unused.db", ["default"])
            seqs = gateway_outbox.append(
                [
                    Entry(
                        "m1",
                        f"bench/site/hall/line/m1/event/order.started.{i}",
                        json.dumps({"n": i}).encode(),
                        frozenset({"default"}),
                        "order.started",
                        "o-1",
                        created=created,
                    )
                    for i in range(3)
                ],
                {"m1": {"order": "o-1"}},
            )
            assert seqs == []
            assert gateway_outbox.total_backlog() == 0
            publisher = MqttPublisher(BrokerSettings(host="127.0.0.1", port=mosquitto.port))
            publisher.submit(Message("bench/site/hall/line/m1/state", b'{"s":1}', 1, True))
            # Not a state: it stays with the gateway's own (here: never started) publisher.
            publisher.submit(Message("bench/site/gateway/gw/status", b"{}", 1, True))
            assert publisher.pending == 1
            messages = await sub.wait_for(
                lambda ms: len([m for m in ms if "/m1/" in m.topic]) >= 4, timeout=10
            )
            ours.close()
            results = await asyncio.wait_for(delivery, timeout=15)
    finally:
        undo()
        ours.close()
    topics = sorted(m.topic for m in messages if "/m1/" in m.topic)
    assert topics == [
        "bench/site/hall/line/m1/event/order.started.0",
        "bench/site/hall/line/m1/event/order.started.1",
        "bench/site/hall/line/m1/event/order.started.2",
        "bench/site/hall/line/m1/state",
    ]
    # The telemetry entry was not handed over; the delivery process has its own status.
    assert not any(m.topic == "bench/t" for m in messages)
    assert any(m.topic.endswith("/gateway/gw-bench-delivery/status") for m in messages)
    delivered = results["delivered"]
    assert len(delivered) == 3
    for emitted, acked in delivered:
        assert abs(emitted - created) < 1e-3
        assert acked >= emitted
    # Undone: the product's own methods again.
    assert Outbox.append.__name__ == "append"
    assert MqttPublisher.submit.__name__ == "submit"

    out = tmp_path / "handover.json"
    handover._write_results(results, out)
    assert not (tmp_path / "var" / "delivery-outbox.db").exists()
    summary = handover.summarise(out, created - 1, created + 1)
    assert summary["events"] == 3
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["rss_mib"] > 0
    rows = handover.table(summary, "x")
    assert rows[0][0] == "x delivery process, emitted->PUBACK p50/p99 ms"
    # Outside the window: nothing counted.
    assert handover.summarise(out, created + 10, created + 20)["events"] == 0


def test_summary_takes_cpu_over_the_window(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    out.write_text(
        json.dumps(
            {
                "delivered": [[10.0, 10.002], [11.0, 11.004], [30.0, 30.1]],
                "cpu": [[9.0, 1.0], [10.0, 1.1], [12.0, 1.3], [31.0, 5.0]],
                "rss_kib": 2048,
            }
        )
    )
    summary = handover.summarise(out, 10.0, 12.0)
    assert summary["events"] == 2
    assert summary["cpu_fraction"] == 0.1
    assert summary["rss_mib"] == 2.0
    assert summary["max_ms"] == 4.0
