"""Compile a validated config into a :class:`~gateway.config.plans.GatewayPlan`.

The units under :mod:`gateway.config.units` each compile one section; this module runs them in
order and assembles the plan. Machines come first: when they have problems, the other sections
are not compiled (their messages would be noise next to a config that cannot run anyway).
"""

from __future__ import annotations

from pathlib import Path

from gateway.config.models import Config
from gateway.config.plans import GatewayPlan, MachinePlan
from gateway.config.telemetry import TelemetryPlan, idle_telemetry
from gateway.config.units.context import Unit
from gateway.config.units.destinations import broker_warnings, command_owners, compile_destinations
from gateway.config.units.health import compile_health
from gateway.config.units.influxdb import compile_influxdb
from gateway.config.units.logs import compile_logging
from gateway.config.units.machines import compile_machines
from gateway.config.units.outbox import compile_outbox
from gateway.config.units.secrets import check_pseudonymise, compile_redaction
from gateway.config.yamlsource import Located, SourceError
from gateway.core.routing import idle_operator_policies
from gateway.core.vocabulary import OPERATOR_SIGNAL


def compile_config(
    config: Config, src: Located, config_path: Path, errors: list[SourceError]
) -> GatewayPlan | None:
    """The plan, or ``None`` with every problem added to ``errors``."""
    unit = Unit(config, src, config_path, errors)
    machines = compile_machines(unit)
    if errors:
        return None
    destinations = compile_destinations(unit)
    # format: sparkplug destinations are an edge node each: no outbox queue, no commands.
    sparkplug = [d for d in destinations if d.sparkplug is not None]
    destinations = [d for d in destinations if d.sparkplug is None]
    if sparkplug and not destinations and not errors:
        unit.error(
            ("destinations",),
            "format: sparkplug destinations need a CloudEvents destination beside them "
            "(the order events and commands go there)",
        )
    outbox = compile_outbox(unit)
    secret = compile_redaction(unit)
    check_pseudonymise(unit, secret, any(d.route.operator == "pseudonymise" for d in destinations))
    influxdb = compile_influxdb(unit)
    destinations = command_owners(unit, destinations, machines)
    if errors or not destinations:
        return None
    broker_warnings(unit, [*destinations, *sparkplug])
    health = compile_health(unit, [d.name for d in destinations])
    logging = compile_logging(unit)
    if errors:
        return None
    _machine_warnings(unit, machines)
    unit.warnings += idle_operator_policies(
        (d.route for d in destinations), [mp.id for mp in machines if OPERATOR_SIGNAL in mp.signals]
    )
    configured = (
        bool(config.telemetry.model_fields_set)
        or any(p.telemetry is not None for p in config.profiles.values())
        or any(m.telemetry is not None for m in config.machines)
    )
    unit.warnings += idle_telemetry(configured, (d.route.rules.event_types for d in destinations))
    return GatewayPlan(
        source=src.file,
        gateway_id=config.gateway.id,
        site=config.gateway.site,
        topic_prefix=config.gateway.topic_prefix,
        broker=destinations[0].broker,
        machines=tuple(machines),
        log_level=logging.level,
        log_format=logging.format,
        warnings=tuple(unit.warnings),
        destinations=tuple(destinations),
        outbox=outbox,
        redaction_secret=secret,
        health_listen=health.listen,
        health_max_pending_age=health.max_pending_age,
        console=health.console,
        console_token=health.token,
        console_scope=health.commands_as,
        log_levels=logging.levels,
        influxdb=influxdb,
        sparkplug=tuple(sparkplug),
        telemetry=TelemetryPlan(
            config.telemetry.qos, config.telemetry.retain, config.telemetry.max_queue_mib
        ),
    )


def _machine_warnings(unit: Unit, machines: list[MachinePlan]) -> None:
    for mp in machines:
        unit.warnings += [f"machine {mp.id}: {w}" for w in mp.protocol.warn(mp.connection)]
