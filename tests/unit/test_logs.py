"""Log set-up: JSON lines with the component's name, and a level per component."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway.runtime import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = [
        "gateway.delivery.outbox",
        "gateway.runtime.commands",
        "gateway.runtime.gateway",
        "asyncua",
        "pymodbus",
    ]
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
        levels={"gateway.delivery.outbox": "debug", "gateway.runtime.commands": "error"},
    )
    structlog.get_logger("gateway.delivery.outbox").debug("outbox.detail", rows=3)
    structlog.get_logger("gateway.runtime.gateway").debug("runtime.detail")
    structlog.get_logger("gateway.runtime.gateway").info("runtime.info", machine="sew-01")
    structlog.get_logger("gateway.runtime.commands").warning("command.rejected")
    got = lines(out)
    assert [g["event"] for g in got] == ["outbox.detail", "runtime.info"]
    assert got[0]["logger"] == "gateway.delivery.outbox" and got[0]["level"] == "debug"
    assert got[1]["machine"] == "sew-01"


@pytest.mark.usefixtures("restore_logging")
def test_library_loggers_share_the_format() -> None:
    out = io.StringIO()
    logs.configure("info", json=True, stream=out)
    logging.getLogger("pymodbus").warning("library says %s", "hello")
    logging.getLogger("pymodbus").info("too chatty")
    (line,) = lines(out)
    assert line["event"] == "library says hello" and line["logger"] == "pymodbus"


def _fail() -> None:
    raise ZeroDivisionError("the detail")


@pytest.mark.parametrize("json_out", [True, False])
@pytest.mark.usefixtures("restore_logging")
def test_tracebacks_are_rendered_as_text(json_out: bool) -> None:
    """Library and gateway exceptions: the traceback's text, never a traceback object."""
    out = io.StringIO()
    logs.configure("info", json=json_out, stream=out)
    try:
        _fail()
    except ZeroDivisionError:
        logging.getLogger("pymodbus.client").error("library failed", exc_info=True)
        structlog.get_logger("gateway.runtime.gateway").exception("device.task_failed")
    text = out.getvalue()
    assert "<traceback object" not in text
    assert text.count("Traceback (most recent call last)") == 2
    assert text.count("ZeroDivisionError: the detail") == 2
    assert "in _fail" in text
    if json_out:
        library, gateway = lines(out)
        assert "exc_info" not in library and "ZeroDivisionError" in str(library["exception"])
        assert "ZeroDivisionError" in str(gateway["exception"])


class _BadSessionClosed(Exception):
    """Stands in for asyncua's status exception (the name is what counts)."""


@pytest.mark.usefixtures("restore_logging")
def test_asyncua_publish_loop_at_a_clean_stop_is_debug() -> None:
    out = io.StringIO()
    logs.configure("info", json=True, stream=out)
    session = logging.getLogger("asyncua.client.ua_session.UaSession")
    for exc in (_BadSessionClosed("BadSessionClosed"), ConnectionError("connection lost")):
        try:
            raise exc
        except Exception:
            session.exception("Publish iteration crashed; retrying in 1s")
    logging.getLogger("asyncua.client.ua_client.UASocketProtocol").warning(
        "ServiceFault (%s, diagnostics: %s) from server received %s",
        "BadSessionClosed",
        None,
        " in response to PublishRequest",
    )
    assert lines(out) == []
    try:
        raise ValueError("a real problem")
    except ValueError:
        session.exception("Publish iteration crashed; retrying in 1s")
    (line,) = lines(out)
    assert line["level"] == "warning" and "a real problem" in str(line["exception"])


@pytest.mark.usefixtures("restore_logging")
def test_asyncua_noise_is_visible_at_debug() -> None:
    out = io.StringIO()
    logs.configure("info", json=True, stream=out, levels={"asyncua": "debug"})
    logging.getLogger("asyncua.client.ua_client").warning("ServiceFault (x) from server")
    (line,) = lines(out)
    assert line["level"] == "debug"


def test_a_repeated_library_warning_passes_once_per_episode() -> None:
    now = [0.0]
    noise = logs.LibraryRecords(quiet=60.0, clock=lambda: now[0])

    def passes(name: str, msg: str, level: int = logging.WARNING) -> bool:
        record = logging.LogRecord(name, level, __file__, 1, msg, ("x",), None)
        return noise.filter(record) and record.levelno >= logging.WARNING

    assert passes("pymodbus.logging", "Connection to %s failed")
    now[0] = 30.0
    assert not passes("pymodbus.logging", "Connection to %s failed")
    assert passes("pymodbus.logging", "another message")
    assert passes("mqtt", "Connection to %s failed"), "another library, another episode"
    now[0] = 80.0  # 50 s after the last repeat: still the same episode
    assert not passes("pymodbus.logging", "Connection to %s failed")
    now[0] = 141.0  # quiet for more than 60 s: a new episode
    assert passes("pymodbus.logging", "Connection to %s failed")
    assert passes("gateway.runtime.gateway", "not a library", logging.WARNING)
    assert passes("gateway.runtime.gateway", "not a library", logging.WARNING)
