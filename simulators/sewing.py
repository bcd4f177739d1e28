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

import random
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.core.vocabulary import MachineState
from shopfloor_gateway.simulators.production import (
    EngineBacked,
    JobTruth,
    ProductionEngine,
    ProductionSnapshot,
)
from shopfloor_gateway.simulators.scenario import (
    OPERATOR_MAX_CHARS,
    ORDER_ID_MAX_CHARS,
    Step,
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


#: What the station really produced for one order (the reference for gateway tests).
OrderTruth = JobTruth


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


class StationModel(EngineBacked):
    """One sewing station advanced through a scenario in scenario time.

    ``script=None`` runs the endless generated day for ``seed`` and ``name``; a script runs
    its steps once, then the station goes idle (stitch rate 0) keeping order and counts
    shown, and ``finished`` becomes true. Production follows the shared
    :class:`~simulators.production.ProductionEngine`; the station adds its registers, the
    operator badge and the stitch rate.
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
        steps = validate_script(script) if script is not None else None
        # Separate stream from the scenario generator: piece jitter must not shift the
        # generated steps when a script changes.
        rng = random.Random(f"sewing-station:{seed}:{name}")
        badge = operator if operator is not None else f"B-{rng.randint(1000, 9999)}"
        self._base_rate = float(rng.randint(24, 36) * 100)
        self._operator = badge
        encode_registers(StationSnapshot(operator=badge))  # fail now on a bad badge
        self._engine = ProductionEngine(steps, generate_steps(seed, name), rng=rng)
        self.scripted = self._engine.scripted

    # ---- read side -------------------------------------------------------------------

    def snapshot(self) -> StationSnapshot:
        """What the registers show now."""
        show = self._engine.snapshot()
        return StationSnapshot(
            state=show.state,
            good_count=show.good,
            scrap_count=show.scrap,
            target_count=show.target,
            alarm_code=show.alarm_code,
            stitch_rate=self._stitch_rate(show),
            order_id=show.order_id,
            operator=self._operator,
            cycle_time=show.cycle_time,
        )

    def registers(self) -> list[int]:
        """The ``REGISTER_COUNT`` holding registers as the device serves them now."""
        return encode_registers(self.snapshot())

    def _stitch_rate(self, show: ProductionSnapshot) -> float:
        if show.activity != "run":
            return 0.0
        last = self._engine.last_piece_seconds
        if last is None:
            return self._base_rate
        # Faster pieces mean the operator sewed faster: scale the nominal stitch rate.
        return round(self._base_rate * show.nominal_cycle / last, 1)
