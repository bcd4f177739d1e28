"""Log set-up: JSON lines with the component's name, and a level per component."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = ["gateway.outbox", "gateway.commands", "gateway.runtime"]
    levels = {name: logging.getLogger(name).level for name in touched}
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_level_per_component_and_the_component_named_on_every_line() -> None:
    out = io.StringIO()
    logs.configure(
        "info",
        json=True,
        stream=out,
        levels={"gateway.outbox": "debug", "gateway.commands": "error"},
    )
    structlog.get_logger("gateway.outbox").debug("outbox.detail", rows=3)
    structlog.get_logger("gateway.runtime").debug("runtime.detail")
    structlog.get_logger("gateway.runtime").info("runtime.info", machine="sew-01")
    structlog.get_logger("gateway.commands").warning("command.rejected")
    got = lines(out)
    assert [g["event"] for g in got] == ["outbox.detail", "runtime.info"]
    assert got[0]["logger"] == "gateway.outbox" and got[0]["level"] == "debug"
    assert got[1]["machine"] == "sew-01"


@pytest.mark.usefixtures("restore_logging")
def test_library_loggers_share_the_format() -> None:
    out = io.StringIO()
    logs.configure("info", json=True, stream=out)
    logging.getLogger("pymodbus").warning("library says %s", "hello")
    logging.getLogger("pymodbus").info("too chatty")
    (line,) = lines(out)
    assert line["event"] == "library says hello" and line["logger"] == "pymodbus"
