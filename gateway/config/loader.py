"""The gateway's one YAML config file: load it, validate it, compile it into a run plan.

Reading a config happens in three steps, and every step collects *all* problems instead of
stopping at the first, each with file, line and field path:

1. :mod:`gateway.config.yamlsource` parses YAML, remembering lines and refusing duplicate keys;
   ``${ENV}`` references are substituted (``$$`` is a literal ``$``).
2. Pydantic models (:mod:`gateway.config.models`, ``extra="forbid"``, frozen) check shape and
   types.
3. :func:`~gateway.config.compiler.compile_config` runs one compile unit per section
   (:mod:`gateway.config.units`): it resolves profiles, merges signals, validates each signal
   with its protocol's model, checks cross-field rules, and returns a frozen
   :class:`~gateway.config.plans.GatewayPlan`. Nothing at runtime looks at raw config.

This module is the entry point; it also re-exports the models and plans under their old names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config.compiler import compile_config
from gateway.config.models import (
    BrokerConfig,
    Config,
    DestinationConfig,
    GatewayConfig,
    HealthConfig,
    Identifier,
    LoggingConfig,
    MachineConfig,
    OutboxConfig,
    ProfileConfig,
    RedactionConfig,
    RoutingConfig,
    TlsConfig,
    TopicPrefix,
    TrackerConfig,
)
from gateway.config.plans import (
    BrokerPlan,
    DestinationPlan,
    GatewayPlan,
    MachinePlan,
    OutboxPlan,
    TlsPlan,
)
from gateway.config.units.context import is_loopback
from gateway.config.units.machines import BUILTIN_PROFILE_DIR, DEFAULT_POLL_INTERVAL
from gateway.config.units.outbox import default_state_dir
from gateway.config.validation import ConfigError, Hidden, substitute_env, validate
from gateway.config.yamlsource import SourceError, load

__all__ = [
    "BUILTIN_PROFILE_DIR",
    "DEFAULT_POLL_INTERVAL",
    "BrokerConfig",
    "BrokerPlan",
    "Config",
    "ConfigError",
    "DestinationConfig",
    "DestinationPlan",
    "GatewayConfig",
    "GatewayPlan",
    "HealthConfig",
    "Identifier",
    "LoggingConfig",
    "MachineConfig",
    "MachinePlan",
    "OutboxConfig",
    "OutboxPlan",
    "ProfileConfig",
    "RedactionConfig",
    "RoutingConfig",
    "TlsConfig",
    "TlsPlan",
    "TopicPrefix",
    "TrackerConfig",
    "default_state_dir",
    "is_loopback",
    "load_config",
    "redacted",
]


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayPlan:
    """Read, validate and compile a config file; raise :class:`ConfigError` with all problems."""
    env = os.environ if env is None else env
    src = load(path)
    if src.errors:
        raise ConfigError(src.errors)
    if not isinstance(src.data, dict):
        raise ConfigError(
            [SourceError(src.file, 1, "", "the config must be a mapping (key: value) at the top")]
        )
    errors: list[SourceError] = []
    src.data = substitute_env(src.data, (), env, src, errors)
    hidden = Hidden(src.data, src, env)
    config = validate(Config, src.data, src, (), errors)
    if config is None or errors:
        raise ConfigError(hidden.errors(errors))
    plan = compile_config(config, src, Path(path), errors)
    if errors or plan is None:
        raise ConfigError(hidden.errors(errors))
    # Warnings are printed by check and logged at start: the same rule as for errors.
    return replace(plan, warnings=tuple(hidden.scrub(w) for w in plan.warnings))


def redacted(plan: GatewayPlan) -> dict[str, Any]:
    """A summary of the plan safe to print or log: secrets are never included."""
    b = plan.broker
    return {
        "gateway_id": plan.gateway_id,
        "site": plan.site,
        "topic_prefix": plan.topic_prefix,
        "broker": {
            "host": b.host,
            "port": b.port,
            "client_id": b.client_id,
            "username": b.username,
            "password": "***" if b.password is not None else None,
            "tls": b.tls is not None,
        },
        "destinations": [
            {
                "name": d.name,
                "host": d.broker.host,
                "port": d.broker.port,
                "username": d.broker.username,
                "password": "***" if d.broker.password is not None else None,
                "tls": d.broker.tls is not None,
                "routing": {
                    "machines": list(d.route.rules.machines),
                    "event_types": list(d.route.rules.event_types),
                    "customers": list(d.route.rules.customers),
                    "order_ids": list(d.route.rules.order_ids),
                },
                "batch": d.route.batch,
                "operator": d.route.operator,
                "commands": d.commands,
            }
            for d in plan.destinations
        ],
        "outbox": str(plan.outbox.path) if plan.outbox is not None else None,
        "machines": [
            {
                "id": m.id,
                "location": f"{m.location.site}/{m.location.area}/{m.location.line}",
                "protocol": m.protocol.name,
                "profile": m.profile,
                "signals": sorted(m.signals),
                "poll_interval": m.poll_interval,
            }
            for m in plan.machines
        ],
    }
