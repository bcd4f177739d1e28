"""Sewing-station model: register map, register encoding and the scenario-driven station.

Pure and deterministic: no clock, no I/O. ``StationModel.advance(t)`` moves the station to
scenario time ``t`` (seconds since the scenario started) by processing every piece and step
boundary up to ``t`` in order, so the result does not depend on how time is chopped up.

Register map (holding registers, zero-based, unit id 1; numbers big-endian, high word first):

====  =====  ============  ==========================================================
addr  count  signal        type
====  =====  ============  ==========================================================
0     1      state         uint16 enum, see ``STATE_CODES``
1     2      good_count    uint32 ABCD, per order (reset to 0 at order change)
3     2      scrap_count   uint32 ABCD, per order
5     2      target_count  uint32 ABCD, 0 = no target known on the device
7     1      alarm_code    uint16, 0 = no alarm
8     2      stitch_rate   float32 ABCD, stitches per minute, 0 when not running
10    20     order_id      ASCII, 2 chars per register high byte first, NUL padded
30    8      operator      ASCII badge id (personal data)
38    2      cycle_time    float32 ABCD, seconds of the last piece
====  =====  ============  ==========================================================
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from gateway.model import MachineState
from simulators.scenario import (
    OPERATOR_MAX_CHARS,
    ORDER_ID_MAX_CHARS,
    Changeover,
    Fault,
    Idle,
    Maintenance,
    RunOrder,
    Step,
    Stop,
    check_ascii,
    generate_steps,
    validate_script,
)

UNIT_ID = 1
REGISTER_COUNT = 40

ADDR_STATE = 0
ADDR_GOOD_COUNT = 1
ADDR_SCRAP_COUNT = 3
ADDR_TARGET_COUNT = 5
ADDR_ALARM_CODE = 7
ADDR_STITCH_RATE = 8
ADDR_ORDER_ID = 10
ORDER_ID_REGISTERS = 20
ADDR_OPERATOR = 30
OPERATOR_REGISTERS = 8
ADDR_CYCLE_TIME = 38

#: Device code of each machine state in register ``ADDR_STATE``.
STATE_CODES: Mapping[MachineState, int] = {
    MachineState.IDLE: 0,
    MachineState.RUNNING: 1,
    MachineState.STOPPED: 2,
    MachineState.FAULT: 3,
    MachineState.SETUP: 4,
    MachineState.MAINTENANCE: 5,
}
_STATES_BY_CODE = {code: state for state, code in STATE_CODES.items()}

# Field order and widths follow the register map exactly; ">" means no padding.
_LAYOUT = struct.Struct(f">HIIIHf{2 * ORDER_ID_REGISTERS}s{2 * OPERATOR_REGISTERS}sf")
_WORDS = struct.Struct(f">{REGISTER_COUNT}H")
assert _LAYOUT.size == _WORDS.size == 2 * REGISTER_COUNT
_UINT32_MAX = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class StationSnapshot:
    """Everything the station shows in its registers at one moment."""

    state: MachineState = MachineState.IDLE
    good_count: int = 0
    scrap_count: int = 0
    target_count: int = 0
    alarm_code: int = 0
    stitch_rate: float = 0.0
    order_id: str = ""
    operator: str = ""
    cycle_time: float = 0.0


@dataclass(frozen=True, slots=True)
class OrderTruth:
    """What the station really produced for one order (the reference for gateway tests)."""

    order_id: str
    good: int
    scrap: int
    target: int
    completed: bool


def encode_registers(snapshot: StationSnapshot) -> list[int]:
    """Encode a snapshot into the ``REGISTER_COUNT`` holding registers of the map."""
    if snapshot.state not in STATE_CODES:
        raise ValueError(f"state {snapshot.state!s} has no device code")
    for name in ("good_count", "scrap_count", "target_count"):
        value = getattr(snapshot, name)
        if not 0 <= value <= _UINT32_MAX:
            raise ValueError(f"{name} {value} does not fit a uint32")
    if not 0 <= snapshot.alarm_code <= 0xFFFF:
        raise ValueError(f"alarm_code {snapshot.alarm_code} does not fit a uint16")
    check_ascii(snapshot.order_id, what="order_id", max_chars=ORDER_ID_MAX_CHARS)
    check_ascii(snapshot.operator, what="operator", max_chars=OPERATOR_MAX_CHARS)
    packed = _LAYOUT.pack(
        STATE_CODES[snapshot.state],
        snapshot.good_count,
        snapshot.scrap_count,
        snapshot.target_count,
        snapshot.alarm_code,
        snapshot.stitch_rate,
        snapshot.order_id.encode("ascii"),  # struct pads "s" fields with NUL bytes
        snapshot.operator.encode("ascii"),
        snapshot.cycle_time,
    )
    return list(_WORDS.unpack(packed))


def decode_registers(registers: Sequence[int]) -> StationSnapshot:
    """Decode the ``REGISTER_COUNT`` registers of the map (inverse of ``encode_registers``).

    Floats come back rounded to float32. Raises ``ValueError`` on a wrong count, a register
    outside 0..65535, an unknown state code or non-ASCII text.
    """
    if len(registers) != REGISTER_COUNT:
        raise ValueError(f"expected {REGISTER_COUNT} registers, got {len(registers)}")
    try:
        packed = _WORDS.pack(*registers)
    except struct.error as exc:
        raise ValueError(f"register value out of range: {exc}") from exc
    state, good, scrap, target, alarm, rate, order, operator, cycle = _LAYOUT.unpack(packed)
    if state not in _STATES_BY_CODE:
        raise ValueError(f"unknown state code {state}")
    try:
        order_text = order.rstrip(b"\x00").decode("ascii")
        operator_text = operator.rstrip(b"\x00").decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text register is not ASCII: {exc}") from exc
    return StationSnapshot(
        state=_STATES_BY_CODE[state],
        good_count=good,
        scrap_count=scrap,
        target_count=target,
        alarm_code=alarm,
        stitch_rate=rate,
        order_id=order_text,
        operator=operator_text,
        cycle_time=cycle,
    )


class StationModel:
    """One sewing station advanced through a scenario in scenario time.

    ``script=None`` runs the endless generated day for ``seed`` and ``name``; a script runs
    its steps once, then the station goes idle (stitch rate 0) keeping order and counts
    shown, and ``finished`` becomes true.
    """

    def __init__(
        self,
        script: Sequence[Step] | None = None,
        *,
        seed: int = 0,
        name: str = "sewing",
        operator: str | None = None,
    ) -> None:
        """Build a station at scenario time 0, before its first step has started."""
        self.name = name
        self.scripted = script is not None
        self._steps: Iterator[Step] = (
            iter(validate_script(script)) if script is not None else generate_steps(seed, name)
        )
        # Separate stream from the scenario generator: piece jitter must not shift the
        # generated steps when a script changes.
        self._rng = random.Random(f"sewing-station:{seed}:{name}")
        badge = operator if operator is not None else f"B-{self._rng.randint(1000, 9999)}"
        self._base_rate = float(self._rng.randint(24, 36) * 100)
        self._show = StationSnapshot(operator=badge)
        encode_registers(self._show)  # fail now on a bad operator badge, not at first read
        self._truth: dict[str, OrderTruth] = {}
        self._t = 0.0
        self._finished = False
        self._step: Step | None = None
        self._step_end = 0.0  # end of a timed step
        self._next_piece_at = 0.0
        self._piece_duration = 0.0
        self._step_pieces = 0
        self._order_target = 0
        self._start_next(0.0)

    # ---- read side -------------------------------------------------------------------

    @property
    def time(self) -> float:
        """Scenario time the station has been advanced to."""
        return self._t

    @property
    def finished(self) -> bool:
        """True once a scripted scenario ran all its steps (never for the generated day)."""
        return self._finished

    @property
    def state(self) -> MachineState:
        """Machine state the station currently shows."""
        return self._show.state

    @property
    def order_id(self) -> str:
        """Order id the station currently shows ("" = none)."""
        return self._show.order_id

    @property
    def truth(self) -> Mapping[str, OrderTruth]:
        """Per-order production so far, in the order the orders started (a copy)."""
        return dict(self._truth)

    def snapshot(self) -> StationSnapshot:
        """What the registers show now."""
        return self._show

    def registers(self) -> list[int]:
        """The ``REGISTER_COUNT`` holding registers as the device serves them now."""
        return encode_registers(self._show)

    # ---- time ------------------------------------------------------------------------

    def advance(self, t: float) -> None:
        """Move to scenario time ``t``, processing every piece and step end up to ``t``."""
        if not math.isfinite(t):
            raise ValueError(f"scenario time must be finite, got {t!r}")
        if t < self._t:
            raise ValueError(f"scenario time must not go backwards: {self._t} -> {t}")
        while not self._finished:
            due = self._next_piece_at if isinstance(self._step, RunOrder) else self._step_end
            if due > t:
                break
            self._fire(due)
        self._t = t

    def _fire(self, at: float) -> None:
        step = self._step
        if isinstance(step, RunOrder):
            self._piece_done(step, at)
        else:
            self._start_next(at)

    def _piece_done(self, step: RunOrder, at: float) -> None:
        show = self._show
        number = show.good_count + show.scrap_count + 1
        scrap = step.scrap_every is not None and number % step.scrap_every == 0
        good = show.good_count + (0 if scrap else 1)
        scrap_count = show.scrap_count + (1 if scrap else 0)
        completed = good >= self._order_target
        # Faster pieces mean the operator sewed faster: scale the nominal stitch rate.
        rate = round(self._base_rate * step.piece_seconds / self._piece_duration, 1)
        self._show = replace(
            show,
            good_count=good,
            scrap_count=scrap_count,
            cycle_time=round(self._piece_duration, 3),
            stitch_rate=rate,
        )
        self._truth[show.order_id] = OrderTruth(
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
            self._show = replace(show, state=MachineState.IDLE, stitch_rate=0.0, alarm_code=0)
            return
        if isinstance(step, RunOrder):
            self._start_run(step, at)
            return
        self._step_end = at + step.seconds
        if isinstance(step, Stop):
            self._show = replace(show, state=MachineState.STOPPED, stitch_rate=0.0, alarm_code=0)
        elif isinstance(step, Fault):
            self._show = replace(
                show, state=MachineState.FAULT, stitch_rate=0.0, alarm_code=step.alarm_code
            )
        elif isinstance(step, Changeover):
            self._show = replace(show, state=MachineState.SETUP, stitch_rate=0.0, alarm_code=0)
        elif isinstance(step, Maintenance):
            self._show = replace(
                show, state=MachineState.MAINTENANCE, stitch_rate=0.0, alarm_code=0
            )
        elif isinstance(step, Idle):
            self._show = replace(show, state=MachineState.IDLE, stitch_rate=0.0, alarm_code=0)
            if step.clear_order:
                self._show = replace(
                    self._show,
                    order_id="",
                    good_count=0,
                    scrap_count=0,
                    target_count=0,
                    cycle_time=0.0,
                )

    def _start_run(self, step: RunOrder, at: float) -> None:
        show = self._show
        current = self._truth.get(show.order_id) if show.order_id else None
        resume = current is not None and show.order_id == step.order_id and not current.completed
        if not resume:
            # The device counts per order: a new order starts from zero.
            self._order_target = step.target
            show = replace(
                show, order_id=step.order_id, good_count=0, scrap_count=0, cycle_time=0.0
            )
            self._truth[step.order_id] = OrderTruth(step.order_id, 0, 0, step.target, False)
        self._show = replace(
            show,
            state=MachineState.RUNNING,
            alarm_code=0,
            stitch_rate=self._base_rate,
            target_count=step.target if step.target_on_device else 0,
        )
        self._step_pieces = 0
        self._schedule_piece(step, at)
