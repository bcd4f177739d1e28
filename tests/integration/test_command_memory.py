"""A hostile command publisher cannot grow the gateway's memory, and commands still work after.

Two publishers flood the command topic with QoS 0 commands as fast as paho sends them, and
one sends a few payloads far over the 16 KiB command limit. The gateway process's peak
resident memory (``VmHWM``) may grow by a bounded amount only: the listener's inbox drops
what it cannot take (counted, logged once), and the MQTT 5 Maximum Packet Size makes
Mosquitto drop the oversized messages before they are sent. Afterwards a valid command is
answered as usual.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path

import aiomqtt

from gateway.runtime.commands import MAX_PACKET_SIZE
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Idle
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Subscriber
from tests.gatewayproc import gateway_process
from tests.integration.test_commands import send_until_answered

PREFIX = "mem"
SITE = "plant-1"
CMD = f"{PREFIX}/{SITE}/sewing/line-1/box-01/cmd/assign-order"
FLOOD_SECONDS = 3.0
#: Peak memory the flood may add. An unbounded inbox grew by hundreds of MB here.
MAX_GROWTH_KB = 40_000
#: Payloads far over the limit, sent once each.
HUGE = 20 * 1024 * 1024
HUGE_COUNT = 3

FLOODER = """
import sys, time
import paho.mqtt.client as mqtt
host, port, topic, seconds, size, count = sys.argv[1:7]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.max_queued_messages_set(0)
c.connect(host, int(port))
c.loop_start()
if int(size):
    for _ in range(int(count)):
        c.publish(topic, b"x" * int(size), qos=1).wait_for_publish(30)
else:
    body = b'{"order_id": "PO-X", "target": 3, "customer": "' + b"y" * 900 + b'"}'
    start = time.monotonic()
    while time.monotonic() - start < float(seconds):
        for _ in range(200):
            c.publish(topic, body, qos=0)
        time.sleep(0)
time.sleep(0.3)
c.loop_stop()
c.disconnect()
"""


def peak_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def flooder(broker: MosquittoBroker, size: int = 0) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FLOODER,
        broker.host,
        str(broker.port),
        CMD,
        str(FLOOD_SECONDS),
        str(size),
        str(HUGE_COUNT),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_floods_and_huge_payloads_leave_memory_bounded(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    health = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"gateway: {{id: gw-mem, site: {SITE}, topic_prefix: {PREFIX}}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"broker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
        "logging: {level: info, format: json}\n"
        f"health: {{listen: '127.0.0.1:{health}'}}\n"
        "tracker: {order_source: platform}\n"
        "machines:\n"
        "  - {id: box-01, area: sewing, line: line-1, profile: sewing-station,"
        f" connection: {{protocol: modbus, host: 127.0.0.1, port: {port}}},"
        " signals: {order_id: null, target_count: null}}\n"
    )
    async with (
        Subscriber(mosquitto.host, mosquitto.port, f"{PREFIX}/+/+/+/+/cmd/+/response") as replies,
        SimulatedFloor([StationSpec("box-01", port, StationModel([Idle(120)], name="box-01"))]),
        gateway_process(cfg, tmp_path / "gw.log") as gw,
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="platform") as platform,
    ):
        first = await send_until_answered(
            platform, replies, CMD, {"command_id": "c-1", "order_id": "SO-1", "target": 5}
        )
        assert first["accepted"] is True, first
        _, before = peak_kb(gw.pid)

        procs = [await flooder(mosquitto), await flooder(mosquitto)]
        procs.append(await flooder(mosquitto, HUGE))
        async with asyncio.timeout(120):
            for p in procs:
                _, err = await p.communicate()
                assert p.returncode == 0, err.decode()[-2000:]

        after = await send_until_answered(
            platform,
            replies,
            CMD,
            {"command_id": "c-2", "order_id": "SO-2", "target": 5},
            give_up_after=30,
        )
        assert after["accepted"] is True, after
        rss, peak = peak_kb(gw.pid)
        assert gw.returncode is None

        def inbox_drops(text: str) -> float:
            for line in text.splitlines():
                if (
                    line.startswith("shopfloor_commands_dropped_total{")
                    and 'reason="inbox"' in line
                ):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        async def scrape() -> str:
            url = f"http://127.0.0.1:{health}/metrics"
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=5).read().decode()
            )

        # The metrics are refreshed once a second; /metrics has nothing to wait on but a poll.
        async with asyncio.timeout(10):
            while not inbox_drops(await scrape()):  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.2)
    # What Mosquitto does with a message over the announced Maximum Packet Size: it drops
    # it for that client (the sender still gets its PUBACK) and logs it.
    dropped = mosquitto.log_file.read_text().count("Dropping too large outgoing PUBLISH")
    assert dropped == HUGE_COUNT, mosquitto.log_file.read_text()[-2000:]
    growth = peak - before
    print(f"peak RSS {before} -> {peak} KiB (+{growth}), now {rss} KiB")
    assert growth < MAX_GROWTH_KB, f"peak RSS grew by {growth} KiB during the flood"
    log = [json.loads(line) for line in (tmp_path / "gw.log").read_text().splitlines() if line]
    full = [e for e in log if e.get("event") == "command.inbox_full"]
    # Once per flood episode, not once per dropped message.
    assert len(full) <= 3, len(full)
    assert MAX_PACKET_SIZE < HUGE
