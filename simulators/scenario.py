"""Scenario steps for the sewing-station simulator: types, validation, file loading, generator.

A scenario is a sequence of steps a station works through in scenario time (seconds since
the scenario started). Steps are plain frozen dataclasses; everything here is pure except
``load_scenario``, which reads one file. Errors in a script raise ``ScenarioError`` with the
position of the offending step (``steps[3].run_order.target: ...``).

The generated default (``generate_steps``) is an endless, realistic working day that depends
only on the seed and the station name. ``generate_shift`` draws such a day for any kind of
machine from its ``ShiftProfile`` (the CNC and robot simulators use it too).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import yaml

#: Longest order id and badge id the register map holds (2 ASCII chars per register).
ORDER_ID_MAX_CHARS = 40
OPERATOR_MAX_CHARS = 16
_UINT16_MAX = 0xFFFF
_UINT32_MAX = 0xFFFF_FFFF

# Unknown keys in a step are a typo in the file, never something to ignore silently.
_STEP_CONFIG = pydantic.ConfigDict(extra="forbid")


class ScenarioError(ValueError):
    """A scenario script or file is invalid; the message says where and what to fix."""


def _check_seconds(seconds: float) -> None:
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")


def check_ascii(text: str, *, what: str, max_chars: int) -> None:
    """Raise ``ValueError`` unless ``text`` is printable ASCII of at most ``max_chars``."""
    if len(text) > max_chars:
        raise ValueError(f"{what} has {len(text)} characters, the device holds {max_chars}")
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"{what} must be printable ASCII, got {text!r}")


@dataclass(frozen=True, slots=True)
class RunOrder:
    """Produce pieces of an order: state running, one piece every ``piece_seconds``.

    A new order id resets the device counters to 0. Naming the order that is still open on
    the station (same id, target not reached) resumes it, so an order can be interrupted by
    ``Stop``/``Fault`` steps: give the first part ``pieces`` and repeat the ``RunOrder``.
    Every ``scrap_every``-th piece of the order is scrap. The step ends when good reaches
    ``target`` or, if given, after ``pieces`` pieces of this step. ``target_on_device=False``
    shows 0 in the target register. ``jitter`` (0..0.5) varies each piece time by up to
    that fraction, drawn from the station's seeded generator; scripted steps default to exact.
    """

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STEP_CONFIG

    order_id: str
    target: int
    piece_seconds: float
    scrap_every: int | None = None
    target_on_device: bool = True
    pieces: int | None = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        """Validate the field values."""
        if not self.order_id:
            raise ValueError("order_id must not be empty")
        check_ascii(self.order_id, what="order_id", max_chars=ORDER_ID_MAX_CHARS)
        if not 1 <= self.target <= _UINT32_MAX:
            raise ValueError(f"target must be 1..{_UINT32_MAX}, got {self.target}")
        if not math.isfinite(self.piece_seconds) or self.piece_seconds <= 0:
            raise ValueError(f"piece_seconds must be > 0, got {self.piece_seconds!r}")
        # scrap_every=1 would scrap every piece and the order could never reach its target.
        if self.scrap_every is not None and self.scrap_every < 2:
            raise ValueError(f"scrap_every must be >= 2 or null, got {self.scrap_every}")
        if self.pieces is not None and self.pieces < 1:
            raise ValueError(f"pieces must be >= 1 or null, got {self.pieces}")
        if not 0.0 <= self.jitter <= 0.5:
            raise ValueError(f"jitter must be 0..0.5, got {self.jitter!r}")


@dataclass(frozen=True, slots=True)
class Stop:
    """Operator stop: state stopped for ``seconds``; order and counts stay shown."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STEP_CONFIG

    seconds: float

    def __post_init__(self) -> None:
        """Validate the field values."""
        _check_seconds(self.seconds)


@dataclass(frozen=True, slots=True)
class Fault:
    """Machine fault: state fault and ``alarm_code`` for ``seconds``, alarm cleared after."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STEP_CONFIG

    seconds: float
    alarm_code: int

    def __post_init__(self) -> None:
        """Validate the field values."""
        _check_seconds(self.seconds)
        if not 1 <= self.alarm_code <= _UINT16_MAX:
            raise ValueError(f"alarm_code must be 1..{_UINT16_MAX}, got {self.alarm_code}")


@dataclass(frozen=True, slots=True)
class Changeover:
    """Set-up for the next order: state setup; the last order and its counts stay shown."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STEP_CONFIG

    seconds: float

    def __post_init__(self) -> None:
        """Validate the field values."""
        _check_seconds(self.seconds)


@dataclass(frozen=True, slots=True)
class Idle:
    """No work: state idle; ``clear_order`` blanks the order id and counters on the device."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STEP_CONFIG

    seconds: float
    clear_order: bool = False

    def __post_init__(self) -> None:
        """Validate the field values."""
        _check_seconds(self.seconds)


@dataclass(frozen=True, slots=True)
class Maintenance:
    """Planned maintenance: state maintenance; order and counts stay shown."""

    __pydantic_config__: ClassVar[pydantic.ConfigDict] = _STEP_CONFIG

    seconds: float

    def __post_init__(self) -> None:
        """Validate the field values."""
        _check_seconds(self.seconds)


Step = RunOrder | Stop | Fault | Changeover | Idle | Maintenance

#: Step names as written in scenario files.
STEP_TYPES: Mapping[str, type[Step]] = {
    "run_order": RunOrder,
    "stop": Stop,
    "fault": Fault,
    "changeover": Changeover,
    "idle": Idle,
    "maintenance": Maintenance,
}
_STEP_CLASSES = tuple(STEP_TYPES.values())
_ADAPTERS: dict[str, pydantic.TypeAdapter[Any]] = {
    name: pydantic.TypeAdapter(cls) for name, cls in STEP_TYPES.items()
}


def pieces_to_reach(target: int, scrap_every: int | None) -> int:
    """Number of pieces an order needs until ``target`` good ones, given its scrap cadence."""
    if scrap_every is None:
        return target
    # Every scrap_every-th piece is scrap, so each run of (scrap_every - 1) good pieces
    # beyond the first target-1 costs one extra piece.
    return target + (target - 1) // (scrap_every - 1)


def good_after(pieces: int, scrap_every: int | None) -> int:
    """Good pieces among the first ``pieces`` pieces of an order."""
    return pieces if scrap_every is None else pieces - pieces // scrap_every


def validate_script(steps: Sequence[object]) -> tuple[Step, ...]:
    """Check a whole script (types and order bookkeeping) and return it as a tuple.

    Orders may only be resumed while open: a ``RunOrder`` naming an order seen before must
    follow it with no other order in between, the order must not be complete yet, and its
    target must not change.
    """
    script: list[Step] = []
    seen: set[str] = set()
    open_id = ""
    open_target = 0
    open_pieces = 0
    open_complete = False
    for index, step in enumerate(steps):
        if not isinstance(step, _STEP_CLASSES):
            raise ScenarioError(f"steps[{index}]: not a scenario step: {step!r}")
        if isinstance(step, RunOrder):
            where = f"steps[{index}].run_order"
            if step.order_id == open_id:
                if open_complete:
                    raise ScenarioError(
                        f"{where}: order {step.order_id!r} already reached its target; "
                        "use a new order id"
                    )
                if step.target != open_target:
                    raise ScenarioError(
                        f"{where}: resuming order {step.order_id!r} with target "
                        f"{step.target}, it was started with {open_target}"
                    )
            elif step.order_id in seen:
                raise ScenarioError(
                    f"{where}: order {step.order_id!r} was already run and another order "
                    "followed; order ids on a station must be unique"
                )
            else:
                open_id, open_target, open_pieces = step.order_id, step.target, 0
            seen.add(step.order_id)
            needed = pieces_to_reach(step.target, step.scrap_every) - open_pieces
            done = needed if step.pieces is None else min(step.pieces, needed)
            open_pieces += done
            open_complete = done == needed
        elif isinstance(step, Idle) and step.clear_order:
            open_id, open_complete = "", False
        script.append(step)
    return tuple(script)


def _format_errors(where: str, exc: pydantic.ValidationError) -> list[str]:
    messages = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        msg = error["msg"].removeprefix("Value error, ")
        messages.append(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}")
    return messages


def parse_steps(data: object) -> tuple[Step, ...]:
    """Turn decoded YAML/JSON (a list of one-key mappings) into validated steps.

    Example item: ``{"run_order": {"order_id": "PO-1", "target": 20, "piece_seconds": 3}}``.
    All field errors are collected into one ``ScenarioError``.
    """
    if not isinstance(data, list):
        raise ScenarioError(
            f"a scenario is a list of steps, got {type(data).__name__}; "
            "example: [{stop: {seconds: 30}}]"
        )
    steps: list[Step] = []
    errors: list[str] = []
    names = ", ".join(STEP_TYPES)
    for index, item in enumerate(data):
        where = f"steps[{index}]"
        if not isinstance(item, dict) or len(item) != 1:
            errors.append(f"{where}: each step is a mapping with exactly one key ({names})")
            continue
        ((name, fields),) = item.items()
        if name not in _ADAPTERS:
            errors.append(f"{where}: unknown step {name!r}; use one of {names}")
            continue
        if not isinstance(fields, dict):
            errors.append(f"{where}.{name}: expected a mapping of fields, got {fields!r}")
            continue
        try:
            steps.append(_ADAPTERS[name].validate_python(fields))
        except pydantic.ValidationError as exc:
            errors.extend(_format_errors(f"{where}.{name}", exc))
    if errors:
        raise ScenarioError("\n".join(errors))
    return validate_script(steps)


def load_scenario(path: str | Path) -> tuple[Step, ...]:
    """Read a YAML or JSON scenario file; ``ScenarioError`` names the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read scenario file: {exc}") from exc
    try:
        # YAML 1.1 is close enough to a superset of JSON for step lists.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML/JSON: {exc}") from exc
    try:
        return parse_steps(data)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


#: Alarm codes the generated day raises (documented in simulators/README.md).
ALARM_CODES: Mapping[int, str] = {
    101: "thread break",
    102: "needle break",
    205: "bobbin empty",
    310: "motor overload",
}


Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class ShiftProfile:
    """What a generated shift of one kind of machine looks like (durations in seconds).

    Between orders: maintenance with ``maintenance_p``, else idle with ``idle_p``, then a
    changeover. An order runs in segments of ``segment`` pieces, each followed by a fault
    (``fault_p``, an alarm from ``alarm_codes``) or a stop.
    """

    alarm_codes: tuple[int, ...]
    maintenance_p: float
    maintenance_s: Range
    idle_s: Range
    changeover_s: Range
    target: tuple[int, int]
    piece_s: Range
    #: Decimals ``piece_seconds`` is rounded to.
    piece_digits: int
    scrap_every: tuple[int | None, ...]
    #: Chance that the device shows the order target; ``None``: never (and no draw).
    target_shown_p: float | None
    segment: tuple[int, int]
    jitter: float
    fault_p: float
    fault_s: Range
    stop_s: Range
    idle_p: float = 0.1


def generate_shift(profile: ShiftProfile, rng: random.Random) -> Iterator[Step]:
    """Endless realistic shift after ``profile``, drawn from ``rng`` (seeded by the caller)."""
    p = profile
    order_number = rng.randrange(20_000, 90_000)
    first = True
    while True:
        if not first:
            if rng.random() < p.maintenance_p:
                yield Maintenance(round(rng.uniform(*p.maintenance_s), 1))
            elif rng.random() < p.idle_p:
                yield Idle(round(rng.uniform(*p.idle_s), 1))
            yield Changeover(round(rng.uniform(*p.changeover_s), 1))
        first = False
        order_number += rng.randint(1, 9)
        order_id = f"PO-{order_number}"
        target = rng.randint(*p.target)
        piece_seconds = round(rng.uniform(*p.piece_s), p.piece_digits)
        scrap_every = rng.choice(p.scrap_every)
        shown = p.target_shown_p is not None and rng.random() < p.target_shown_p
        remaining = pieces_to_reach(target, scrap_every)
        while remaining > 0:
            segment = rng.randint(*p.segment)
            run = RunOrder(order_id, target, piece_seconds, scrap_every, shown, jitter=p.jitter)
            if segment >= remaining:
                yield run
                break
            yield dataclasses.replace(run, pieces=segment)
            remaining -= segment
            if rng.random() < p.fault_p:
                yield Fault(round(rng.uniform(*p.fault_s), 1), rng.choice(p.alarm_codes))
            else:
                yield Stop(round(rng.uniform(*p.stop_s), 1))


#: The sewing station's working day.
SEWING_DAY = ShiftProfile(
    alarm_codes=tuple(sorted(ALARM_CODES)),
    maintenance_p=0.03,
    maintenance_s=(60.0, 300.0),
    idle_s=(10.0, 60.0),
    changeover_s=(5.0, 15.0),
    target=(20, 60),
    piece_s=(2.0, 5.0),
    piece_digits=2,
    scrap_every=(None, None, 12, 17, 25),
    target_shown_p=0.9,
    segment=(8, 30),
    jitter=0.15,
    fault_p=0.15,
    fault_s=(20.0, 90.0),
    stop_s=(10.0, 60.0),
)


def generate_steps(seed: int, name: str) -> Iterator[Step]:
    """Endless realistic working day for one station, determined by ``seed`` and ``name``."""
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and
    # independent of PYTHONHASHSEED.
    return generate_shift(SEWING_DAY, random.Random(f"sewing-day:{seed}:{name}"))
