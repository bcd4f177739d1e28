"""Unit tests of the simulated CNC machine (pure model, address space, profile fit)."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.vocabulary import MachineState
from shopfloor_gateway.simulators import cnc
from shopfloor_gateway.simulators.cnc import CncModel, generate_cnc_steps
from shopfloor_gateway.simulators.opcua_common import (
    NS_DI,
    NS_IA,
    NS_MACHINE_TOOL,
    NS_UA,
    AddressSpace,
    NodeSpec,
    check_value,
)
from shopfloor_gateway.simulators.scenario import (
    Changeover,
    Fault,
    Idle,
    Maintenance,
    RunOrder,
    ScenarioError,
    Stop,
    validate_script,
)

PROFILE = Path(__file__).resolve().parents[2] / "config" / "profiles" / "machine-tool-umati.yaml"


def script() -> list[Any]:
    """Two orders with a stop, a fault, a changeover and maintenance in between."""
    return [
        RunOrder("PO-1", target=5, piece_seconds=10.0, scrap_every=3, pieces=2),
        Stop(30.0),
        RunOrder("PO-1", target=5, piece_seconds=10.0, scrap_every=3, pieces=1),
        Fault(40.0, alarm_code=2010),
        RunOrder("PO-1", target=5, piece_seconds=10.0, scrap_every=3),
        Changeover(60.0),
        RunOrder("PO-2", target=3, piece_seconds=5.0, target_on_device=False),
        Maintenance(100.0),
    ]


def test_scripted_run_counts_parts_per_job() -> None:
    model = CncModel(script(), name="cnc-07")
    values = model.values()
    assert values[cnc.K_PROGRAM_STATE] == "Running"
    assert values[cnc.K_PROGRAM_STATE_NUMBER] == 1
    assert values[cnc.K_JOB_ID] == values[cnc.K_JOB_IDENTIFIER] == "PO-1"
    assert values[cnc.K_PROGRAM] == cnc.program_for("PO-1")
    # RunsPlanned counts every run (OPC 40501): 5 good at every third run scrap take 7.
    assert values[cnc.K_RUNS_PLANNED] == 7 and values[cnc.K_RUNS_PLANNED_VALID] is True
    assert values[cnc.K_PARTS_GOOD] == 0 and values[cnc.K_SPINDLE_ROTATING] is True

    model.advance(20.0)  # two parts, then the stop begins
    values = model.values()
    assert (values[cnc.K_PARTS_GOOD], values[cnc.K_PARTS_COMPLETED]) == (2, 2)
    assert values[cnc.K_PROGRAM_STATE] == "Interrupted"
    assert values[cnc.K_JOB_STATE] == "Interrupted"
    assert values[cnc.K_LAMP_ON["Yellow"]] is True and values[cnc.K_LAMP_ON["Green"]] is False
    assert values[cnc.K_SPINDLE_SPEED] == 0.0

    model.advance(60.0)  # the third part is scrap, then the fault
    values = model.values()
    assert (values[cnc.K_PARTS_GOOD], values[cnc.K_PARTS_COMPLETED]) == (2, 3)
    assert values[cnc.K_PROGRAM_STATE] == "Aborted"
    assert values[cnc.K_ALARM_CODE] == 2010
    assert values[cnc.K_ALARM_TEXT] == "Tool breakage detected"
    assert values[cnc.K_LAMP_ON["Red"]] is True
    assert model.state is MachineState.FAULT

    model.advance(100.0)  # fault over: parts 4.. run until 5 good (part 6 is scrap)
    assert model.values()[cnc.K_ALARM_CODE] == 0
    model.advance(160.0)
    values = model.values()
    assert (values[cnc.K_PARTS_GOOD], values[cnc.K_PARTS_COMPLETED]) == (5, 7)
    assert values[cnc.K_PROGRAM_STATE] == "Initializing"  # changeover
    assert values[cnc.K_OPERATION_MODE] == cnc.OPERATION_MODES["Setup"]
    assert values[cnc.K_JOB_STATE] == "Ended"
    assert model.truth["PO-1"].good == 5 and model.truth["PO-1"].scrap == 2

    model.advance(10_000.0)
    values = model.values()
    assert model.finished
    assert values[cnc.K_JOB_ID] == "PO-2" and values[cnc.K_PARTS_GOOD] == 3
    assert values[cnc.K_RUNS_PLANNED] == 0 and values[cnc.K_RUNS_PLANNED_VALID] is False
    assert values[cnc.K_PROGRAM_STATE] == "Ended"
    assert values[cnc.K_OPERATION_MODE] == cnc.OPERATION_MODES["Automatic"]
    assert [t.completed for t in model.truth.values()] == [True, True]


def test_maintenance_shows_service_mode() -> None:
    model = CncModel([Maintenance(50.0), Idle(10.0)])
    values = model.values()
    assert values[cnc.K_OPERATION_MODE] == cnc.OPERATION_MODES["Service"]
    assert values[cnc.K_PROGRAM_STATE] == "Ended"
    assert model.state is MachineState.MAINTENANCE


def test_lifetime_counter_counts_every_part() -> None:
    model = CncModel([RunOrder("PO-9", target=4, piece_seconds=1.0, scrap_every=2)])
    base = model.values()[cnc.K_LIFETIME]
    assert isinstance(base, int) and base > 0
    model.advance(100.0)
    assert model.values()[cnc.K_LIFETIME] == base + 7  # 4 good + 3 scrap


def run_generated(step: float, until: float, seed: int = 4) -> CncModel:
    model = CncModel(seed=seed, name="cnc-02")
    t = 0.0
    while t < until:
        t = min(until, t + step)
        model.advance(t)
    return model


def test_generated_shift_is_deterministic_and_tick_independent() -> None:
    coarse = run_generated(500.0, 20_000.0)
    fine = run_generated(7.3, 20_000.0)
    assert coarse.values() == fine.values()
    assert coarse.truth == fine.truth
    assert len(coarse.truth) >= 3
    other = run_generated(500.0, 20_000.0, seed=5)
    assert other.truth != coarse.truth


def test_generated_steps_are_valid_scripts() -> None:
    steps = list(islice(generate_cnc_steps(1, "cnc-01"), 200))
    validate_script(steps)
    assert any(isinstance(s, Fault) and s.alarm_code in cnc.ALARM_TEXTS for s in steps)


def test_every_value_fits_its_node_over_a_shift() -> None:
    model = CncModel(seed=11, name="cnc-03")
    specs = model.address_space.variables()
    for t in range(0, 30_000, 37):
        model.advance(float(t))
        values = model.values()
        assert values.keys() == specs.keys()
        for key, value in values.items():
            check_value(specs[key], value)


def test_bad_inputs_are_refused() -> None:
    model = CncModel()
    model.advance(10.0)
    with pytest.raises(ValueError, match="backwards"):
        model.advance(5.0)
    with pytest.raises(ValueError, match="finite"):
        model.advance(float("nan"))
    with pytest.raises(ScenarioError):
        CncModel([RunOrder("PO-1", 2, 1.0), RunOrder("PO-2", 2, 1.0), RunOrder("PO-1", 2, 1.0)])
    with pytest.raises(ValueError, match="name"):
        CncModel(name="")


def namespaces_of(space: AddressSpace, key: str) -> list[str]:
    (spec,) = [n for n in space.nodes if n.key == key]
    return [uri for uri, _ in spec.path]


def test_browse_names_follow_the_companion_specs() -> None:
    space = CncModel().address_space
    assert space.root_id == "MachineTool"
    assert namespaces_of(space, "Identification/SerialNumber") == [NS_DI, NS_DI]
    assert namespaces_of(space, cnc.K_PROGRAM) == [NS_MACHINE_TOOL] * 3
    assert namespaces_of(space, cnc.K_PROGRAM_STATE) == [NS_MACHINE_TOOL] * 3 + [NS_UA]
    assert namespaces_of(space, "Monitoring/Stacklight/StacklightMode")[-1] == NS_IA
    assert namespaces_of(space, cnc.K_PARTS_GOOD)[-1] == NS_MACHINE_TOOL
    # The vendor parts live in the simulator's own namespace.
    assert namespaces_of(space, cnc.K_ALARM_CODE)[-1] == cnc.CNC_NAMESPACE
    props = {n.key for n in space.nodes if n.is_property}
    assert {"Identification/SerialNumber", f"{cnc.K_RUNS_PLANNED}/IsValid"} <= props


def test_address_space_rejects_misordered_nodes() -> None:
    child = NodeSpec(((NS_UA, "A"), (NS_UA, "B")), "UInt32", 1)
    with pytest.raises(ValueError, match="before its parent"):
        AddressSpace("urn:x", "R", (NS_UA, "F"), "T", (child,))
    with pytest.raises(ValueError, match="not a valid UInt32"):
        check_value(NodeSpec(((NS_UA, "A"),), "UInt32", 1), -1)


# ---------------------------------------------------------------------------- profile


def resolve(browse_path: str, aliases: Mapping[str, str], space: AddressSpace) -> NodeSpec:
    """The node a profile browse path names (``0:`` is the OPC UA base namespace)."""
    wanted = []
    for part in browse_path.split("/"):
        prefix, _, name = part.partition(":")
        wanted.append((NS_UA if prefix == "0" else aliases[prefix], name))
    matches = [n for n in space.nodes if list(n.path) == wanted]
    assert matches, f"profile path {browse_path} names no simulator node"
    return matches[0]


def test_profile_paths_name_simulator_variables() -> None:
    profile = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    model = CncModel(script(), name="cnc-01")
    aliases = {"mt": NS_MACHINE_TOOL, "sim": cnc.CNC_NAMESPACE}
    signals = profile["signals"]
    for name, body in signals.items():
        spec = resolve(body["browse_path"], aliases, model.address_space)
        assert spec.is_variable, name
    # The state map turns the program state into the canonical state the model is in
    # (maintenance has no program state of its own: it shows as idle).
    state = signals["state"]
    seen = set()
    for t in range(0, 600, 3):
        model.advance(float(t))
        shown = model.values()[resolve(state["browse_path"], aliases, model.address_space).key]
        expected = model.state if model.state is not MachineState.MAINTENANCE else "idle"
        assert state["map"][shown] == expected
        seen.add(expected)
    assert {"running", "stopped", "fault", "setup", "idle"} <= seen
