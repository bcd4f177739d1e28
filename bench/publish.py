"""Publishing: the gateway's MQTT publisher, QoS 1, one message per publish (no batching).

    python -m bench.publish --messages 20000 --window 100

Runs :class:`gateway.delivery.mqtt.publisher.MqttPublisher` in this process (on uvloop)
against a private
Mosquitto and times submit-all → everything acknowledged (PUBACK). This process's own CPU is the
publisher's cost (the broker runs in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.common import cpu_seconds, report
from gateway.delivery.mqtt.publisher import BrokerSettings, Message, MqttPublisher
from gateway.runtime import logs
from tests.brokers import MosquittoBroker


async def run(messages: int, window: int, size: int, broker_port: int) -> dict[str, float]:
    """Publish ``messages`` QoS 1 messages; return msg/s and CPU seconds per message."""
    settings = BrokerSettings(
        host="127.0.0.1",
        port=broker_port,
        client_id="bench-publisher",
        status_topic="bench/status",
        online_payload=b"online",
        will_payload=b"offline",
        offline_payload=b"offline",
        window=window,
        max_queue=max(messages, window),
    )
    pub = MqttPublisher(settings)
    task = asyncio.create_task(pub.run(), name="publisher[bench]")
    try:
        # One message acknowledged: connected and warm.
        pub.submit(Message("bench/warm-up", b"", 1, False))
        if not await pub.flush(timeout=10):
            raise RuntimeError("publisher did not connect within 10 s")
        payload = b"x" * size
        topics = [
            f"bench/plant/hall/line-1/m{i % 500:04d}/event/order.progress" for i in range(500)
        ]
        c0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        for i in range(messages):
            pub.submit(Message(topics[i % 500], payload, 1, False))
        ok = await pub.flush(timeout=120)
        t1, c1 = time.perf_counter(), cpu_seconds(os.getpid())
        if not ok:
            raise RuntimeError(f"publisher did not flush: {pub.pending} pending")
    finally:
        await pub.close(timeout=2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"msg_per_s": messages / (t1 - t0), "cpu_us_per_msg": 1e6 * (c1 - c0) / messages}


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--window", default="10,100", help="comma-separated in-flight windows")
    p.add_argument("--size", type=int, default=333, help="payload bytes")
    args = p.parse_args()
    logs.configure("warning")
    rows: list[tuple[str, Any, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker")
        broker.start()
        try:
            for window in (int(w) for w in args.window.split(",")):
                # uvloop, as the gateway runs.
                r = uvloop.run(run(args.messages, window, args.size, broker.port))
                rows.append((f"window {window}: QoS 1 msg/s", round(r["msg_per_s"]), ">= 10,000"))
                rows.append((f"window {window}: CPU us/msg", round(r["cpu_us_per_msg"], 1), ""))
        finally:
            broker.stop()
    report("publish", {"messages": args.messages, "size": args.size}, rows)


if __name__ == "__main__":
    main()
