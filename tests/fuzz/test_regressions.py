"""Crashes the fuzz targets found, kept as tests that always run.

Config loader: a self-referencing YAML alias and a control character in the file used to
escape as RecursionError / yaml ReaderError; both are ConfigErrors now.

A test marked ``xfail(strict=True)`` documents a finding that is not fixed yet in a module
this suite does not own; once it is fixed the test passes, strict xfail turns that into a
failure, and the marker must go.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.contract import CommandError, decode_command
from gateway.watch import FloorView

#: Deeply nested JSON well inside the 16 KiB command size limit: ``json.loads`` recurses
#: once per level and raises RecursionError (not ValueError) past about 1000 levels.
DEEP = b"[" * 5000


def test_deeply_nested_command_payload_is_a_command_error() -> None:
    with pytest.raises(CommandError):
        decode_command("assign-order", DEEP)


def test_deeply_nested_payload_is_malformed_not_an_internal_error() -> None:
    view = FloorView("sf")
    view.apply("sf/s/a/l/m/state", DEEP, False)
    assert view.stats.malformed == 1
    assert not any("internal error" in p for p in view.problems), list(view.problems)


def test_a_recursive_yaml_alias_is_a_config_error() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gw.yaml"
        path.write_text("gateway: &a [*a]\n")
        with pytest.raises(ConfigError):
            load_config(path, env={})


def test_a_control_character_in_the_file_is_a_config_error() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gw.yaml"
        path.write_text("gateway:\x1f\n")
        with pytest.raises(ConfigError):
            load_config(path, env={})
