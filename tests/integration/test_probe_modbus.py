"""``shopfloor probe modbus`` against the simulators."""

from __future__ import annotations

import argparse
import io

import pytest
import yaml

from shopfloor_gateway.adapters import probe
from shopfloor_gateway.simulators.modbus_server import LineStation, SimulatedLine
from shopfloor_gateway.simulators.plc import SimulatedPlc
from shopfloor_gateway.simulators.sewing import StationModel

pytestmark = pytest.mark.integration


async def _probe(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    out = io.StringIO()
    status = await probe.run(parser.parse_args(list(argv)), out)
    return status, out.getvalue()


async def test_read_shows_the_cdab_float_and_emits_config() -> None:
    async with SimulatedPlc(tick=3600) as plc:
        await plc.set_time(12.0)
        url = f"tcp://127.0.0.1:{plc.port}"
        status, text = await _probe("modbus", url, "--read", "40001:4", "--emit-config")
        assert status == 0
        assert f"{plc.values.temperature:.6g}" in text  # the float CDAB column of 40001
        snippet = yaml.safe_load(text[text.index("machines:") :])
        assert snippet["machines"][0]["signals"]["holding_0"] == {"ref": "40001", "type": "uint16"}
        status, text = await _probe("modbus", url, "--read", "40017:2")
        assert status == 1 and "illegal data address" in text and "counts from 1" in text


async def test_scan_finds_the_units_behind_a_converter() -> None:
    stations = [LineStation(n, u, StationModel(name=n)) for n, u in (("a", 2), ("b", 5))]
    async with SimulatedLine(stations, transport="rtu_over_tcp") as line:
        url = f"rtu+tcp://127.0.0.1:{line.port}"
        status, text = await _probe("modbus", url, "--scan-units", "1-6", "--timeout", "0.1")
    assert status == 0
    assert [row.split(":")[0] for row in text.splitlines()] == ["unit 2", "unit 5"]


async def test_refused_port_is_explained() -> None:
    status, text = await _probe("modbus", "tcp://127.0.0.1:1")
    assert status == 1 and "refused" in text and "Try:" in text
