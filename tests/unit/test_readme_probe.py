"""The README's probe commands reach the simulators of `make demo` when copied as they are."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from gateway.cli.demo import DEMO_CONFIG, _ports
from gateway.config.loader import load_config

ROOT = Path(__file__).resolve().parents[2]


def _probe_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if "shopfloor probe " in line]


def test_readme_probes_name_ports_the_demo_listens_on(tmp_path: Path) -> None:
    plan = load_config(DEMO_CONFIG, env={"SHOPFLOOR_DEMO_STATE": str(tmp_path)})
    by_port = {port: name for name, _host, port in _ports(plan)}
    protocol = {m.id: m.connection.protocol for m in plan.machines}
    commands = _probe_commands()
    assert len(commands) >= 3
    for command in commands:
        match = re.search(r"probe (modbus|opcua) (\S+)", command)
        assert match, command
        kind, target = match.groups()
        port = urlparse(target).port
        assert port in by_port, f"{command!r}: the demo listens on none of {port}"
        assert protocol.get(by_port[port]) == kind, f"{command!r}: port {port} is not {kind}"


def test_the_checked_in_demo_config_is_the_one_the_demo_runs() -> None:
    assert (ROOT / "config" / "demo.yaml").read_bytes() == DEMO_CONFIG.read_bytes()


def test_readme_names_the_ports_the_demo_checks_and_its_metrics_url(tmp_path: Path) -> None:
    plan = load_config(DEMO_CONFIG, env={"SHOPFLOOR_DEMO_STATE": str(tmp_path)})
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    listed = re.search(r"The demo checks every port it needs \(([^)]*)\)", text)
    assert listed, "the README no longer lists the demo's ports"
    ports: set[int] = set()
    for first, last in re.findall(r"\b(\d{4,5})(?:-(\d{4,5}))?\b", listed.group(1)):
        ports.update(range(int(first), int(last or first) + 1))
    assert ports == {port for _name, _host, port in _ports(plan)}
    metrics = re.search(r"its metrics on <http://([\d.]+):(\d+)/metrics>", text)
    assert metrics, "the README no longer gives the demo's metrics URL"
    assert (metrics.group(1), int(metrics.group(2))) == plan.health_listen
