"""The production engine: a machine working through scenario steps in scenario time.

Pure and seeded, no I/O, no clock. Every simulated machine (the sewing stations of
:mod:`simulators.sewing`, the CNC and robot of :mod:`simulators.opcua_common`) counts its
pieces with it, so they all follow the same rules (``simulators/README.md``): pieces per
order exactly whatever the tick size, and the ground truth per order for gateway tests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from gateway.core.vocabulary import MachineState
from shopfloor_gateway.simulators.scenario import (
    Changeover,
    Fault,
    Idle,
    Maintenance,
    RunOrder,
    Step,
    Stop,
    pieces_to_reach,
    validate_script,
)

_UINT32_MAX = 0xFFFF_FFFF


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
    #: Pieces (good and scrap) the order is planned to take to reach its target at its
    #: scrap cadence, as OPC 40501 ``RunsPlanned`` counts runs (0 when the target is hidden).
    planned: int = 0
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

    The rules of ``simulators/README.md``, for every simulated machine: a ``RunOrder`` with a new
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
        self._last_piece: float | None = None
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

    @property
    def last_piece_seconds(self) -> float | None:
        """Unrounded seconds of the last piece of the running step (``None`` before one)."""
        return self._last_piece

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
        self._last_piece = self._piece_duration
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
            show = replace(show, order_id="", good=0, scrap=0, target=0, planned=0, cycle_time=0.0)
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
            planned=pieces_to_reach(step.target, step.scrap_every) if step.target_on_device else 0,
            nominal_cycle=step.piece_seconds,
        )
        self._step_pieces = 0
        self._last_piece = None
        self._schedule_piece(step, at)


class EngineBacked:
    """Read side and ``advance`` of a machine model whose production is a ``ProductionEngine``.

    The sewing station and the OPC UA machine models derive from it and set ``_engine``;
    each adds what its device shows (registers or node values).
    """

    _engine: ProductionEngine
    scripted: bool

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

    def advance(self, t: float) -> None:
        """Move to scenario time ``t`` (seconds since the scenario started)."""
        self._engine.advance(t)
