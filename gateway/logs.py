"""structlog set-up: JSON lines when not on a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog


def _level(name: str) -> int:
    return logging.getLevelNamesMapping().get(name.upper(), logging.INFO)


def configure(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: Any = None,
    levels: Mapping[str, str] | None = None,
) -> None:
    """Configure structlog and the stdlib root logger once for the whole process.

    ``json=None`` picks JSON when the output is not a terminal (systemd, containers,
    files) and the console renderer when it is. Library loggers (pymodbus, aiomqtt,
    asyncua) go through the same pipeline so every line has one shape, and every line
    names its component (``logger``: ``gateway.outbox``, ``adapters.modbus.adapter``...).

    ``levels`` sets a level per component, by logger name prefix
    (``{"gateway.outbox": "debug", "adapters.modbus": "warning"}``); the rest use ``level``.
    """
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    numeric = _level(level)
    per_component = {name: _level(lvl) for name, lvl in (levels or {}).items()}
    # structlog drops calls below the lowest level anyone wants, cheaply; the stdlib level
    # of each component's logger then decides (filter_by_level).
    lowest = min([numeric, *per_component.values()])
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=bool(getattr(out, "isatty", lambda: False)()))
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party libraries are chatty at info; their warnings still come through.
    for name in ("pymodbus", "asyncua", "amqtt", "transitions"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name, lvl in per_component.items():
        logging.getLogger(name).setLevel(lvl)
