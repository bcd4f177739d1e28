"""Counter rules per signal: mode and wrap set on each counter, the profile's as default."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.loader import ConfigError, load_config
from gateway.core.model import Sample
from gateway.core.tracker import MachineTracker, TrackerSettings

M = "box-01"
T0 = 1_700_000_000.0

BOX = """\
gateway: {id: gw-1, site: plant-1}
broker: {host: 127.0.0.1}
machines:
  - id: box-01
    area: a
    line: l
    poll_interval: 1.0
    connection: {protocol: modbus, host: 127.0.0.1}
    tracker: {counter_mode: per_order}
    signals:
      order_id: {address: 0, type: string, length: 10}
      good_count: {address: 10, type: uint32}
      scrap_count: {address: 12, type: uint16, mode: lifetime, wrap: 16}
"""


def box_settings(tmp_path: Path, text: str = BOX) -> TrackerSettings:
    cfg = tmp_path / "box.yaml"
    cfg.write_text(text)
    (machine,) = load_config(cfg, env={}).machines
    return machine.tracker


def feed(tr: MachineTracker, t: float, **values: object) -> None:
    tr.observe([Sample(M, k, v, T0 + t) for k, v in values.items()], T0 + t)


def test_a_mixed_counter_box_loses_no_piece(tmp_path: Path) -> None:
    settings = box_settings(tmp_path)
    assert settings.counter_mode == "per_order"
    tr = MachineTracker(M, settings)
    # Gateway start: no order yet, the lifetime scrap counter shows years of scrap.
    feed(tr, 0, order_id="", good_count=0, scrap_count=65_530)
    feed(tr, 1, order_id="A", good_count=0, scrap_count=65_530)
    feed(tr, 2, good_count=1, scrap_count=65_530)  # the first good piece after the start
    feed(tr, 3, good_count=2, scrap_count=65_535)
    feed(tr, 4, good_count=3, scrap_count=2)  # the 16-bit scrap counter wrapped
    feed(tr, 4.5, good_count=3, scrap_count=2)  # (a count is credited once agreed)
    order = tr.snapshot()["order"]
    assert (order["good"], order["scrap"]) == (3, 8)
    # The next order: the per-order good counter restarts, the lifetime scrap goes on.
    feed(tr, 5, order_id="B", good_count=0, scrap_count=2)
    feed(tr, 6, good_count=1, scrap_count=3)
    feed(tr, 7, good_count=1, scrap_count=3)
    order = tr.snapshot()["order"]
    assert (order["order_id"], order["good"], order["scrap"]) == ("B", 1, 1)


def test_a_wrapping_counter_value_above_its_modulus_is_rejected(tmp_path: Path) -> None:
    tr = MachineTracker(M, box_settings(tmp_path))
    feed(tr, 0, order_id="A", good_count=70_000, scrap_count=70_000)
    (rejection,) = tr.drain_rejections()
    assert rejection.signal == "scrap_count" and "wrap" in rejection.reason


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("      scrap_count: {address: 12, type: uint16, mode: forever}", "mode"),
        ("      scrap_count: {address: 12, type: uint16, wrap: 12}", "wrap"),
        ("      spindle_temp: {address: 40, type: int16, wrap: 16}", "counter"),
    ],
)
def test_counter_rules_are_validated(tmp_path: Path, line: str, message: str) -> None:
    text = BOX.replace(BOX.splitlines()[-1], line)
    with pytest.raises(ConfigError, match=message):
        box_settings(tmp_path, text)


def test_settings_reject_unknown_counter_rules() -> None:
    with pytest.raises(ValueError, match="counter"):
        TrackerSettings(counter_rules=(("temperature", "lifetime", None),))
    with pytest.raises(ValueError, match="mode"):
        TrackerSettings(counter_rules=(("good_count", "sometimes", None),))
