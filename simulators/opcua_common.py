"""Pure parts shared by the OPC UA simulators (CNC after OPC 40501, robot after OPC 40010).

Nothing here does I/O or reads a clock:

- ``NodeSpec`` / ``AddressSpace``: the shape of a simulated machine's address space as plain
  data (browse path with a namespace URI per segment, a stable string NodeId, data type,
  property or component). :mod:`simulators.opcua_server` turns it into asyncua nodes.
- ``ProductionEngine`` (from :mod:`simulators.production`, shared with the sewing stations):
  a machine working through scenario steps in scenario time. The CNC and robot models
  (``EngineModel``) turn its snapshot into node values.
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
from dataclasses import dataclass
from typing import Literal, Protocol

from shopfloor_gateway.simulators.production import Activity as Activity
from shopfloor_gateway.simulators.production import EngineBacked
from shopfloor_gateway.simulators.production import JobTruth as JobTruth
from shopfloor_gateway.simulators.production import ProductionEngine as ProductionEngine
from shopfloor_gateway.simulators.production import ProductionSnapshot as ProductionSnapshot
from shopfloor_gateway.simulators.scenario import Step

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


def make_node(
    aliases: Mapping[str, str],
    path: str,
    datatype: DataType | None = None,
    value: NodeValue | None = None,
    *,
    prop: bool = False,
    events: bool = False,
) -> NodeSpec:
    """A ``NodeSpec`` from a browse path with alias prefixes (see :func:`parse_path`)."""
    return NodeSpec(parse_path(path, aliases), datatype, value, prop, events)


def alarm_text_of(code: int, texts: Mapping[int, str]) -> str:
    """Text of an alarm code from ``texts`` ("" for 0, ``Alarm <code>`` when unknown)."""
    if code == 0:
        return ""
    return texts.get(code, f"Alarm {code}")


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


def stable_pick(options: Sequence[str], key: str) -> str:
    """Pick one of ``options`` by ``key``, the same on every run (no ``hash()`` salt)."""
    if not options:
        raise ValueError("no options to pick from")
    return random.Random(f"pick:{key}").choice(list(options))


class EngineModel(EngineBacked):
    """Base of the CNC and robot models: a seeded ``ProductionEngine`` plus node values.

    Subclasses build their ``AddressSpace`` once (``_use_address_space``) and turn the
    engine's snapshot into the values that change in ``_dynamic``; everything stays pure and
    deterministic for a seed and name.
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

    def snapshot(self) -> ProductionSnapshot:
        """The engine's snapshot (state, order, counters, alarm)."""
        return self._engine.snapshot()

    @property
    def address_space(self) -> AddressSpace:
        """The nodes the server builds at start."""
        return self._space

    def values(self) -> dict[str, NodeValue]:
        """Current value of every variable, by node key."""
        values: dict[str, NodeValue] = {k: v for k, v in self._initial.items() if v is not None}
        values.update(self._dynamic(self._engine.snapshot()))
        return values

    def _use_address_space(self, space: AddressSpace) -> None:
        self._space = space
        self._initial = {key: spec.value for key, spec in space.variables().items()}

    def _dynamic(self, show: ProductionSnapshot) -> dict[str, NodeValue]:
        # Values that follow the engine, by node key (defined by each machine kind).
        raise NotImplementedError
