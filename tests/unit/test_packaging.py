"""The installed names: `adapters/` and `simulators/` install as `shopfloor_gateway.*`.

A distribution named ``adapters`` exists on PyPI: top-level packages of that name would
collide in site-packages. The folders stay where they are; pyproject.toml maps them
(setuptools ``package-dir``), the editable install maps the names for pytest and
import-linter, and two links that ``make`` creates under .venv/names give them to mypy.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway.runtime import logs

ROOT = Path(__file__).resolve().parents[2]
#: Folder of the checkout -> the name it is installed under.
INSTALLED = {
    "gateway": "gateway",
    "adapters": "shopfloor_gateway.adapters",
    "simulators": "shopfloor_gateway.simulators",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, name in INSTALLED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    return found


def test_pyproject_lists_every_package_under_its_installed_name() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(tool["packages"]) == _packages_on_disk()
    assert tool["package-dir"] == {
        "": ".",
        "shopfloor_gateway.adapters": "adapters",
        "shopfloor_gateway.simulators": "simulators",
    }


def test_the_installed_names_are_the_folders_of_this_checkout() -> None:
    # The editable install maps the names onto the folders (an import hook).
    import shopfloor_gateway.adapters
    import shopfloor_gateway.simulators

    for module, folder in (
        (shopfloor_gateway.adapters, "adapters"),
        (shopfloor_gateway.simulators, "simulators"),
    ):
        assert module.__file__ is not None
        assert Path(module.__file__).resolve() == (ROOT / folder / "__init__.py").resolve()


def test_mypy_sees_the_installed_names_through_the_links_make_creates() -> None:
    # mypy does not follow the import hook: `make` links the names where mypy_path points.
    mypy_path = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["mypy_path"]
    names = mypy_path.replace("$MYPY_CONFIG_FILE_DIR/", "")
    makefile = (ROOT / "Makefile").read_text()
    for folder in ("adapters", "simulators"):
        link = (
            f"$(CURDIR)/{folder} $(VENV)/{names.removeprefix('.venv/')}/shopfloor_gateway/{folder}"
        )
        assert link in makefile, link


_OLD_IMPORT = re.compile(r"(?m)^\s*(from|import)\s+(adapters|simulators)\b")


def test_nothing_imports_the_folders_by_their_old_top_level_names() -> None:
    offenders = []
    for folder in ("gateway", "adapters", "simulators", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if _OLD_IMPORT.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import shopfloor_gateway.adapters/.simulators instead: {offenders}"


def test_entry_points_name_the_installed_modules() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    targets = list(project["entry-points"]["shopfloor_gateway.protocols"].values())
    assert targets and all(t.startswith("shopfloor_gateway.adapters.") for t in targets)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = ["shopfloor_gateway.adapters.modbus", "shopfloor_gateway.simulators"]
    levels = {name: logging.getLogger(name).level for name in touched}
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.mark.usefixtures("restore_logging")
def test_a_log_level_by_the_folder_name_still_reaches_the_adapter() -> None:
    # Configs written before the rename say `adapters.modbus: debug` under logging.levels.
    out = io.StringIO()
    # Spelt in pieces: the import rename (a script) rewrites whole module names in strings.
    old_name = ".".join(("adapters", "modbus"))
    logs.configure("info", json=True, stream=out, levels={old_name: "debug"})
    structlog.get_logger("shopfloor_gateway.adapters.modbus.line").debug("modbus.detail")
    structlog.get_logger("gateway.runtime.gateway").debug("runtime.detail")
    got = [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]
    assert [g["event"] for g in got] == ["modbus.detail"]
