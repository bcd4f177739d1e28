"""A new kind of output is a registry entry: the runtime feeds its observer without naming it.

A probe kind is added to the registry for the test only; the gateway, its devices, its
retained state, its run and its reload must tell the probe's observer everything an output
may want to know, as they tell the Sparkplug B nodes and the MQTT telemetry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.config.loader import GatewayPlan, MachinePlan, load_config
from gateway.core.model import Sample
from gateway.delivery import registry
from gateway.delivery.registry import Figures, Observer, Output, OutputKind, Wiring
from gateway.runtime.gateway import Gateway


class Probe(Observer):
    """Records every call the runtime makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.started = asyncio.Event()
        self.closed = asyncio.Event()

    def configure(self, plan: GatewayPlan) -> None:
        self.calls.append(("configure", sorted(m.id for m in plan.machines)))

    def samples(self, machine: MachinePlan, mapped: Sequence[Sample], now: float) -> None:
        self.calls.append(("samples", machine.id, sorted(s.signal for s in mapped)))

    def connection(self, machine: str, connected: bool) -> None:
        self.calls.append(("connection", machine, connected))

    def state(self, machine: str, snapshot: Mapping[str, Any]) -> None:
        self.calls.append(("state", machine))

    def removed(self, machine: str) -> None:
        self.calls.append(("removed", machine))

    def start(self) -> list[asyncio.Task[None]]:
        async def session() -> None:
            self.started.set()
            await asyncio.Event().wait()

        return [asyncio.create_task(session(), name="probe-session")]

    async def close(self, grace: float) -> None:
        self.closed.set()

    def report(self, metrics: Figures) -> None:
        self.calls.append(("report",))


MACHINE = (
    "  - {{id: {id}, area: a, line: l, profile: sewing-station,"
    " connection: {{protocol: modbus, host: 127.0.0.1, port: 1}}}}\n"
)


def _config(tmp_path: Path, *machines: str) -> Path:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "gateway: {id: gw-1, site: plant-1}\n"
        f"state_dir: {tmp_path}\n"
        "health: {listen: null}\n"
        "destinations:\n"
        "  - {name: a, host: 127.0.0.1, port: 1}\n"
        "machines:\n" + "".join(MACHINE.format(id=m) for m in machines)
    )
    return cfg


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    """A probe kind in the registry (removed again after the test)."""
    p = Probe()

    def build(w: Wiring) -> list[Output]:
        return [Output("probe", None, observer=p)]

    monkeypatch.setitem(registry.kinds(), "probe", OutputKind(lambda plan: [], build))
    return p


def test_the_runtime_feeds_an_observer_it_does_not_know(tmp_path: Path, probe: Probe) -> None:
    gw = Gateway(load_config(_config(tmp_path, "m1"), env={}))
    assert probe.calls == [("configure", ["m1"])]
    assert "probe" not in gw.publishers and gw.outputs["probe"].accepts("state") is False
    m = gw.machines["m1"]
    gw.devices.on_batch(m, [Sample("m1", "good_count", 3, 1.0)])
    assert ("samples", "m1", ["good_count"]) in probe.calls
    gw.devices._connected(m, False, "gone")
    assert ("connection", "m1", False) in probe.calls
    gw.retained.publish(m, m.tracker.snapshot(), 2.0)
    assert ("state", "m1") in probe.calls
    gw._report(3.0)
    assert ("report",) in probe.calls


async def test_an_observer_runs_closes_and_follows_a_reload(tmp_path: Path, probe: Probe) -> None:
    cfg = _config(tmp_path, "m1", "m2")
    gw = Gateway(load_config(cfg, env={}), shutdown_grace=0.2)
    stop = asyncio.Event()
    run = asyncio.create_task(gw.run(stop))
    async with asyncio.timeout(10):
        await probe.started.wait()
        assert "probe-session" in gw._core
        _config(tmp_path, "m1")
        assert await gw.reload()
        assert ("removed", "m2") in probe.calls
        assert probe.calls.count(("configure", ["m1"])) == 1
        stop.set()
        await run
    assert probe.closed.is_set()
    assert gw._core["probe-session"].done()
