"""The ``logging:`` section: the level, the format and a level per component."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.units.context import Unit


@dataclass(frozen=True, slots=True)
class LoggingPlan:
    """What the log setup needs; the model has checked every value already."""

    level: str
    format: str
    levels: dict[str, str]


def compile_logging(unit: Unit) -> LoggingPlan:
    """The logging settings as the runtime takes them."""
    lg = unit.config.logging
    return LoggingPlan(level=lg.level, format=lg.format, levels=dict(lg.levels))
