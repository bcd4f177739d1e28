"""The ``outbox:`` and ``state_dir:`` keys: where the durable outbox lives and how big it is."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gateway.config.plans import OutboxPlan
from gateway.config.units.context import Unit


def default_state_dir(config_path: Path, env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``), else ``var/`` beside the config.

    Never a fixed system path picked by looking around: two gateways (or a test run next to
    an installed service) must not share one outbox by accident.
    """
    env = os.environ if env is None else env
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    return config_path.resolve().parent / "var"


def compile_outbox(unit: Unit) -> OutboxPlan:
    """The outbox file (``outbox.path``, else ``{state_dir}/shopfloor-outbox.db``) and bounds."""
    config = unit.config
    if config.state_dir is not None:
        state_dir = unit.relative(config.state_dir)
    else:
        state_dir = default_state_dir(unit.config_path)
    o = config.outbox
    path = unit.relative(o.path) if o.path is not None else state_dir / "shopfloor-outbox.db"
    return OutboxPlan(path=path, max_events=o.max_events, delayed_after=o.delayed_after)
