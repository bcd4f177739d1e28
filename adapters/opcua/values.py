"""Pure mapping of OPC UA values and status codes to the gateway's ``Value`` and ``Quality``.

The adapter unwraps asyncua's ``DataValue`` into plain parts (the variant's Python value,
its variant type name, the status code as an integer, the source timestamp) and hands
them here; nothing in this module talks to a server or reads a clock.

Quality follows the severity bits of the StatusCode (OPC 10000-4, 7.39): ``00`` Good,
``01`` Uncertain, ``10``/``11`` Bad. A bad status gives ``value=None``; an uncertain one
keeps the value and says so.

Value mapping:

========================================  ==========================================
OPC UA built-in type                      gateway value
========================================  ==========================================
Boolean                                   ``bool``
SByte .. UInt64, enumerations             ``int``
Float                                     ``float`` rounded to 7 significant digits
Double                                    ``float`` (NaN and infinity are refused)
String, XmlElement                        ``str``
LocalizedText                             its text (the locale is dropped)
QualifiedName                             its name
DateTime                                  ``float`` epoch seconds (UTC)
Guid, NodeId, ExpandedNodeId, StatusCode  their string form
ByteString                                lower-case hex
arrays                                    one element, picked by ``array_index``
========================================  ==========================================

Text that is not valid UTF-8 on the wire keeps its readable part: each invalid byte becomes
U+FFFD. An integer outside Int64..UInt64 (only a broken stack sends one) is refused.

Structures (ExtensionObjects), DataValues, Variants and matrices are refused with a
:class:`~adapters.base.DecodeError` naming the type: that one signal turns bad.
"""

from __future__ import annotations

import enum
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from gateway.core.model import Quality, Sample, Value
from shopfloor_gateway.adapters.base import DecodeError

#: DateTimes at or before this are the OPC UA "null" DateTime (1601-01-01, encoded as 0).
_NULL_DATETIME_EPOCH = datetime(1601, 1, 2, tzinfo=UTC).timestamp()

#: Integers outside Int64..UInt64 are no OPC UA value (and exceed what JSON readers take).
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

#: Lone UTF-16 surrogates (asyncua's ``surrogateescape`` for bytes that are not UTF-8).
_SURROGATES = re.compile("[\ud800-\udfff]")

#: StatusCode severity (the top two bits) to quality.
_SEVERITY: Mapping[int, Quality] = {
    0: Quality.GOOD,
    1: Quality.UNCERTAIN,
    2: Quality.BAD,
    3: Quality.BAD,
}

#: Well-known codes for readable messages without importing asyncua (OPC 10000-4, 7.39).
STATUS_NAMES: Mapping[int, str] = {
    0x00000000: "Good",
    0x80340000: "BadNodeIdUnknown",
    0x80330000: "BadNodeIdInvalid",
    0x80350000: "BadAttributeIdInvalid",
    0x803E0000: "BadNotReadable",
    0x801F0000: "BadUserAccessDenied",
    0x80310000: "BadNoCommunication",
    0x80320000: "BadWaitingForInitialData",
    0x808A0000: "BadNotConnected",
    0x808B0000: "BadDeviceFailure",
    0x808C0000: "BadSensorFailure",
    0x808D0000: "BadOutOfService",
    0x80000000: "Bad",
    0x40000000: "Uncertain",
    0x408F0000: "UncertainInitialValue",
    0x40900000: "UncertainLastUsableValue",
    0x40920000: "UncertainSensorNotAccurate",
}


def quality_of(status_code: int) -> Quality:
    """Quality from a StatusCode's severity bits."""
    return _SEVERITY[(status_code >> 30) & 0b11]


def status_text(status_code: int, name: str | None = None) -> str:
    """``BadNodeIdUnknown (0x80340000)``: a code with its name, for logs and reasons."""
    label = name or STATUS_NAMES.get(status_code & 0xFFFF0000, "status")
    return f"{label} (0x{status_code:08X})"


def epoch(timestamp: datetime | None, fallback: float) -> float:
    """Epoch seconds of an OPC UA DateTime; ``fallback`` when missing or the null DateTime."""
    if timestamp is None:
        return fallback
    if timestamp.tzinfo is None:
        # asyncua decodes UTC; naive values come from servers that wrote naive UTC datetimes.
        timestamp = timestamp.replace(tzinfo=UTC)
    seconds = timestamp.timestamp()
    if seconds <= _NULL_DATETIME_EPOCH:
        return fallback
    return seconds


def convert(
    value: object, variant_type: str | None = None, array_index: int | None = None
) -> Value:
    """Turn a decoded variant value into a gateway value; raise :class:`DecodeError` if unusable.

    ``variant_type`` is the OPC UA built-in type name (``"Float"``, ``"Double"`` ...) when
    known; ``array_index`` picks one element of an array value.
    """
    if isinstance(value, list | tuple):
        if array_index is None:
            raise DecodeError(f"value is an array of {len(value)} elements: set array_index")
        if array_index >= len(value):
            raise DecodeError(
                f"array_index {array_index} is out of range: the array has {len(value)} elements"
            )
        value = value[array_index]
        if isinstance(value, list | tuple):
            raise DecodeError("value is a matrix (array of arrays): not supported")
    elif array_index is not None and value is not None:
        raise DecodeError(f"array_index {array_index} is set but the value is a scalar")
    return _scalar(value, variant_type)


def _scalar(value: object, variant_type: str | None) -> Value:
    """One scalar value (see the module table)."""
    if value is None:
        raise DecodeError("the server sent an empty value (Null variant) with a good status")
    if isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        # asyncua turns enumerations into IntEnum classes once their types are loaded.
        if isinstance(value, int):
            return int(value)
        return value.name
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise DecodeError(f"integer value of {value.bit_length()} bits is outside Int64/UInt64")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"value {value} is not a finite number")
        if variant_type == "Float":
            # A Float arrives widened to double (0.1 -> 0.10000000149011612); 7 significant
            # digits is what a float32 actually carries.
            return float(f"{value:.7g}")
        return value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        seconds = value.timestamp()
        if seconds <= _NULL_DATETIME_EPOCH:
            raise DecodeError("DateTime is the null date (1601-01-01): no time set")
        return seconds
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    # asyncua types, recognised by shape so this module does not import asyncua.
    if hasattr(value, "Text") and hasattr(value, "Locale"):  # LocalizedText
        text = value.Text
        return "" if text is None else _text(str(text))
    if hasattr(value, "Name") and hasattr(value, "NamespaceIndex"):  # QualifiedName
        name = value.Name
        return "" if name is None else _text(str(name))
    to_string = getattr(value, "to_string", None)
    if callable(to_string) and hasattr(value, "NodeIdType"):  # NodeId, ExpandedNodeId
        return _text(str(to_string()))
    if hasattr(value, "is_good") and hasattr(value, "name"):  # StatusCode as a value
        return str(value.name)
    raise DecodeError(f"unsupported value type {type(value).__name__}")


def _text(value: str) -> str:
    """A string that encodes as UTF-8: invalid bytes from the device become U+FFFD.

    asyncua decodes String with ``errors="surrogateescape"``, so a device that writes
    Latin-1 or CP1252 (``Pr\\xfcfung``) yields lone surrogates, which no JSON payload
    can carry.
    """
    if _SURROGATES.search(value) is None:
        return value
    return _SURROGATES.sub("\ufffd", value)


def to_sample(
    machine: str,
    signal: str,
    *,
    value: object,
    variant_type: str | None,
    status_code: int,
    status_name: str | None,
    source_timestamp: datetime | None,
    now: float,
    array_index: int | None = None,
) -> tuple[Sample, str | None]:
    """One sample from the parts of a DataValue, plus the reason when it is bad."""
    source_time = epoch(source_timestamp, now)
    quality = quality_of(status_code)
    if quality is Quality.BAD:
        reason = f"server status {status_text(status_code, status_name)}"
        return Sample(machine, signal, None, source_time, Quality.BAD), reason
    try:
        converted = convert(value, variant_type, array_index)
    except DecodeError as exc:
        return Sample(machine, signal, None, source_time, Quality.BAD), str(exc)
    return Sample(machine, signal, converted, source_time, quality), None


def is_newer(last_seen: float | None, source_time: float) -> bool:
    """Whether a notification is not older than what was already seen for its signal.

    After a reconnect, a server may deliver notifications that predate a value the
    gateway already read: those are dropped so a stale value never overwrites a newer one.
    """
    return last_seen is None or source_time >= last_seen
