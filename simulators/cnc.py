"""Simulated CNC machine tool with an address space shaped after OPC 40501-1 (umati).

Pure and deterministic: ``CncModel.advance(t)`` moves the machine through its scenario
(the step types of :mod:`simulators.scenario`) and ``values()`` gives every variable's value
by node key. The subset of the companion specification implemented, with the spec's
browse names and structure, is documented in ``simulators/README.md`` ("CNC machine").

How the scenario shows on the machine (the umati ``ProductionStateMachineType`` numbers:
0 Initializing, 1 Running, 2 Ended, 3 Interrupted, 4 Aborted):

=============  ======================  ==============  ============  ==============
step           ActiveProgram state     OperationMode   ChannelState  stacklight
=============  ======================  ==============  ============  ==============
run_order      Running                 Automatic       Active        green
stop           Interrupted             Automatic       Interrupted   yellow
fault          Aborted                 Automatic       Interrupted   red (+ alarm)
changeover     Initializing            Setup           Reset         yellow
idle / done    Ended                   Automatic       Reset         none
maintenance    Ended                   Service         Reset         yellow
=============  ======================  ==============  ============  ==============
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Mapping, Sequence

from shopfloor_gateway.simulators.opcua_common import (
    NS_DI,
    NS_IA,
    NS_MACHINE_TOOL,
    NS_MACHINERY,
    NS_UA,
    AddressSpace,
    DataType,
    EngineModel,
    NodeSpec,
    NodeValue,
    ProductionSnapshot,
    alarm_text_of,
    make_node,
    stable_pick,
)
from shopfloor_gateway.simulators.scenario import ShiftProfile, Step, generate_shift

#: Instance namespace of every simulated CNC machine (string NodeIds, vendor variables).
CNC_NAMESPACE = "urn:shopfloor-gateway:simulator:cnc"
#: String NodeId of the machine root object (a MachineToolType instance).
ROOT_ID = "MachineTool"

#: Namespace aliases used in this module's browse paths and in the profile.
ALIASES: Mapping[str, str] = {
    "ua": NS_UA,
    "di": NS_DI,
    "machinery": NS_MACHINERY,
    "ia": NS_IA,
    "mt": NS_MACHINE_TOOL,
    "sim": CNC_NAMESPACE,
}

#: ProductionStateMachineType states (OPC 40501-1) by number.
PRODUCTION_STATES: Mapping[int, str] = {
    0: "Initializing",
    1: "Running",
    2: "Ended",
    3: "Interrupted",
    4: "Aborted",
}
#: MachineOperationMode enumeration (OPC 40501-1).
OPERATION_MODES: Mapping[str, int] = {
    "Manual": 0,
    "Automatic": 1,
    "Setup": 2,
    "AutoWithManualIntervention": 3,
    "Service": 4,
    "Other": 5,
}
#: ChannelState enumeration (OPC 40501-1).
CHANNEL_STATES: Mapping[str, int] = {"Active": 0, "Interrupted": 1, "Reset": 2}
#: ChannelMode enumeration value used (OPC 40501-1: 0 Automatic).
CHANNEL_MODE_AUTOMATIC = 0
#: SignalColor enumeration (OPC 10000-200 IA) of the three lamps, top to bottom.
LAMP_COLORS: tuple[tuple[str, int], ...] = (("Red", 1), ("Yellow", 4), ("Green", 2))
#: StacklightOperationMode 0 = Segmented (each lamp on its own).
STACKLIGHT_SEGMENTED = 0

MANUFACTURER = "Shopfloor Simulators"

#: Alarm codes of the generated day and their texts (documented in simulators/README.md).
ALARM_TEXTS: Mapping[int, str] = {
    2010: "Tool breakage detected",
    3001: "Coolant level low",
    4075: "Axis X following error",
    7002: "Door interlock open",
}
_PROGRAMS = (
    "O1001_FLANGE.MPF",
    "O1002_BRACKET.MPF",
    "O2040_HOUSING.MPF",
    "O3107_SHAFT.MPF",
    "O4711_COVER.MPF",
)

# Activity -> (ActiveProgram state number, OperationMode name, ChannelState name, lamp).
_SHOWN: Mapping[str, tuple[int, str, str, str | None]] = {
    "run": (1, "Automatic", "Active", "Green"),
    "stop": (3, "Automatic", "Interrupted", "Yellow"),
    "fault": (4, "Automatic", "Interrupted", "Red"),
    "setup": (0, "Setup", "Reset", "Yellow"),
    "idle": (2, "Automatic", "Reset", None),
    "done": (2, "Automatic", "Reset", None),
    "maintenance": (2, "Service", "Reset", "Yellow"),
}


# The running job's nodes below ProductionPlan/ActiveJob (ProductionJobType, OPC 40501-1).
_JOB_NODES: tuple[tuple[str, DataType | None, NodeValue | None, bool], ...] = (
    ("mt:Identifier", "String", "", True),
    ("mt:NumberInList", "UInt16", 0, True),
    ("mt:RunsCompleted", "UInt32", 0, False),
    ("mt:RunsPlanned", "UInt32", 0, False),
    ("mt:RunsPlanned/mt:IsValid", "Boolean", False, True),
    ("mt:PartsCompleted", "UInt32", 0, False),
    ("mt:PartsGood", "UInt32", 0, False),
    ("mt:State", None, None, False),
    ("mt:State/ua:CurrentState", "LocalizedText", "", False),
    ("mt:State/ua:CurrentState/ua:Number", "UInt32", 2, True),
)


_node = functools.partial(make_node, ALIASES)


def _lamp(index: int, color: str, code: int) -> list[NodeSpec]:
    base = f"mt:Monitoring/mt:Stacklight/sim:Lamp_{color}"
    return [
        _node(base),
        _node(f"{base}/ua:NumberInList", "UInt16", index, prop=True),
        _node(f"{base}/ia:SignalColor", "Int32", code),
        _node(f"{base}/ia:SignalOn", "Boolean", False),
    ]


def build_address_space(name: str, *, serial: str, year: int) -> AddressSpace:
    """The CNC's nodes below its root object (initial values only)."""
    nodes = [
        _node("di:Identification"),
        _node(
            "di:Identification/di:Manufacturer", "LocalizedText", "Shopfloor Simulators", prop=True
        ),
        _node("di:Identification/di:Model", "LocalizedText", "SIM-5X 800", prop=True),
        _node("di:Identification/di:SerialNumber", "String", serial, prop=True),
        _node(
            "di:Identification/di:ProductInstanceUri",
            "String",
            f"urn:shopfloor-gateway:simulator:cnc:{serial}",
            prop=True,
        ),
        _node("di:Identification/di:SoftwareRevision", "String", "1.4.2", prop=True),
        _node("di:Identification/machinery:YearOfConstruction", "UInt16", year, prop=True),
        _node("di:Identification/machinery:Location", "String", name, prop=True),
        _node("mt:Monitoring"),
        _node("mt:Monitoring/mt:MachineTool"),
        _node("mt:Monitoring/mt:MachineTool/mt:OperationMode", "Int32", 1),
        _node("mt:Monitoring/mt:MachineTool/mt:PowerOnDuration", "UInt32", 0),
        _node("mt:Monitoring/mt:MachineTool/mt:FeedOverride", "Double", 100.0),
        _node("mt:Monitoring/mt:Stacklight"),
        _node("mt:Monitoring/mt:Stacklight/ia:StacklightMode", "Int32", STACKLIGHT_SEGMENTED),
        *[
            spec
            for index, (color, code) in enumerate(LAMP_COLORS)
            for spec in _lamp(index, color, code)
        ],
        _node("mt:Monitoring/sim:Channel_1"),
        _node("mt:Monitoring/sim:Channel_1/mt:Name", "String", "Channel 1", prop=True),
        _node("mt:Monitoring/sim:Channel_1/mt:ChannelState", "Int32", 2),
        _node("mt:Monitoring/sim:Channel_1/mt:ChannelMode", "Int32", CHANNEL_MODE_AUTOMATIC),
        _node("mt:Monitoring/sim:Channel_1/mt:FeedOverride", "Double", 100.0),
        _node("mt:Monitoring/sim:Channel_1/mt:RapidOverride", "Double", 100.0),
        _node("mt:Monitoring/sim:Spindle_1"),
        _node("mt:Monitoring/sim:Spindle_1/mt:Name", "String", "Spindle 1", prop=True),
        _node("mt:Monitoring/sim:Spindle_1/mt:IsRotating", "Boolean", False),
        _node("mt:Monitoring/sim:Spindle_1/mt:Override", "Double", 100.0),
        _node("mt:Monitoring/sim:Spindle_1/sim:SpindleSpeed", "Double", 0.0),
        _node("mt:Production"),
        _node("mt:Production/mt:ActiveProgram"),
        _node("mt:Production/mt:ActiveProgram/mt:Name", "String", ""),
        _node("mt:Production/mt:ActiveProgram/mt:NumberInList", "UInt16", 0, prop=True),
        _node("mt:Production/mt:ActiveProgram/mt:JobIdentifier", "String", ""),
        _node("mt:Production/mt:ActiveProgram/mt:State"),
        _node("mt:Production/mt:ActiveProgram/mt:State/ua:CurrentState", "LocalizedText", ""),
        _node(
            "mt:Production/mt:ActiveProgram/mt:State/ua:CurrentState/ua:Number",
            "UInt32",
            2,
            prop=True,
        ),
        _node("mt:Production/mt:ProductionPlan"),
        _node("mt:Production/mt:ProductionPlan/sim:ActiveJob"),
        *[
            _node(f"mt:Production/mt:ProductionPlan/sim:ActiveJob/{path}", kind, value, prop=prop)
            for path, kind, value, prop in _JOB_NODES
        ],
        _node("mt:Production/mt:Statistics"),
        _node("mt:Production/mt:Statistics/mt:PartsProducedInLifetime", "UInt32", 0),
        _node("mt:Notification"),
        _node("mt:Notification/mt:Messages", events=True),
        _node("mt:Notification/mt:Messages/sim:AlarmCode", "UInt32", 0),
        _node("mt:Notification/mt:Messages/sim:AlarmText", "String", ""),
    ]
    return AddressSpace(
        namespace=CNC_NAMESPACE,
        root_id=ROOT_ID,
        parent=(NS_MACHINERY, "Machines"),
        root_type="MachineToolType (OPC 40501-1)",
        nodes=tuple(nodes),
    )


# Node keys the models write (and tests and the profile read).
K_PROGRAM = "Production/ActiveProgram/Name"
K_JOB_ID = "Production/ActiveProgram/JobIdentifier"
K_PROGRAM_STATE = "Production/ActiveProgram/State/CurrentState"
K_PROGRAM_STATE_NUMBER = "Production/ActiveProgram/State/CurrentState/Number"
_JOB = "Production/ProductionPlan/ActiveJob"
K_JOB_IDENTIFIER = f"{_JOB}/Identifier"
K_RUNS_COMPLETED = f"{_JOB}/RunsCompleted"
K_RUNS_PLANNED = f"{_JOB}/RunsPlanned"
K_RUNS_PLANNED_VALID = f"{_JOB}/RunsPlanned/IsValid"
K_PARTS_COMPLETED = f"{_JOB}/PartsCompleted"
K_PARTS_GOOD = f"{_JOB}/PartsGood"
K_JOB_STATE = f"{_JOB}/State/CurrentState"
K_JOB_STATE_NUMBER = f"{_JOB}/State/CurrentState/Number"
K_LIFETIME = "Production/Statistics/PartsProducedInLifetime"
K_OPERATION_MODE = "Monitoring/MachineTool/OperationMode"
K_POWER_ON = "Monitoring/MachineTool/PowerOnDuration"
K_CHANNEL_STATE = "Monitoring/Channel_1/ChannelState"
K_FEED_OVERRIDE = "Monitoring/Channel_1/FeedOverride"
K_SPINDLE_ROTATING = "Monitoring/Spindle_1/IsRotating"
K_SPINDLE_SPEED = "Monitoring/Spindle_1/SpindleSpeed"
K_ALARM_CODE = "Notification/Messages/AlarmCode"
K_ALARM_TEXT = "Notification/Messages/AlarmText"
K_LAMP_ON = {color: f"Monitoring/Stacklight/Lamp_{color}/SignalOn" for color, _ in LAMP_COLORS}


def program_for(order_id: str) -> str:
    """NC program the machine runs for an order (the same on every run)."""
    return stable_pick(_PROGRAMS, order_id)


def spindle_speed_for(program: str) -> float:
    """Nominal spindle speed (rpm) of a program."""
    return float(random.Random(f"rpm:{program}").randrange(2_000, 12_001, 250))


def alarm_text(code: int) -> str:
    """Text of an alarm code ("" for 0)."""
    return alarm_text_of(code, ALARM_TEXTS)


#: The CNC's shift (machining centre: few, long pieces).
CNC_SHIFT = ShiftProfile(
    alarm_codes=tuple(sorted(ALARM_TEXTS)),
    maintenance_p=0.05,
    maintenance_s=(300.0, 900.0),
    idle_s=(60.0, 300.0),
    changeover_s=(60.0, 240.0),
    target=(5, 40),
    piece_s=(20.0, 90.0),
    piece_digits=1,
    scrap_every=(None, None, 8, 15),
    target_shown_p=0.95,
    segment=(4, 15),
    jitter=0.05,
    fault_p=0.2,
    fault_s=(60.0, 300.0),
    stop_s=(30.0, 180.0),
)


def generate_cnc_steps(seed: int, name: str) -> Iterator[Step]:
    """Endless realistic shift of a machining centre, determined by ``seed`` and ``name``."""
    return generate_shift(CNC_SHIFT, random.Random(f"cnc-day:{seed}:{name}"))


class CncModel(EngineModel):
    """One simulated CNC machine advanced through a scenario in scenario time.

    ``script=None`` runs the endless generated shift for ``seed`` and ``name``; a script
    runs its steps once, then the machine ends its program and ``finished`` becomes true.
    """

    def __init__(
        self, script: Sequence[Step] | None = None, *, seed: int = 0, name: str = "cnc-01"
    ) -> None:
        """Build the machine at scenario time 0 with its first step begun."""
        rng = random.Random(f"cnc-identity:{seed}:{name}")
        super().__init__(
            script,
            generate_cnc_steps(seed, name),
            seed=seed,
            name=name,
            kind="cnc",
            lifetime_base=rng.randrange(10_000, 500_000),
        )
        self._power_on_hours = rng.randrange(2_000, 40_000)
        self._use_address_space(
            build_address_space(
                name,
                serial=f"SIM5X-{rng.randrange(100_000, 999_999)}",
                year=rng.randint(2012, 2024),
            )
        )

    def _dynamic(self, show: ProductionSnapshot) -> dict[str, NodeValue]:
        state_number, mode, channel, lamp = _SHOWN[show.activity]
        program = program_for(show.order_id) if show.order_id else ""
        running = show.activity == "run"
        truth = self.truth.get(show.order_id)
        if not show.order_id:
            job_state = 2
        elif truth is not None and truth.completed:
            job_state = 2  # Ended
        elif running:
            job_state = 1
        else:
            job_state = 3  # Interrupted: the job is open but the machine is not cutting
        parts = show.good + show.scrap
        values: dict[str, NodeValue] = {
            K_PROGRAM: program,
            K_JOB_ID: show.order_id,
            K_PROGRAM_STATE: PRODUCTION_STATES[state_number],
            K_PROGRAM_STATE_NUMBER: state_number,
            K_JOB_IDENTIFIER: show.order_id,
            # One part per program run: runs and parts count alike. RunsPlanned counts every
            # run, good and scrap (OPC 40501): the runs the job needs for its good target at
            # its scrap rate, so RunsCompleted reaches it when the job ends.
            K_RUNS_COMPLETED: parts,
            K_RUNS_PLANNED: show.planned,
            K_RUNS_PLANNED_VALID: show.planned > 0,
            K_PARTS_COMPLETED: parts,
            K_PARTS_GOOD: show.good,
            K_JOB_STATE: PRODUCTION_STATES[job_state],
            K_JOB_STATE_NUMBER: job_state,
            K_LIFETIME: show.lifetime,
            K_OPERATION_MODE: OPERATION_MODES[mode],
            K_POWER_ON: self._power_on_hours + int(self.time // 3600),
            K_CHANNEL_STATE: CHANNEL_STATES[channel],
            K_SPINDLE_ROTATING: running,
            K_SPINDLE_SPEED: spindle_speed_for(program) if running else 0.0,
            K_ALARM_CODE: show.alarm_code,
            K_ALARM_TEXT: alarm_text(show.alarm_code),
        }
        for color, key in K_LAMP_ON.items():
            values[key] = color == lamp
        return values
