"""Unit tests of the simulated robot (pure model, address space, profile fit)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from itertools import islice
from pathlib import Path

import pytest
import yaml

from gateway.core.vocabulary import MachineState
from shopfloor_gateway.simulators import opcua_cli, robot
from shopfloor_gateway.simulators.opcua_common import (
    NS_DI,
    NS_ROBOTICS,
    NS_UA,
    AddressSpace,
    NodeSpec,
    ProductionEngine,
    check_value,
)
from shopfloor_gateway.simulators.robot import RobotModel, generate_robot_steps
from shopfloor_gateway.simulators.scenario import (
    Changeover,
    Fault,
    Idle,
    RunOrder,
    Stop,
    validate_script,
)

PROFILE = Path(__file__).resolve().parents[2] / "config" / "profiles" / "robot-opc40010.yaml"


def script() -> list[RunOrder | Stop | Fault | Changeover | Idle]:
    """Cycles of one program, a stop, an emergency stop, a protective stop, a new program."""
    return [
        RunOrder("PO-1", target=6, piece_seconds=8.0, pieces=2),
        Stop(20.0),
        RunOrder("PO-1", target=6, piece_seconds=8.0, pieces=1),
        Fault(30.0, alarm_code=robot.EMERGENCY_STOP_CODE),
        RunOrder("PO-1", target=6, piece_seconds=8.0, pieces=1),
        Fault(30.0, alarm_code=1205),
        RunOrder("PO-1", target=6, piece_seconds=8.0),
        Changeover(40.0),
        RunOrder("PO-2", target=2, piece_seconds=5.0),
        Idle(60.0, clear_order=True),
    ]


def test_task_safety_and_cycles_follow_the_script() -> None:
    model = RobotModel(script(), name="robot-03")
    values = model.values()
    base = values[robot.K_CYCLE_COUNTER]
    assert isinstance(base, int)
    assert values[robot.K_TASK_STATE] == "Executing"
    assert values[robot.K_PROGRAM] == robot.program_for("PO-1")
    assert values[robot.K_PROGRAM_LOADED] is True
    assert values[robot.K_OPERATIONAL_MODE] == robot.OPERATIONAL_MODES["AUTOMATIC"]

    model.advance(16.0)  # two cycles, then the stop
    values = model.values()
    assert values[robot.K_CYCLE_COUNTER] == base + 2
    assert values[robot.K_CYCLE_TIME] == 8.0
    assert values[robot.K_TASK_STATE] == "Ready"
    assert values[robot.K_PROTECTIVE_STOP] is False

    model.advance(44.0)  # one more cycle, then the emergency stop
    values = model.values()
    assert values[robot.K_CYCLE_COUNTER] == base + 3
    assert values[robot.K_EMERGENCY_STOP] is True and values[robot.K_PROTECTIVE_STOP] is True
    assert values[robot.K_ALARM_CODE] == robot.EMERGENCY_STOP_CODE
    assert values[robot.K_ALARM_TEXT] == "Emergency stop pressed"
    assert values[robot.K_IN_CONTROL] is False

    model.advance(82.0)  # one cycle, then the gripper fault: protective stop only
    values = model.values()
    assert values[robot.K_EMERGENCY_STOP] is False and values[robot.K_PROTECTIVE_STOP] is True
    assert values[robot.K_ALARM_TEXT] == "Gripper vacuum lost"

    model.advance(150.0)  # the rest of PO-1, then the changeover in teach mode
    values = model.values()
    assert values[robot.K_CYCLE_COUNTER] == base + 6
    assert values[robot.K_OPERATIONAL_MODE] == robot.OPERATIONAL_MODES["MANUAL_REDUCED_SPEED"]
    assert values[robot.K_ALARM_CODE] == 0

    model.advance(1_000.0)
    values = model.values()
    assert model.finished
    assert values[robot.K_CYCLE_COUNTER] == base + 8
    assert values[robot.K_TASK_STATE] == "Idle"
    assert values[robot.K_PROGRAM] == "" and values[robot.K_PROGRAM_LOADED] is False
    assert {o: (t.good, t.completed) for o, t in model.truth.items()} == {
        "PO-1": (6, True),
        "PO-2": (2, True),
    }


def run_generated(step: float, until: float, seed: int = 2) -> RobotModel:
    model = RobotModel(seed=seed, name="robot-01")
    t = 0.0
    while t < until:
        t = min(until, t + step)
        model.advance(t)
    return model


def test_generated_shift_is_deterministic_and_tick_independent() -> None:
    coarse = run_generated(900.0, 15_000.0)
    fine = run_generated(3.1, 15_000.0)
    assert coarse.values() == fine.values()
    assert coarse.truth == fine.truth
    assert len(coarse.truth) >= 3
    assert RobotModel(seed=2, name="robot-02").values() != RobotModel(seed=2).values()


def test_generated_steps_are_valid_scripts() -> None:
    steps = list(islice(generate_robot_steps(3, "robot-01"), 200))
    validate_script(steps)
    # The robot does not know orders: targets are never shown on the device.
    assert all(not s.target_on_device for s in steps if isinstance(s, RunOrder))


def test_every_value_fits_its_node_over_a_shift() -> None:
    model = RobotModel(seed=8)
    specs = model.address_space.variables()
    for t in range(0, 20_000, 13):
        model.advance(float(t))
        values = model.values()
        assert values.keys() == specs.keys()
        for key, value in values.items():
            check_value(specs[key], value)


def test_browse_names_follow_the_robotics_spec() -> None:
    space = RobotModel().address_space
    assert space.root_id == "MotionDeviceSystem"
    assert space.parent == (NS_DI, "DeviceSet")
    (program,) = [n for n in space.nodes if n.key == robot.K_PROGRAM]
    assert [uri for uri, _ in program.path] == [
        NS_ROBOTICS,
        robot.ROBOT_NAMESPACE,
        NS_ROBOTICS,
        robot.ROBOT_NAMESPACE,
        NS_DI,
        NS_ROBOTICS,
    ]
    (estop,) = [n for n in space.nodes if n.key == robot.K_EMERGENCY_STOP]
    assert [name for _, name in estop.path] == [
        "SafetyStates",
        "SafetyState_1",
        "ParameterSet",
        "EmergencyStop",
    ]


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
    model = RobotModel(script())
    aliases = {"rob": NS_ROBOTICS, "di": NS_DI, "sim": robot.ROBOT_NAMESPACE}
    signals = profile["signals"]
    for name, body in signals.items():
        assert resolve(body["browse_path"], aliases, model.address_space).is_variable, name
    state = signals["state"]
    key = resolve(state["browse_path"], aliases, model.address_space).key
    # Task state is all the profile sees: faults and set-up show as stopped (with an alarm
    # for the fault), maintenance as idle.
    expected = {
        MachineState.RUNNING: "running",
        MachineState.STOPPED: "stopped",
        MachineState.FAULT: "stopped",
        MachineState.SETUP: "stopped",
        MachineState.IDLE: "idle",
        MachineState.MAINTENANCE: "idle",
    }
    for t in range(0, 400, 2):
        model.advance(float(t))
        assert state["map"][model.values()[key]] == expected[model.state]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="lifetime_base"):
        ProductionEngine(None, iter(()), rng=random.Random(0), lifetime_base=-1)
    model = RobotModel()
    model.advance(5.0)
    with pytest.raises(ValueError, match="backwards"):
        model.advance(1.0)


def test_demo_helper_picks_the_simulator_of_a_profile() -> None:
    server = opcua_cli.server_for_profile("robot-opc40010", "robot-02", port=14850, seed=3)
    assert server is not None and isinstance(server.model, RobotModel)
    assert server.endpoint == "opc.tcp://127.0.0.1:14850/"
    assert opcua_cli.server_for_profile("sewing-station", "sew-01", port=15020) is None
