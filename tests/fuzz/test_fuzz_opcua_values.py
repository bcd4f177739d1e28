"""Fuzz: OPC UA variants and status codes mapped to samples (``adapters/opcua/values.py``).

Two ways in: real asyncua ``DataValue`` objects of every built-in variant type, sent through
asyncua's binary encoding and decoded again (what the adapter gets from the wire), mapped by
the adapter's own unwrapping; and arbitrary Python objects (wrong types, NaN, huge ints,
nested lists) handed to ``convert`` and ``to_sample`` directly. Either the result is a
sample (a BAD one with a reason) or the documented ``DecodeError``; a GOOD or UNCERTAIN
sample carries a value that encodes as JSON, as the envelope will encode it.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary
from asyncua.ua.uaerrors import UaError
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.core.model import Quality, Sample
from shopfloor_gateway.adapters.base import DecodeError
from shopfloor_gateway.adapters.opcua.adapter import OpcUaAdapter
from shopfloor_gateway.adapters.opcua.config import OpcUaConnectionConfig, OpcUaSignalConfig
from shopfloor_gateway.adapters.opcua.values import convert, quality_of, status_text, to_sample
from tests.fuzz import fuzz

NOW = 1_750_000_000.0
VT = ua.VariantType

#: Any 32-bit status code, plus the well-known ones and the severity boundaries.
status_codes = st.one_of(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 0x40000000, 0x80000000, 0xC0000000, 0x80340000, 0x408F0000]),
)

#: Timestamps a server may send: missing, naive, any offset, the OPC UA null date, extremes.
timestamps = st.one_of(
    st.none(),
    st.datetimes(),
    st.datetimes(
        timezones=st.builds(
            timezone, st.timedeltas(timedelta(hours=-23, minutes=-59), timedelta(hours=23))
        )
    ),
    st.just(datetime(1601, 1, 1, tzinfo=UTC)),
)

_text = st.text(max_size=40)
_names = st.one_of(st.none(), _text)


def _scalar(vt: ua.VariantType) -> st.SearchStrategy[Any]:
    """Values asyncua can encode as ``vt`` (the wire allows any of them)."""
    ints = {
        VT.SByte: (-(2**7), 2**7 - 1),
        VT.Byte: (0, 2**8 - 1),
        VT.Int16: (-(2**15), 2**15 - 1),
        VT.UInt16: (0, 2**16 - 1),
        VT.Int32: (-(2**31), 2**31 - 1),
        VT.UInt32: (0, 2**32 - 1),
        VT.Int64: (-(2**63), 2**63 - 1),
        VT.UInt64: (0, 2**64 - 1),
    }
    if vt in ints:
        lo, hi = ints[vt]
        return st.integers(lo, hi)
    simple: dict[ua.VariantType, st.SearchStrategy[Any]] = {
        VT.Boolean: st.booleans(),
        VT.Float: st.floats(width=32),
        VT.Double: st.floats(),
        VT.String: st.one_of(st.none(), _text),
        VT.XmlElement: _text.map(ua.XmlElement),
        VT.DateTime: st.datetimes(
            min_value=datetime(1601, 1, 1), max_value=datetime(9999, 12, 31)
        ).map(lambda d: d.replace(tzinfo=UTC)),
        VT.Guid: st.uuids(),
        VT.ByteString: st.one_of(st.none(), st.binary(max_size=40)),
        VT.NodeId: st.builds(ua.NodeId, st.integers(0, 2**32 - 1), st.integers(0, 200)),
        VT.ExpandedNodeId: st.builds(
            ua.ExpandedNodeId, st.integers(0, 2**32 - 1), st.integers(0, 200)
        ),
        VT.StatusCode: status_codes.map(ua.StatusCode),
        VT.QualifiedName: st.builds(ua.QualifiedName, _names, st.integers(0, 200)),
        VT.LocalizedText: st.builds(ua.LocalizedText, _names, _names),
        VT.ExtensionObject: st.just(ua.ExtensionObject(ua.NodeId(0, 0), b"\x00\x01")),
        VT.DataValue: st.builds(ua.DataValue, st.builds(ua.Variant, st.integers(0, 9))),
        VT.Variant: st.builds(ua.Variant, st.integers(0, 9)),
        VT.DiagnosticInfo: st.just(ua.DiagnosticInfo()),
        VT.Null: st.none(),
    }
    return simple[vt]


@st.composite
def variants(draw: st.DrawFn) -> ua.Variant:
    """A scalar or an array of any built-in type (arrays of nulls and empty ones included)."""
    vt = draw(st.sampled_from(list(VT)))
    if vt is not VT.Null and draw(st.booleans()):
        values = draw(st.lists(_scalar(vt), max_size=5))
        return ua.Variant(values, vt, is_array=True)
    return ua.Variant(draw(_scalar(vt)), vt)


def _wire(dv: ua.DataValue) -> ua.DataValue:
    """The DataValue as the client decodes it after the binary encoding."""
    return struct_from_binary(ua.DataValue, Buffer(struct_to_binary(dv)))


def _adapter(array_index: int | None) -> OpcUaAdapter:
    conn = OpcUaConnectionConfig.model_validate({"url": "opc.tcp://127.0.0.1:4840/"})
    sig = OpcUaSignalConfig.model_validate({"node_id": "ns=2;s=X", "array_index": array_index})
    return OpcUaAdapter("m1", conn, {"x": sig}, 1.0)


def _check(sample: Sample, reason: str | None) -> None:
    """The property every mapped sample holds."""
    assert sample.machine == "m1"
    assert math.isfinite(sample.source_time)
    if sample.quality is Quality.BAD:
        assert sample.value is None
        assert reason
        return
    assert reason is None
    assert sample.value is not None
    assert isinstance(sample.value, bool | int | float | str)
    if isinstance(sample.value, float):
        assert math.isfinite(sample.value)
    # As the envelope encodes it: strict JSON, UTF-8 on the wire.
    json.dumps(sample.value, allow_nan=False, ensure_ascii=False).encode("utf-8")


array_indexes = st.one_of(st.none(), st.integers(0, 6), st.integers(0, 2**64))


@fuzz(300)
@given(variants(), status_codes, timestamps, array_indexes)
@example(ua.Variant(float("nan"), VT.Double), 0, None, None)
@example(ua.Variant([[1, 2], [3, 4]], VT.Int32, is_array=True), 0, None, 0)
@example(ua.Variant([], VT.Int32, is_array=True), 0, None, 0)
@example(ua.Variant(None, VT.String), 0, datetime(1601, 1, 1), None)
@example(ua.Variant(2**64 - 1, VT.UInt64), 0x40000000, datetime.max, None)
def test_wire_datavalues_map_to_a_sample(
    variant: ua.Variant, status: int, ts: datetime | None, array_index: int | None
) -> None:
    try:
        dv = _wire(ua.DataValue(variant, ua.StatusCode(status), SourceTimestamp=ts))
    except (UaError, ValueError, OverflowError, TypeError, AttributeError):
        return  # asyncua cannot encode this one: it never reaches the gateway
    sample, reason = _adapter(array_index)._to_sample("x", dv, NOW)
    _check(sample, reason)
    if quality_of(status) is Quality.BAD:
        assert sample.quality is Quality.BAD
        assert reason is not None and f"0x{status:08X}" in reason


#: Anything a buggy server library or a future asyncua could hand over.
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**64, max_value=2**200),
    st.floats(),
    st.text(),
    st.binary(),
    st.uuids(),
    st.datetimes(),
    st.decimals(),
    st.complex_numbers(),
    st.just(object()),
    st.just(Ellipsis),
    st.sampled_from(list(VT)),  # an IntEnum
    st.builds(ua.LocalizedText, _names),
    st.builds(ua.QualifiedName, st.one_of(st.none(), _text)),
    st.builds(ua.NodeId, st.integers(0, 2**32 - 1), st.integers(0, 200)),
    st.builds(ua.StatusCode, st.integers(0, 2**32 - 1)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    st.frozensets(st.integers(), max_size=3),
)
values = st.recursive(
    leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner)), max_leaves=8
)
type_names = st.one_of(st.none(), st.sampled_from([v.name for v in VT]), st.text(max_size=8))


@fuzz(300)
@given(values, type_names, array_indexes)
@example(float("inf"), "Double", None)
@example(Decimal("NaN"), "Double", None)
@example("\ud800", "String", None)
@example(10**5000, "UInt64", None)
@example([1, 2, 3], "Int32", 3)
@example(b"\xff", "ByteString", None)
def test_convert_returns_a_json_value_or_a_decode_error(
    value: object, variant_type: str | None, array_index: int | None
) -> None:
    try:
        out = convert(value, variant_type, array_index)
    except DecodeError as exc:
        assert str(exc)
        return
    assert isinstance(out, bool | int | float | str)
    if isinstance(out, float):
        assert math.isfinite(out)
    json.dumps(out, allow_nan=False, ensure_ascii=False).encode("utf-8")


@fuzz(200)
@given(values, type_names, status_codes, _names, timestamps, array_indexes, st.data())
def test_to_sample_never_raises(
    value: object,
    variant_type: str | None,
    status: int,
    status_name: str | None,
    ts: datetime | None,
    array_index: int | None,
    data: st.DataObject,
) -> None:
    # Codes outside 32 bits only come from a buggy stack, but must not crash either.
    status = data.draw(st.one_of(st.just(status), st.integers()), label="status")
    sample, reason = to_sample(
        "m1",
        "x",
        value=value,
        variant_type=variant_type,
        status_code=status,
        status_name=status_name,
        source_timestamp=ts,
        now=NOW,
        array_index=array_index,
    )
    _check(sample, reason)
    assert quality_of(status) in (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD)
    assert status_text(status, status_name)


def test_uuid_and_datetime_values_are_plain_json() -> None:
    """Two types with a non-obvious mapping, pinned."""
    u = uuid.UUID(int=7)
    assert convert(u) == str(u)
    assert convert(datetime(2025, 1, 1, tzinfo=UTC)) == 1735689600.0
