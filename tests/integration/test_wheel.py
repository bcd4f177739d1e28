"""The wheel installs `shopfloor_gateway.adapters`/`.simulators`, no top-level `adapters`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once (pip, no dependencies; a few seconds)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (found,) = out.glob("shopfloor_gateway-*.whl")
    return found


def test_the_wheel_has_no_top_level_adapters_or_simulators(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert "adapters" not in tops and "simulators" not in tops, sorted(tops)
    assert {"gateway", "shopfloor_gateway"} <= tops
    assert "shopfloor_gateway/adapters/modbus/line.py" in names
    assert "shopfloor_gateway/simulators/cli.py" in names
    assert "gateway/data/profiles/sewing-station.yaml" in names


def test_the_unpacked_wheel_imports_and_names_its_protocols(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    (entry_points,) = tmp_path.glob("*.dist-info/entry_points.txt")
    assert "shopfloor_gateway.adapters.registry:MODBUS" in entry_points.read_text()
    # From the unpacked wheel alone (isolated: not the checkout, not the editable install).
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import shopfloor_gateway.adapters.registry as r, shopfloor_gateway.simulators.cli\n"
        "assert r.__file__.startswith(sys.path[0]), r.__file__\n"
        "print(sorted(r.PROTOCOLS))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['modbus', 'opcua']"
