"""Shared pytest fixtures: a fresh private Mosquitto broker per test; no collector pauses."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import BrokerNotFoundError, MosquittoBroker, free_port

__all__ = ["free_port", "mosquitto", "no_gc_pause"]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running Mosquitto on a free 127.0.0.1 port, stopped after the test."""
    try:
        broker = MosquittoBroker(tmp_path / "mosquitto")
    except BrokerNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(autouse=True, scope="module")
def _collect_between_modules() -> None:
    """Collect the garbage of the modules before this one before its tests start.

    Left alone, the collector lets it pile up and then walks it in the middle of some test:
    full collections of 2-2.5 M objects took 3.1-3.3 s late in the suite, long enough to break
    a test that runs a simulator on the wall clock. At module boundaries no clock is running.
    What survives is frozen: later full collections no longer walk it (the suite's imports,
    pytest's own state), which kept the longest pause inside a test near 1 s instead of 3.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture
def no_gc_pause() -> Iterator[None]:
    """No full collection of the test process's heap while the test runs.

    Late in the suite the pytest process holds the garbage of a thousand earlier tests
    (asyncua's above all): one automatic full collection took 3.3 s (2.5 M objects) in the
    middle of a test whose simulator runs on the wall clock, and a 0.5 s changeover passed
    unseen. The garbage is collected before the test, and the collector waits until after it.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
