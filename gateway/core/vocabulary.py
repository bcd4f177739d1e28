"""The canonical vocabulary: signal names, machine states, counters, personal data, limits.

The one definition of the words the gateway speaks between a device and the contract, and
the one validator of canonical values, :func:`normalise`. The config loader checks enum maps
with it, :class:`gateway.core.mapping.Mapper` checks every mapped sample with it, the tracker
parses what it reads with it, and the contract models take their limits from here, so a value
that passes one of them passes all of them (docs/tracker.md, "Canonical signals").

Text limits. Free text (``alarm_text``, ``program``, an order's ``customer``) may be up to
:data:`MAX_TEXT_LEN` = 256 characters: a PLC alarm text (S7 and OPC UA LocalizedText alike)
fits, and it is what contract v1 has always published for ``text`` and ``customer``.
Identifiers (``order_id``, a command's ``command_id``) are keys, not prose: they are stored,
compared and shown in every order event, and contract v1 has always published 128 for them,
so :data:`MAX_ID_LEN` = 128. A badge (``operator``) is personal data kept as short as a
badge is, :data:`MAX_OPERATOR_LEN` = 64. Each limit is defined here once; the mapper used to
allow 256 characters for an order id that the tracker then rejected at 128.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final


class MachineState(enum.StrEnum):
    """Canonical machine states (PackML-inspired, deliberately small)."""

    RUNNING = "running"
    IDLE = "idle"
    SETUP = "setup"
    STOPPED = "stopped"
    FAULT = "fault"
    MAINTENANCE = "maintenance"
    #: Set by the gateway, never by a device: the device cannot be reached.
    OFFLINE = "offline"


#: The states a device may report (``offline`` is the gateway's word alone), in their
#: declaration order, for messages.
DEVICE_STATES: Final[tuple[str, ...]] = tuple(
    s.value for s in MachineState if s is not MachineState.OFFLINE
)
_DEVICE_STATE_SET = frozenset(DEVICE_STATES)

#: The device counters the tracker reads; each may have its own mode and wrap.
COUNTER_SIGNALS: Final[tuple[str, ...]] = ("good_count", "scrap_count", "total_count")
#: The order's target quantity, when the device knows it.
TARGET_SIGNAL: Final = "target_count"
#: Signals whose values are whole, non-negative numbers.
COUNT_SIGNALS: Final = frozenset({*COUNTER_SIGNALS, TARGET_SIGNAL})
#: Bits: ``counter_reset`` (while set, a counter drop is a reset, not a glitch) and
#: ``order_ended`` (the device says the running order ended: complete_when device_ended).
BIT_SIGNALS: Final = frozenset({"counter_reset", "order_ended"})

#: The signal that names a worker (a badge): personal data.
OPERATOR_SIGNAL: Final = "operator"
#: Signals that are personal data: never in history telemetry, redacted per destination.
PERSONAL_SIGNALS: Final = frozenset({OPERATOR_SIGNAL})
#: The payload key of an order's per-operator attribution (a list of shares, each with an
#: ``operator`` key); personal data as well.
OPERATORS_KEY: Final = "operators"

#: Longest free text: alarm texts, program names, an order's customer (see above).
MAX_TEXT_LEN: Final = 256
#: Longest identifier: order ids and command ids (see above).
MAX_ID_LEN: Final = 128
#: Longest badge accepted from a device; longer ones are a decoding error.
MAX_OPERATOR_LEN: Final = 64
#: Largest target quantity accepted from a device or the platform.
MAX_TARGET: Final = 10_000_000
#: Largest counter value accepted from a device; anything above is a decoding error.
MAX_COUNT: Final = 2**53

#: Text signals and their longest value.
TEXT_LIMITS: Final = MappingProxyType(
    {
        "order_id": MAX_ID_LEN,
        "program": MAX_TEXT_LEN,
        "alarm_text": MAX_TEXT_LEN,
        OPERATOR_SIGNAL: MAX_OPERATOR_LEN,
    }
)
TEXT_SIGNALS: Final = frozenset(TEXT_LIMITS)

#: Canonical signal names a machine may map; anything else is free telemetry.
CANONICAL_SIGNALS: Final = frozenset(
    {"state", "alarm_code", "cycle_time", *COUNT_SIGNALS, *BIT_SIGNALS, *TEXT_SIGNALS}
)
#: Canonical signals whose values :func:`normalise` checks or converts (``cycle_time`` is a
#: plain number like any telemetry).
TYPED_SIGNALS: Final = CANONICAL_SIGNALS - {"cycle_time"}


def parse_state(value: object) -> str:
    """A device state as its canonical name; blanks and case do not matter (``" Running "``)."""
    if type(value) is str and value in _DEVICE_STATE_SET:
        return value  # the common case: already canonical
    if isinstance(value, str):
        text = str(value).strip().lower()
        if text in _DEVICE_STATE_SET:
            return text
    raise ValueError(
        f"unknown machine state {value!r}: a device state is one of {', '.join(DEVICE_STATES)}"
    )


def parse_count(value: object, wrap: int | None = None, what: str = "counter value") -> int:
    """A whole, non-negative count (below ``wrap`` if given) as an int, else ``ValueError``."""
    # Every counter of every poll comes here: a plain int in range returns at once.
    if type(value) is int and 0 <= value <= MAX_COUNT and (wrap is None or value < wrap):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got bool {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{what} must be a number (an integer), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")
    if value > MAX_COUNT:
        raise ValueError(f"{what} {value} is implausibly large")
    if wrap is not None and value >= wrap:
        raise ValueError(f"{what} {value} is outside the wrap modulus {wrap}")
    return value


def parse_target(value: object) -> int:
    """A target quantity, 0 (none) up to :data:`MAX_TARGET`."""
    target = parse_count(value, what=TARGET_SIGNAL)
    if target > MAX_TARGET:
        raise ValueError(f"target {target} above {MAX_TARGET}")
    return target


def parse_int(value: object, what: str) -> int:
    """A whole number (an alarm code), negative allowed."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got bool")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def parse_bit(value: object, what: str) -> bool:
    """A bit: ``True``/``False`` or ``1``/``0``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{what} must be a bit (true/false, 0/1), got {value!r}")


def clean_text(value: object, what: str, max_len: int = MAX_TEXT_LEN) -> str:
    """Text from a device or the platform, trimmed of blanks and NUL padding, and bounded.

    An int (or a whole float: an order number in a float register) is taken as its digits.
    """
    if type(value) is not str:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"{what} must be a string, got {type(value).__name__}")
        value = str(value)
    # Register-encoded strings come padded with NULs or blanks.
    text = value.strip().strip("\x00").strip()
    if len(text) > max_len:
        raise ValueError(f"{what} longer than {max_len} characters")
    if not text.isprintable():
        raise ValueError(f"{what} is not printable text: it contains control characters")
    return text


Parser = Callable[[object], bool | int | float | str]


def _count_parser(name: str) -> Parser:
    def parse(value: object) -> int:
        # The common case inline (every counter of every poll); the rest says what is wrong.
        if type(value) is int and 0 <= value <= MAX_COUNT:
            return value
        return parse_count(value, None, name)

    return parse


def _text_parser(name: str, max_len: int) -> Parser:
    def parse(value: object) -> str:
        if type(value) is str:
            text = value.strip().strip("\x00").strip()
            if len(text) <= max_len and text.isprintable():
                return text
        return clean_text(value, name, max_len)

    return parse


def _int_parser(name: str) -> Parser:
    def parse(value: object) -> int:
        return value if type(value) is int else parse_int(value, name)

    return parse


def _bit_parser(name: str) -> Parser:
    def parse(value: object) -> bool | int:
        bit = parse_bit(value, name)
        # Bits keep their type (``1`` stays ``1``): history stores them as they were read.
        return value if isinstance(value, int) else bit

    return parse


#: The validator of each typed signal: the canonical value, or ``ValueError`` saying what
#: is wrong. A plain dict on purpose: one look-up per mapped sample (a mapping proxy's
#: ``get`` costs twice as much); read-only by its type.
PARSERS: Final[Mapping[str, Parser]] = {
    "state": parse_state,
    **{name: _count_parser(name) for name in COUNTER_SIGNALS},
    TARGET_SIGNAL: parse_target,
    **{name: _text_parser(name, n) for name, n in TEXT_LIMITS.items()},
    "alarm_code": _int_parser("alarm_code"),
    **{name: _bit_parser(name) for name in BIT_SIGNALS},
}
if frozenset(PARSERS) != TYPED_SIGNALS:  # pragma: no cover - a vocabulary edit gone wrong
    raise RuntimeError("every typed signal needs exactly one parser")


def normalise(signal: str, value: object) -> bool | int | float | str:
    """The canonical value of ``signal``, or ``ValueError`` saying what is wrong with it.

    Free telemetry (any name not in :data:`TYPED_SIGNALS`) is returned as it is. Bits keep
    their type (``1`` stays ``1``): history stores them as they were read.
    """
    parse = PARSERS.get(signal)
    if parse is not None:
        return parse(value)
    if isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"{signal} must be a number, a bit or a text, got {type(value).__name__}")
