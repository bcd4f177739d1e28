"""NodeId and browse-path notation of the OPC UA adapter (pure)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shopfloor_gateway.adapters.opcua.nodes import (
    NodeAddress,
    PathSegment,
    chunks,
    effective_limit,
    parse_browse_path,
    parse_node_id,
    request_count,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("i=85", NodeAddress("i", 85)),
        ("ns=2;s=Machine.State", NodeAddress("s", "Machine.State", 2)),
        ("ns=2;s=a;b=c", NodeAddress("s", "a;b=c", 2)),
        ("nsu=http://x.org/UA/;i=1001", NodeAddress("i", 1001, 0, "http://x.org/UA/")),
        ("nsu=urn:a:b;s=PLC;Tag", NodeAddress("s", "PLC;Tag", 0, "urn:a:b")),
        (
            "ns=3;g=09087e75-8e5e-499b-954f-f2a9603db28a",
            NodeAddress("g", uuid.UUID("09087e75-8e5e-499b-954f-f2a9603db28a"), 3),
        ),
        ("ns=1;b=AAEC", NodeAddress("b", b"\x00\x01\x02", 1)),
    ],
)
def test_node_ids_parse(text: str, expected: NodeAddress) -> None:
    """Every form of the string notation."""
    assert parse_node_id(text) == expected
    assert str(parse_node_id(text)) == text.replace("ns=0;", "")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must not be empty"),
        ("ns=x;i=1", "not a whole number"),
        ("ns=2", "expected ';'"),
        ("ns=70000;i=1", "exceeds 65535"),
        ("ns=2;q=1", "i=, s=, g= or b="),
        ("i=-1", "0..4294967295"),
        ("i=4294967296", "0..4294967295"),
        ("ns=2;s=", "is empty"),
        ("g=nope", "not a GUID"),
        ("b=***", "not base64"),
        ("nsu=;i=1", "nsu=<namespace URI>"),
        (" i=1", "whitespace"),
    ],
)
def test_bad_node_ids_say_what_is_wrong(text: str, fragment: str) -> None:
    """Clear messages for typos."""
    with pytest.raises(ValueError, match=fragment):
        parse_node_id(text)


def test_browse_path_segments_and_escapes() -> None:
    """Alias, index and default segments; '&' escapes separators."""
    path = parse_browse_path("tools:Machine/2:Monitoring/Temp&/Humidity/A&:B&&C")
    assert path.segments == (
        PathSegment("Machine", "tools"),
        PathSegment("Monitoring", 2),
        PathSegment("Temp/Humidity"),
        PathSegment("A:B&C"),
    )
    assert path.aliases == {"tools"}
    assert str(path) == "tools:Machine/2:Monitoring/Temp&/Humidity/A&:B&&C"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must not be empty"),
        ("A//B", "empty segment"),
        ("A/", "empty segment"),
        ("a:b:C", "more than one ':'"),
        ("a b:C", "neither a namespace alias"),
        ("x:", "empty name"),
        ("A&B", "'&' escapes only"),
        ("99999:A", "> 65535"),
    ],
)
def test_bad_browse_paths(text: str, fragment: str) -> None:
    """Syntax errors are found when the config loads."""
    with pytest.raises(ValueError, match=fragment):
        parse_browse_path(text)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5))
def test_browse_path_round_trip(names: list[str]) -> None:
    """Any names survive escaping and parsing."""
    from shopfloor_gateway.adapters.opcua.nodes import BrowsePath

    path = BrowsePath(tuple(PathSegment(n, "ns") for n in names))
    assert parse_browse_path(str(path)) == path


@given(st.integers(0, 500), st.integers(0, 50))
def test_chunks_cover_everything_within_the_limit(n: int, limit: int) -> None:
    """Chunks are in order, complete, within the limit, and as few as the limit allows."""
    items = list(range(n))
    parts = list(chunks(items, limit))
    assert [x for p in parts for x in p] == items
    assert all(len(p) <= (limit or n) for p in parts)
    assert len(parts) == request_count(n, limit)


def test_effective_limit() -> None:
    """The tighter limit wins; 0 and None mean unlimited."""
    assert effective_limit(None, None) is None
    assert effective_limit(0, None) is None
    assert effective_limit(1000, None) == 1000
    assert effective_limit(1000, 50) == 50
    assert effective_limit(None, 50) == 50
    assert request_count(10, 3) == 4
