"""OPC UA value and status mapping (pure)."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

import pytest
from asyncua import ua

from gateway.core.model import Quality
from shopfloor_gateway.adapters.base import DecodeError, next_deadline
from shopfloor_gateway.adapters.opcua.values import (
    convert,
    epoch,
    is_newer,
    quality_of,
    status_text,
    to_sample,
)


class Mode(enum.IntEnum):
    """An enumeration as asyncua generates it."""

    AUTO = 1


@pytest.mark.parametrize(
    ("value", "vtype", "expected"),
    [
        (True, "Boolean", True),
        (-5, "Int16", -5),
        (2**63, "UInt64", 2**63),
        (0.10000000149011612, "Float", 0.1),
        (0.1, "Double", 0.1),
        ("P-1", "String", "P-1"),
        (ua.LocalizedText("Spindel", "de"), "LocalizedText", "Spindel"),
        (ua.LocalizedText(None), "LocalizedText", ""),
        (ua.QualifiedName("Name", 2), "QualifiedName", "Name"),
        (
            datetime(2026, 1, 1, tzinfo=UTC),
            "DateTime",
            datetime(2026, 1, 1, tzinfo=UTC).timestamp(),
        ),
        (datetime(2026, 1, 1), "DateTime", datetime(2026, 1, 1, tzinfo=UTC).timestamp()),
        (Mode.AUTO, "Int32", 1),
        (b"\x01\xff", "ByteString", "01ff"),
        (uuid.UUID(int=1), "Guid", str(uuid.UUID(int=1))),
        (ua.NodeId("X", 2), "NodeId", "ns=2;s=X"),
    ],
)
def test_builtin_types(value: object, vtype: str, expected: object) -> None:
    """Each built-in type maps to a plain value."""
    assert convert(value, vtype) == expected


@pytest.mark.parametrize(
    ("value", "index", "fragment"),
    [
        (None, None, "empty value"),
        (float("nan"), None, "not a finite number"),
        ([1, 2], None, "set array_index"),
        ([1, 2], 2, "out of range"),
        ([[1]], 0, "matrix"),
        (5, 0, "is a scalar"),
        (datetime(1601, 1, 1, tzinfo=UTC), None, "null date"),
        (ua.Argument(), None, "unsupported value type Argument"),
    ],
)
def test_unusable_values_raise_decode_error(
    value: object, index: int | None, fragment: str
) -> None:
    """What cannot be mapped says why."""
    with pytest.raises(DecodeError, match=fragment):
        convert(value, None, index)


def test_array_index_picks_one_element() -> None:
    """array_index selects from arrays."""
    assert convert([3, 5, 7], "Int32", 2) == 7


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (ua.StatusCodes.Good, Quality.GOOD),
        (ua.StatusCodes.GoodOverload, Quality.GOOD),
        (ua.StatusCodes.UncertainLastUsableValue, Quality.UNCERTAIN),
        (ua.StatusCodes.BadNodeIdUnknown, Quality.BAD),
        (ua.StatusCodes.BadCommunicationError, Quality.BAD),
        (0xC0000000, Quality.BAD),
    ],
)
def test_status_severity(code: int, quality: Quality) -> None:
    """Severity bits decide the quality."""
    assert quality_of(code) is quality


def test_to_sample_quality_and_time() -> None:
    """Bad status: no value plus a reason; uncertain keeps the value; source time preferred."""
    t = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    bad, reason = to_sample(
        "m",
        "s",
        value=3,
        variant_type="Int32",
        status_code=ua.StatusCodes.BadNodeIdUnknown,
        status_name="BadNodeIdUnknown",
        source_timestamp=None,
        now=100.0,
    )
    assert (bad.value, bad.quality, bad.source_time) == (None, Quality.BAD, 100.0)
    assert reason == "server status BadNodeIdUnknown (0x80340000)"
    unc, reason = to_sample(
        "m",
        "s",
        value=3,
        variant_type="Int32",
        status_code=ua.StatusCodes.UncertainInitialValue,
        status_name=None,
        source_timestamp=t,
        now=100.0,
    )
    assert (unc.value, unc.quality, unc.source_time, reason) == (
        3,
        Quality.UNCERTAIN,
        t.timestamp(),
        None,
    )
    broken, reason = to_sample(
        "m",
        "s",
        value=[1],
        variant_type="Int32",
        status_code=0,
        status_name=None,
        source_timestamp=t,
        now=1.0,
    )
    assert broken.quality is Quality.BAD and reason is not None and "array_index" in reason


def test_epoch_and_staleness() -> None:
    """Null/missing timestamps fall back to the client clock; older notifications are stale."""
    assert epoch(None, 5.0) == 5.0
    assert epoch(datetime(1601, 1, 1, tzinfo=UTC), 5.0) == 5.0
    assert epoch(datetime(2026, 1, 1), 5.0) == datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert is_newer(None, 1.0) and is_newer(1.0, 1.0) and not is_newer(2.0, 1.0)
    assert status_text(0x80340000) == "BadNodeIdUnknown (0x80340000)"


def test_fixed_rate_deadlines_skip_missed_ticks() -> None:
    """Polling never bunches up after a slow cycle."""
    assert next_deadline(10.0, 10.5, 1.0) == (11.0, 0)
    assert next_deadline(10.0, 13.5, 1.0) == (14.0, 3)
