"""Log set-up of the simulator commands: structlog, JSON off a terminal, readable on one.

The simulators stand in for machines, so they share nothing with the gateway but the
vocabulary of :mod:`gateway.core`; this is their own small copy of a logging set-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

#: Chatty libraries underneath: their info is noise next to the simulator's own lines.
_LIBRARIES = ("pymodbus", "asyncua", "asyncuagds", "amqtt", "transitions", "mqtt", "paho")


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger for a simulator process."""
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
