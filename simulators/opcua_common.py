"""Pure parts shared by the OPC UA simulators (CNC after OPC 40501, robot after OPC 40010).

Nothing here does I/O or reads a clock:

- ``NodeSpec`` / ``AddressSpace``: the shape of a simulated machine's address space as plain
  data (browse path with a namespace URI per segment, a stable string NodeId, data type,
  property or component). :mod:`simulators.opcua_server` turns it into asyncua nodes.
- ``ProductionEngine``: a machine working through scenario steps (the step types and
  validation of :mod:`simulators.scenario`, shared with the sewing stations) in scenario time.
  It counts pieces per order exactly whatever the tick size and keeps the ground truth per
  order. The CNC and robot models turn its snapshot into node values.
- ``OpcUaMachineModel``: the protocol both models satisfy and the server shell relies on.

String NodeIds are the node's browse path below the machine root without namespace
prefixes (``MachineTool/Production/ActiveProgram/Name``), in the simulator's own instance
namespace. They do not contain the machine's name, so one profile fits every simulated
machine of a kind.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from gateway.model import MachineState
from simulators.scenario import (
    Changeover,
    Fault,
    Idle,
    Maintenance,
    RunOrder,
    Step,
    Stop,
    validate_script,
)

#: Namespace URIs of the companion specifications whose browse names the simulators use.
NS_UA = "http://opcfoundation.org/UA/"
NS_DI = "http://opcfoundation.org/UA/DI/"
NS_MACHINERY = "http://opcfoundation.org/UA/Machinery/"
NS_IA = "http://opcfoundation.org/UA/IA/"
NS_MACHINE_TOOL = "http://opcfoundation.org/UA/MachineTool/"
NS_ROBOTICS = "http://opcfoundation.org/UA/Robotics/"

#: Data types a simulated variable may have (asyncua ``VariantType`` member names).
DataType = Literal[
    "Boolean", "Byte", "UInt16", "UInt32", "Int32", "Double", "String", "LocalizedText"
]
NodeValue = bool | int | float | str

_UINT32_MAX = 0xFFFF_FFFF
_RANGES: Mapping[str, tuple[int, int]] = {
    "Byte": (0, 0xFF),
    "UInt16": (0, 0xFFFF),
    "UInt32": (0, _UINT32_MAX),
    "Int32": (-(2**31), 2**31 - 1),
}


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node below the machine root: browse path, data type and initial value.

    ``path`` holds ``(namespace_uri, browse_name)`` per segment relative to the root;
    ``datatype=None`` makes an object, anything else a variable. ``is_property`` chooses
    HasProperty (spec properties such as ``Identifier``) over HasComponent.
    """

    path: tuple[tuple[str, str], ...]
    datatype: DataType | None = None
    value: NodeValue | None = None
    is_property: bool = False
    event_notifier: bool = False

    @property
    def key(self) -> str:
        """The browse names joined with "/": the key of ``values()`` and the NodeId suffix."""
        return "/".join(name for _, name in self.path)

    @property
    def is_variable(self) -> bool:
        """True for a variable, false for an object."""
        return self.datatype is not None


@dataclass(frozen=True, slots=True)
class AddressSpace:
    """A machine's address space below its root object, parents before children."""

    #: Namespace of the instance nodes (string NodeIds and vendor browse names).
    namespace: str
    #: String NodeId of the root object; every other NodeId is ``f"{root_id}/{key}"``.
    root_id: str
    #: ``(namespace_uri, browse_name)`` of the folder the root object is organised under.
    parent: tuple[str, str]
    #: Type of the machine the root stands for (documentation and the root's description).
    root_type: str
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        """Check that keys are unique and every parent comes before its children."""
        seen: set[str] = set()
        for node in self.nodes:
            if not node.path:
                raise ValueError("a node needs a non-empty path")
            if node.key in seen:
                raise ValueError(f"duplicate node {node.key!r}")
            parent = "/".join(name for _, name in node.path[:-1])
            if parent and parent not in seen:
                raise ValueError(f"node {node.key!r} comes before its parent {parent!r}")
            seen.add(node.key)
            if node.is_variable and node.value is None:
                raise ValueError(f"variable {node.key!r} needs an initial value")

    def node_id(self, key: str) -> str:
        """String NodeId (identifier part) of the node with ``key`` ("" = the root)."""
        return f"{self.root_id}/{key}" if key else self.root_id

    def variables(self) -> dict[str, NodeSpec]:
        """Variable nodes by key."""
        return {node.key: node for node in self.nodes if node.is_variable}


def parse_path(text: str, aliases: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Turn ``"mt:Production/mt:ActiveProgram"`` into ``((uri, "Production"), ...)``.

    Every segment needs an alias prefix from ``aliases`` (alias -> namespace URI).
    """
    segments: list[tuple[str, str]] = []
    for part in text.split("/"):
        alias, sep, name = part.partition(":")
        if not sep or not name or alias not in aliases:
            raise ValueError(f"bad browse path segment {part!r} in {text!r}")
        segments.append((aliases[alias], name))
    return tuple(segments)


def check_value(spec: NodeSpec, value: NodeValue) -> None:
    """Raise ``ValueError`` unless ``value`` fits the variable's data type."""
    kind = spec.datatype
    if kind is None:
        raise ValueError(f"{spec.key} is an object, not a variable")
    if kind == "Boolean":
        ok = isinstance(value, bool)
    elif kind in _RANGES:
        low, high = _RANGES[kind]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    elif kind == "Double":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(float(value))
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{spec.key}: {value!r} is not a valid {kind}")


class OpcUaMachineModel(Protocol):
    """What the OPC UA server shell needs from a simulated machine model."""

    name: str
    scripted: bool

    @property
    def address_space(self) -> AddressSpace:
        """The nodes the server builds once at start."""
        ...

    @property
    def time(self) -> float:
        """Scenario time the model has been advanced to."""
        ...

    @property
    def finished(self) -> bool:
        """True once a scripted scenario ran all its steps."""
        ...

    def advance(self, t: float) -> None:
        """Move to scenario time ``t``."""
        ...

    def values(self) -> dict[str, NodeValue]:
        """Current value of every variable, by node key."""
        ...


# ---------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class JobTruth:
    """What the machine really produced for one order (the reference for gateway tests)."""

    order_id: str
    good: int
    scrap: int
    target: int
    completed: bool


#: What the machine is doing, by the kind of the current step.
Activity = Literal["run", "stop", "fault", "setup", "idle", "maintenance", "done"]


@dataclass(frozen=True, slots=True)
class ProductionSnapshot:
    """Everything the production engine shows at one moment."""

    activity: Activity = "idle"
    state: MachineState = MachineState.IDLE
    order_id: str = ""
    good: int = 0
    scrap: int = 0
    #: Target shown on the device (0 when the step hides it).
    target: int = 0
    alarm_code: int = 0
    #: Seconds the last piece took (0 before the first piece of an order).
    cycle_time: float = 0.0
    #: Nominal seconds per piece of the running step (0 when not running).
    nominal_cycle: float = 0.0
    #: Pieces ever made (good and scrap), starting from a seeded base.
    lifetime: int = 0


_ACTIVITY: Mapping[type[Step], tuple[Activity, MachineState]] = {
    Stop: ("stop", MachineState.STOPPED),
    Fault: ("fault", MachineState.FAULT),
    Changeover: ("setup", MachineState.SETUP),
    Maintenance: ("maintenance", MachineState.MAINTENANCE),
    Idle: ("idle", MachineState.IDLE),
}


class ProductionEngine:
    """A machine working through scenario steps in scenario time (pure and seeded).

    Same rules as the sewing station (``simulators/README.md``): a ``RunOrder`` with a new
    order id resets the per-order counters; naming the open order resumes it; every
    ``scrap_every``-th piece is scrap; the step ends at the target or after ``pieces``.
    ``script=None`` draws steps from ``generated`` (an endless iterator). A script runs once;
    then the machine idles showing its last order, and ``finished`` becomes true.
    """

    def __init__(
        self,
        script: Sequence[Step] | None,
        generated: Iterator[Step],
        *,
        rng: random.Random,
        lifetime_base: int = 0,
    ) -> None:
        """Start at scenario time 0 with the first step begun."""
        if not 0 <= lifetime_base <= _UINT32_MAX:
            raise ValueError(f"lifetime_base must fit a uint32, got {lifetime_base}")
        self.scripted = script is not None
        self._steps: Iterator[Step] = (
            iter(validate_script(script)) if script is not None else generated
        )
        self._rng = rng
        self._show = ProductionSnapshot(lifetime=lifetime_base)
        self._truth: dict[str, JobTruth] = {}
        self._t = 0.0
        self._finished = False
        self._step: Step | None = None
        self._step_end = 0.0
        self._next_piece_at = 0.0
        self._piece_duration = 0.0
        self._step_pieces = 0
        self._order_target = 0
        self._start_next(0.0)

    @property
    def time(self) -> float:
        """Scenario time the engine has been advanced to."""
        return self._t

    @property
    def finished(self) -> bool:
        """True once a scripted scenario ran all its steps (never for a generated one)."""
        return self._finished

    @property
    def truth(self) -> Mapping[str, JobTruth]:
        """Per-order production so far, in the order the orders started (a copy)."""
        return dict(self._truth)

    @property
    def step(self) -> Step | None:
        """The step being worked on (``None`` once a script is finished)."""
        return self._step

    def snapshot(self) -> ProductionSnapshot:
        """What the machine shows now."""
        return self._show

    def advance(self, t: float) -> None:
        """Move to scenario time ``t``, processing every piece and step end up to ``t``."""
        if not math.isfinite(t):
            raise ValueError(f"scenario time must be finite, got {t!r}")
        if t < self._t:
            raise ValueError(f"scenario time must not go backwards: {self._t} -> {t}")
        while not self._finished:
            running = isinstance(self._step, RunOrder)
            due = self._next_piece_at if running else self._step_end
            if due > t:
                break
            if isinstance(self._step, RunOrder):
                self._piece_done(self._step, due)
            else:
                self._start_next(due)
        self._t = t

    # ---- internals -------------------------------------------------------------------

    def _piece_done(self, step: RunOrder, at: float) -> None:
        show = self._show
        number = show.good + show.scrap + 1
        scrap = step.scrap_every is not None and number % step.scrap_every == 0
        good = show.good + (0 if scrap else 1)
        scrap_count = show.scrap + (1 if scrap else 0)
        completed = good >= self._order_target
        self._show = replace(
            show,
            good=good,
            scrap=scrap_count,
            cycle_time=round(self._piece_duration, 3),
            # A lifetime counter of a real controller wraps like any uint32.
            lifetime=(show.lifetime + 1) & _UINT32_MAX,
        )
        self._truth[show.order_id] = JobTruth(
            show.order_id, good, scrap_count, self._order_target, completed
        )
        self._step_pieces += 1
        if completed or (step.pieces is not None and self._step_pieces >= step.pieces):
            self._start_next(at)
        else:
            self._schedule_piece(step, at)

    def _schedule_piece(self, step: RunOrder, at: float) -> None:
        duration = step.piece_seconds
        if step.jitter:
            duration *= 1.0 + step.jitter * self._rng.uniform(-1.0, 1.0)
        self._piece_duration = duration
        self._next_piece_at = at + duration

    def _start_next(self, at: float) -> None:
        step = next(self._steps, None)
        self._step = step
        show = self._show
        if step is None:
            self._finished = True
            self._show = replace(
                show, activity="done", state=MachineState.IDLE, alarm_code=0, nominal_cycle=0.0
            )
            return
        if isinstance(step, RunOrder):
            self._start_run(step, at)
            return
        self._step_end = at + step.seconds
        activity, state = _ACTIVITY[type(step)]
        alarm = step.alarm_code if isinstance(step, Fault) else 0
        show = replace(show, activity=activity, state=state, alarm_code=alarm, nominal_cycle=0.0)
        if isinstance(step, Idle) and step.clear_order:
            show = replace(show, order_id="", good=0, scrap=0, target=0, cycle_time=0.0)
        self._show = show

    def _start_run(self, step: RunOrder, at: float) -> None:
        show = self._show
        current = self._truth.get(show.order_id) if show.order_id else None
        resume = current is not None and show.order_id == step.order_id and not current.completed
        if not resume:
            self._order_target = step.target
            show = replace(show, order_id=step.order_id, good=0, scrap=0, cycle_time=0.0)
            self._truth[step.order_id] = JobTruth(step.order_id, 0, 0, step.target, False)
        self._show = replace(
            show,
            activity="run",
            state=MachineState.RUNNING,
            alarm_code=0,
            target=step.target if step.target_on_device else 0,
            nominal_cycle=step.piece_seconds,
        )
        self._step_pieces = 0
        self._schedule_piece(step, at)


def stable_pick(options: Sequence[str], key: str) -> str:
    """Pick one of ``options`` by ``key``, the same on every run (no ``hash()`` salt)."""
    if not options:
        raise ValueError("no options to pick from")
    return random.Random(f"pick:{key}").choice(list(options))


class EngineModel:
    """Base of the CNC and robot models: a seeded ``ProductionEngine`` plus node values.

    Subclasses build their ``AddressSpace`` once and turn the engine's snapshot into node
    values in ``_values``; everything stays pure and deterministic for a seed and name.
    """

    def __init__(
        self,
        script: Sequence[Step] | None,
        generated: Iterator[Step],
        *,
        seed: int,
        name: str,
        kind: str,
        lifetime_base: int,
    ) -> None:
        """Start the engine; ``kind`` separates the random streams of CNC and robot."""
        if not name:
            raise ValueError("a machine needs a name")
        self.name = name
        self.seed = seed
        # Separate stream from the scenario generator: piece jitter must not shift the
        # generated steps when a script changes.
        self._engine = ProductionEngine(
            script,
            generated,
            rng=random.Random(f"{kind}-pieces:{seed}:{name}"),
            lifetime_base=lifetime_base,
        )
        self.scripted = self._engine.scripted

    @property
    def time(self) -> float:
        """Scenario time the model has been advanced to."""
        return self._engine.time

    @property
    def finished(self) -> bool:
        """True once a scripted scenario ran all its steps (never for the generated day)."""
        return self._engine.finished

    @property
    def truth(self) -> Mapping[str, JobTruth]:
        """Per-order production so far (order id -> ``JobTruth``), in start order."""
        return self._engine.truth

    @property
    def state(self) -> MachineState:
        """Canonical state the machine is in (what a correct profile should report)."""
        return self._engine.snapshot().state

    @property
    def order_id(self) -> str:
        """Order the machine works on or last worked on ("" = none)."""
        return self._engine.snapshot().order_id

    def snapshot(self) -> ProductionSnapshot:
        """The engine's snapshot (state, order, counters, alarm)."""
        return self._engine.snapshot()

    @property
    def address_space(self) -> AddressSpace:
        """The nodes the server builds at start (defined by each machine kind)."""
        raise NotImplementedError

    def values(self) -> dict[str, NodeValue]:
        """Current value of every variable, by node key (defined by each machine kind)."""
        raise NotImplementedError

    def advance(self, t: float) -> None:
        """Move to scenario time ``t`` (seconds since the scenario started)."""
        self._engine.advance(t)
