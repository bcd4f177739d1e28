"""The README's probe commands reach the simulators of `make demo` when copied as they are."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from gateway.config import load_config
from gateway.demo import DEMO_CONFIG, _ports

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
