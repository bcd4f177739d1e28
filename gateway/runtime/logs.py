"""structlog set-up: JSON lines when not on a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

#: Loggers of the libraries underneath (top-level names): their info is chatty, their
#: warnings pass once per episode (:class:`LibraryRecords`). ``mqtt`` is aiomqtt's logger
#: for paho; ``asyncuagds`` is asyncua's certificate validator (simulators).
LIBRARIES = ("pymodbus", "asyncua", "asyncuagds", "amqtt", "transitions", "mqtt", "paho")

#: OPC UA status names that mean "the session or link is closing": what asyncua's publish
#: loop meets at every clean stop or lost link, which the gateway reports itself.
_CLOSING_STATUS = (
    "BadSessionClosed",
    "BadSessionIdInvalid",
    "BadConnectionClosed",
    "BadSecureChannelClosed",
    "BadShutdown",
    "BadServerHalted",
    "BadCommunicationError",
)


class LibraryRecords(logging.Filter):
    """Library log records at sensible levels, repeats once per episode.

    - asyncua's ``ServiceFault ... from server received`` is debug: asyncua raises the
      status right after, and the gateway reports it with what to do
      (``opcua.auth_refused``, ``opcua.certificate_refused``, ``device.unreachable``).
    - asyncua's ``Publish iteration crashed`` is debug when the cause is a closing session
      or link (every clean stop, every lost link), otherwise a warning, not an error:
      asyncua retries by itself.
    - Any other library warning or error passes once; the same message (logger and
      template) again within ``quiet`` seconds of its last occurrence is debug. A problem
      that keeps recurring is one line per episode, not one per retry.

    A record turned into debug passes only when that logger is enabled for debug.
    """

    def __init__(self, quiet: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        """``quiet``: seconds without a message after which it counts as new again."""
        super().__init__()
        self._quiet = quiet
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Adjust the level of library records; keep every other record as it is."""
        if record.name.partition(".")[0] not in LIBRARIES:
            return True
        level = self._level(record)
        if level >= logging.WARNING:
            key = (record.name, str(record.msg))
            now = self._clock()
            last = self._seen.get(key)
            self._seen[key] = now
            if last is not None and now - last < self._quiet:
                level = logging.DEBUG
            if len(self._seen) > 1000:
                # Bounded: messages are templates, but a library may format into msg.
                self._seen = {k: t for k, t in self._seen.items() if now - t < self._quiet}
        if level != record.levelno:
            record.levelno = level
            record.levelname = logging.getLevelName(level)
            return logging.getLogger(record.name).isEnabledFor(level)
        return True

    @staticmethod
    def _level(record: logging.LogRecord) -> int:
        """The level this record deserves."""
        if not record.name.startswith("asyncua"):
            return record.levelno
        msg = str(record.msg)
        if msg.startswith("ServiceFault ("):
            return logging.DEBUG
        if msg.startswith("Publish iteration crashed"):
            exc = record.exc_info[1] if record.exc_info else None
            text = f"{type(exc).__name__} {exc}" if exc is not None else ""
            closing = isinstance(exc, ConnectionError) or any(s in text for s in _CLOSING_STATUS)
            return logging.DEBUG if closing else min(record.levelno, logging.WARNING)
        return record.levelno


def _level(name: str) -> int:
    return logging.getLevelNamesMapping().get(name.upper(), logging.INFO)


#: Packages installed under the project's name: ``adapters.modbus`` in a config (the folder's
#: name, as the logs showed it before) means the logger ``shopfloor_gateway.adapters.modbus``.
_INSTALLED_UNDER = {
    "adapters": "shopfloor_gateway.adapters",
    "simulators": "shopfloor_gateway.simulators",
}


def _component(name: str) -> str:
    """The logger name a ``logging.levels`` key means (old folder-relative names accepted)."""
    head, dot, rest = name.partition(".")
    return f"{_INSTALLED_UNDER[head]}{dot}{rest}" if head in _INSTALLED_UNDER else name


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
    names its component (``logger``: ``gateway.delivery.outbox``, ``adapters.modbus.adapter``...).

    ``levels`` sets a level per component, by logger name prefix
    (``{"gateway.delivery.outbox": "debug", "adapters.modbus": "warning"}``); the rest use
    ``level``.
    """
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    numeric = _level(level)
    per_component = {_component(name): _level(lvl) for name, lvl in (levels or {}).items()}
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
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Library records carry exc_info as a tuple; without this it is rendered as
            # "<traceback object at 0x...>". Plain text: no local variables (secrets).
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(LibraryRecords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party libraries are chatty at info; their warnings still come through (once
    # per episode, see LibraryRecords).
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name, lvl in per_component.items():
        logging.getLogger(name).setLevel(lvl)
