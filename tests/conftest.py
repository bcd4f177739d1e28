"""Shared pytest fixtures: a fresh private Mosquitto broker per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import BrokerNotFoundError, MosquittoBroker, free_port

__all__ = ["free_port", "mosquitto"]


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
