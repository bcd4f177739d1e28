"""Simulated industrial robot with an address space shaped after OPC 40010-1 (Robotics).

Pure and deterministic: ``RobotModel.advance(t)`` moves the robot cell through its scenario
(the step types of :mod:`simulators.scenario`; one piece is one work cycle) and
``values()`` gives every variable's value by node key. The implemented subset of the
companion specification is documented in ``simulators/README.md`` ("Robot").

How the scenario shows on the robot (TaskControlStateMachine states Idle / Ready /
Executing; OperationalModeEnumeration 1 MANUAL_REDUCED_SPEED, 3 AUTOMATIC):

=============  ==========  ==============  ===================  ================
step           task state  program loaded  operational mode     safety
=============  ==========  ==============  ===================  ================
run_order      Executing   yes             AUTOMATIC            -
stop           Ready       yes             AUTOMATIC            -
fault          Ready       yes             AUTOMATIC            protective stop (alarm 1001:
                                                                emergency stop)
changeover     Ready       yes (next)      MANUAL_REDUCED_SPEED -
idle / done    Idle        no              AUTOMATIC            -
maintenance    Idle        no              MANUAL_REDUCED_SPEED -
=============  ==========  ==============  ===================  ================

The robot does not know orders: the task program name stands for the kind of part, and the
cycle counter is a lifetime counter. Order ids come from the platform (``assign-order``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Mapping, Sequence

from shopfloor_gateway.simulators.opcua_common import (
    NS_DI,
    NS_ROBOTICS,
    NS_UA,
    AddressSpace,
    EngineModel,
    NodeSpec,
    NodeValue,
    ProductionSnapshot,
    alarm_text_of,
    make_node,
    stable_pick,
)
from shopfloor_gateway.simulators.scenario import ShiftProfile, Step, generate_shift

#: Instance namespace of every simulated robot (string NodeIds, vendor variables).
ROBOT_NAMESPACE = "urn:shopfloor-gateway:simulator:robot"
#: String NodeId of the root object (a MotionDeviceSystemType instance).
ROOT_ID = "MotionDeviceSystem"

#: Namespace aliases used in this module's browse paths and in the profile.
ALIASES: Mapping[str, str] = {
    "ua": NS_UA,
    "di": NS_DI,
    "rob": NS_ROBOTICS,
    "sim": ROBOT_NAMESPACE,
}

#: OperationalModeEnumeration (OPC 40010-1).
OPERATIONAL_MODES: Mapping[str, int] = {
    "OTHER": 0,
    "MANUAL_REDUCED_SPEED": 1,
    "MANUAL_HIGH_SPEED": 2,
    "AUTOMATIC": 3,
    "AUTOMATIC_EXTERNAL": 4,
}
#: ExecutionModeEnumeration (OPC 40010-1).
EXECUTION_MODES: Mapping[str, int] = {"CYCLE": 0, "CONTINUOUS": 1, "STEP": 2}
#: MotionDeviceCategoryEnumeration value 1 = ARTICULATED_ROBOT.
ARTICULATED_ROBOT = 1
#: Alarm code that also presses the emergency stop (all other faults are protective stops).
EMERGENCY_STOP_CODE = 1001

#: Alarm codes of the generated day and their texts (documented in simulators/README.md).
ALARM_TEXTS: Mapping[int, str] = {
    EMERGENCY_STOP_CODE: "Emergency stop pressed",
    1101: "Light curtain interrupted",
    1205: "Gripper vacuum lost",
    1310: "Collision detected on axis 4",
}
_PROGRAMS = (
    "PICK_PLACE_A12",
    "PALLETIZE_EU1",
    "WELD_BRACKET_07",
    "DEBURR_HOUSING",
    "SCREW_COVER_M4",
)

# Activity -> (task state, program loaded, operational mode name).
_SHOWN: Mapping[str, tuple[str, bool, str]] = {
    "run": ("Executing", True, "AUTOMATIC"),
    "stop": ("Ready", True, "AUTOMATIC"),
    "fault": ("Ready", True, "AUTOMATIC"),
    "setup": ("Ready", True, "MANUAL_REDUCED_SPEED"),
    "idle": ("Idle", False, "AUTOMATIC"),
    "done": ("Idle", False, "AUTOMATIC"),
    "maintenance": ("Idle", False, "MANUAL_REDUCED_SPEED"),
}

_DEVICE = "rob:MotionDevices/sim:Robot_1"
_CONTROLLER = "rob:Controllers/sim:Controller_1"
_TASK = f"{_CONTROLLER}/rob:TaskControls/sim:TaskControl_1"
_SAFETY = "rob:SafetyStates/sim:SafetyState_1"


_node = functools.partial(make_node, ALIASES)


def _nameplate(base: str, model: str, serial: str) -> list[NodeSpec]:
    return [
        _node(f"{base}/di:Manufacturer", "LocalizedText", "Shopfloor Simulators", prop=True),
        _node(f"{base}/di:Model", "LocalizedText", model, prop=True),
        _node(f"{base}/di:SerialNumber", "String", serial, prop=True),
    ]


def build_address_space(serial: str) -> AddressSpace:
    """The robot's nodes below its root object (initial values only)."""
    nodes = [
        _node("rob:MotionDevices"),
        _node(_DEVICE),
        *_nameplate(_DEVICE, "SIM-R6 1400", f"R6-{serial}"),
        _node(f"{_DEVICE}/rob:MotionDeviceCategory", "Int32", ARTICULATED_ROBOT, prop=True),
        _node(f"{_DEVICE}/di:ParameterSet"),
        _node(f"{_DEVICE}/di:ParameterSet/rob:SpeedOverride", "Double", 100.0),
        _node(f"{_DEVICE}/di:ParameterSet/rob:OnPath", "Boolean", False),
        _node(f"{_DEVICE}/di:ParameterSet/rob:InControl", "Boolean", False),
        _node("rob:Controllers"),
        _node(_CONTROLLER),
        *_nameplate(_CONTROLLER, "SIM-RC 5", f"RC-{serial}"),
        _node(f"{_CONTROLLER}/di:ParameterSet"),
        _node(f"{_CONTROLLER}/di:ParameterSet/sim:AlarmCode", "UInt32", 0),
        _node(f"{_CONTROLLER}/di:ParameterSet/sim:AlarmText", "String", ""),
        _node(f"{_CONTROLLER}/rob:TaskControls"),
        _node(_TASK),
        _node(f"{_TASK}/di:ComponentName", "LocalizedText", "Main task", prop=True),
        _node(f"{_TASK}/di:ParameterSet"),
        _node(f"{_TASK}/di:ParameterSet/rob:TaskProgramName", "String", ""),
        _node(f"{_TASK}/di:ParameterSet/rob:TaskProgramLoaded", "Boolean", False),
        _node(f"{_TASK}/di:ParameterSet/rob:ExecutionMode", "Int32", EXECUTION_MODES["CONTINUOUS"]),
        _node(f"{_TASK}/di:ParameterSet/sim:CycleCounter", "UInt32", 0),
        _node(f"{_TASK}/di:ParameterSet/sim:CycleTime", "Double", 0.0),
        _node(f"{_TASK}/rob:TaskControlOperation"),
        _node(f"{_TASK}/rob:TaskControlOperation/rob:TaskControlStateMachine"),
        _node(
            f"{_TASK}/rob:TaskControlOperation/rob:TaskControlStateMachine/ua:CurrentState",
            "LocalizedText",
            "Idle",
        ),
        _node("rob:SafetyStates"),
        _node(_SAFETY),
        _node(f"{_SAFETY}/di:ParameterSet"),
        _node(f"{_SAFETY}/di:ParameterSet/rob:OperationalMode", "Int32", 3),
        _node(f"{_SAFETY}/di:ParameterSet/rob:EmergencyStop", "Boolean", False),
        _node(f"{_SAFETY}/di:ParameterSet/rob:ProtectiveStop", "Boolean", False),
    ]
    return AddressSpace(
        namespace=ROBOT_NAMESPACE,
        root_id=ROOT_ID,
        parent=(NS_DI, "DeviceSet"),
        root_type="MotionDeviceSystemType (OPC 40010-1)",
        nodes=tuple(nodes),
    )


def _key(path: str) -> str:
    return "/".join(part.partition(":")[2] for part in path.split("/"))


# Node keys the model writes (and tests and the profile read).
K_TASK_STATE = _key(f"{_TASK}/rob:TaskControlOperation/rob:TaskControlStateMachine/ua:CurrentState")
K_PROGRAM = _key(f"{_TASK}/di:ParameterSet/rob:TaskProgramName")
K_PROGRAM_LOADED = _key(f"{_TASK}/di:ParameterSet/rob:TaskProgramLoaded")
K_CYCLE_COUNTER = _key(f"{_TASK}/di:ParameterSet/sim:CycleCounter")
K_CYCLE_TIME = _key(f"{_TASK}/di:ParameterSet/sim:CycleTime")
K_OPERATIONAL_MODE = _key(f"{_SAFETY}/di:ParameterSet/rob:OperationalMode")
K_EMERGENCY_STOP = _key(f"{_SAFETY}/di:ParameterSet/rob:EmergencyStop")
K_PROTECTIVE_STOP = _key(f"{_SAFETY}/di:ParameterSet/rob:ProtectiveStop")
K_SPEED_OVERRIDE = _key(f"{_DEVICE}/di:ParameterSet/rob:SpeedOverride")
K_ON_PATH = _key(f"{_DEVICE}/di:ParameterSet/rob:OnPath")
K_IN_CONTROL = _key(f"{_DEVICE}/di:ParameterSet/rob:InControl")
K_ALARM_CODE = _key(f"{_CONTROLLER}/di:ParameterSet/sim:AlarmCode")
K_ALARM_TEXT = _key(f"{_CONTROLLER}/di:ParameterSet/sim:AlarmText")


def program_for(order_id: str) -> str:
    """Task program the robot runs for an order (the same on every run)."""
    return stable_pick(_PROGRAMS, order_id)


def alarm_text(code: int) -> str:
    """Text of an alarm code ("" for 0)."""
    return alarm_text_of(code, ALARM_TEXTS)


#: The robot cell's shift (many short work cycles; the robot does not know targets).
ROBOT_SHIFT = ShiftProfile(
    alarm_codes=tuple(sorted(ALARM_TEXTS)),
    maintenance_p=0.03,
    maintenance_s=(300.0, 900.0),
    idle_s=(30.0, 180.0),
    changeover_s=(20.0, 90.0),
    target=(40, 200),
    piece_s=(5.0, 15.0),
    piece_digits=2,
    scrap_every=(None, None, None, 50),
    target_shown_p=None,
    segment=(20, 80),
    jitter=0.05,
    fault_p=0.2,
    fault_s=(15.0, 120.0),
    stop_s=(10.0, 60.0),
)


def generate_robot_steps(seed: int, name: str) -> Iterator[Step]:
    """Endless realistic shift of a robot cell, determined by ``seed`` and ``name``."""
    return generate_shift(ROBOT_SHIFT, random.Random(f"robot-day:{seed}:{name}"))


class RobotModel(EngineModel):
    """One simulated robot cell advanced through a scenario in scenario time.

    A piece of the scenario is one work cycle. ``script=None`` runs the endless generated
    shift for ``seed`` and ``name``; a script runs once, then the task goes idle.
    """

    def __init__(
        self, script: Sequence[Step] | None = None, *, seed: int = 0, name: str = "robot-01"
    ) -> None:
        """Build the robot at scenario time 0 with its first step begun."""
        rng = random.Random(f"robot-identity:{seed}:{name}")
        super().__init__(
            script,
            generate_robot_steps(seed, name),
            seed=seed,
            name=name,
            kind="robot",
            lifetime_base=rng.randrange(100_000, 5_000_000),
        )
        self._use_address_space(build_address_space(f"{rng.randrange(100_000, 999_999)}"))

    def _dynamic(self, show: ProductionSnapshot) -> dict[str, NodeValue]:
        task_state, loaded, mode = _SHOWN[show.activity]
        loaded = loaded and bool(show.order_id)
        running = show.activity == "run"
        fault = show.activity == "fault"
        return {
            K_TASK_STATE: task_state if loaded or task_state == "Idle" else "Idle",
            K_PROGRAM: program_for(show.order_id) if loaded else "",
            K_PROGRAM_LOADED: loaded,
            K_CYCLE_COUNTER: show.lifetime,
            K_CYCLE_TIME: show.cycle_time,
            K_OPERATIONAL_MODE: OPERATIONAL_MODES[mode],
            K_EMERGENCY_STOP: fault and show.alarm_code == EMERGENCY_STOP_CODE,
            K_PROTECTIVE_STOP: fault,
            K_SPEED_OVERRIDE: 100.0 if running else 0.0,
            K_ON_PATH: running,
            K_IN_CONTROL: not fault,
            K_ALARM_CODE: show.alarm_code,
            K_ALARM_TEXT: alarm_text(show.alarm_code),
        }
