"""Pure parsing of OPC UA addresses: NodeId strings and portable browse paths.

NodeIds follow the OPC UA string notation (OPC 10000-6, 5.3.1.10)::

    i=2258                  numeric, namespace 0
    ns=2;s=Machine.State    string identifier in namespace index 2
    nsu=http://x/;i=1001    namespace given by URI: survives renumbered namespace arrays
    ns=3;g=09087e75-...     GUID
    ns=3;b=M/RbKBsRVkePCePcx24oRA==   opaque (base64)

Browse paths are written relative to the connection's ``root`` node, one BrowseName per
segment, separated by ``/``::

    tools:Machine/tools:Monitoring/Stacklight/Lamp1

A segment's optional prefix names the BrowseName's namespace: an alias from the
connection's ``namespaces`` map (resolved by URI on each server, the portable form), or a
numeric namespace index (server-specific). A segment without prefix uses the connection's
``default_namespace`` alias, or namespace 0 when none is set, as in the OPC UA text
notation. ``&`` escapes a literal ``/``, ``:`` or ``&`` inside a name (``Temp&/Humidity``).

Nothing here talks to a server; :mod:`adapters.opcua.adapter` turns the parsed forms into
asyncua NodeIds once it knows the server's namespace array.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

T = TypeVar("T")

#: Identifier kinds of the string notation: numeric, string, GUID, opaque (ByteString).
IdKind = Literal["i", "s", "g", "b"]

_UINT32_MAX = 2**32 - 1
_UINT16_MAX = 2**16 - 1
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A parsed NodeId: namespace by index or by URI, plus the typed identifier."""

    kind: IdKind
    identifier: int | str | uuid.UUID | bytes
    namespace_index: int = 0
    #: When set, the namespace is looked up by this URI on the server (``nsu=`` form).
    namespace_uri: str | None = None

    def __str__(self) -> str:
        """Back to the string notation (the form a user wrote, for messages)."""
        ident = self.identifier
        text = base64.b64encode(ident).decode("ascii") if isinstance(ident, bytes) else str(ident)
        if self.namespace_uri is not None:
            return f"nsu={self.namespace_uri};{self.kind}={text}"
        if self.namespace_index:
            return f"ns={self.namespace_index};{self.kind}={text}"
        return f"{self.kind}={text}"


@dataclass(frozen=True, slots=True)
class PathSegment:
    """One BrowseName of a browse path; ``namespace`` is an alias, an index or ``None``."""

    name: str
    #: ``None``: the default namespace; ``int``: a namespace index; ``str``: an alias.
    namespace: int | str | None = None


@dataclass(frozen=True, slots=True)
class BrowsePath:
    """A parsed browse path: BrowseNames followed from the root by hierarchical references."""

    segments: tuple[PathSegment, ...]

    @property
    def aliases(self) -> frozenset[str]:
        """Namespace aliases the path uses (they must be declared in the connection)."""
        return frozenset(s.namespace for s in self.segments if isinstance(s.namespace, str))

    def __str__(self) -> str:
        """Back to the text notation, for messages."""
        parts = []
        for seg in self.segments:
            name = _escape(seg.name)
            parts.append(name if seg.namespace is None else f"{seg.namespace}:{name}")
        return "/".join(parts)


def parse_node_id(text: str) -> NodeAddress:
    """Parse ``ns=2;s=Foo`` / ``nsu=URI;i=5`` / ``i=85``; ``ValueError`` says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("node_id must not be empty: write e.g. 'ns=2;s=Machine.State' or 'i=2258'")
    if text != text.strip():
        raise ValueError(f"node_id {text!r} has leading or trailing whitespace")
    namespace_index = 0
    namespace_uri: str | None = None
    rest = text
    if rest.startswith("ns="):
        head, sep, rest = rest.partition(";")
        if not sep:
            raise ValueError(
                f"node_id {text!r}: expected ';' after the namespace, e.g. 'ns=2;s=Name'"
            )
        raw = head[3:]
        if not raw.isdigit():
            raise ValueError(f"node_id {text!r}: namespace index {raw!r} is not a whole number")
        namespace_index = int(raw)
        if namespace_index > _UINT16_MAX:
            raise ValueError(f"node_id {text!r}: namespace index {namespace_index} exceeds 65535")
    elif rest.startswith("nsu="):
        # The identifier starts at the first ';' followed by a kind letter and '=', so a
        # string identifier may itself contain ';' (common in PLC symbol names).
        match = re.match(r"^nsu=(.+?);([isgb])=", rest, flags=re.DOTALL)
        if match is None:
            raise ValueError(
                f"node_id {text!r}: expected 'nsu=<namespace URI>;<i|s|g|b>=<identifier>'"
            )
        namespace_uri = match.group(1)
        rest = rest[len("nsu=") + len(namespace_uri) + 1 :]
    kind, sep, ident = rest.partition("=")
    if not sep or kind not in ("i", "s", "g", "b"):
        raise ValueError(
            f"node_id {text!r}: identifier must start with i=, s=, g= or b= "
            "(numeric, string, GUID, opaque)"
        )
    if not ident:
        raise ValueError(f"node_id {text!r}: the identifier after '{kind}=' is empty")
    value: int | str | uuid.UUID | bytes
    if kind == "i":
        if not ident.isdigit() or int(ident) > _UINT32_MAX:
            raise ValueError(f"node_id {text!r}: numeric identifier must be 0..4294967295")
        value = int(ident)
    elif kind == "g":
        try:
            value = uuid.UUID(ident)
        except ValueError:
            raise ValueError(f"node_id {text!r}: {ident!r} is not a GUID") from None
    elif kind == "b":
        try:
            value = base64.b64decode(ident, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"node_id {text!r}: {ident!r} is not base64") from None
    else:
        value = ident
    return NodeAddress(kind, value, namespace_index, namespace_uri)  # type: ignore[arg-type]


def parse_browse_path(text: str) -> BrowsePath:
    """Parse ``alias:Name/Name/2:Name`` into segments; raise ``ValueError`` on bad syntax."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "browse_path must not be empty: write e.g. 'tools:Machine/Monitoring/State'"
        )
    segments: list[PathSegment] = []
    for raw in _split_unescaped(text, "/"):
        if raw == "":
            raise ValueError(f"browse_path {text!r}: empty segment (doubled or trailing '/')")
        parts = _split_unescaped(raw, ":")
        if len(parts) > 2:
            raise ValueError(
                f"browse_path {text!r}: segment {raw!r} has more than one ':' "
                "(escape a literal ':' as '&:')"
            )
        namespace: int | str | None = None
        name_raw = parts[-1]
        if len(parts) == 2:
            prefix = parts[0]
            if prefix.isdigit():
                namespace = int(prefix)
                if namespace > _UINT16_MAX:
                    raise ValueError(f"browse_path {text!r}: namespace index {namespace} > 65535")
            elif _ALIAS.match(prefix):
                namespace = prefix
            else:
                raise ValueError(
                    f"browse_path {text!r}: {prefix!r} is neither a namespace alias "
                    "(letters, digits, _ . -) nor a namespace index"
                )
        name = _unescape(name_raw, text)
        if not name:
            raise ValueError(f"browse_path {text!r}: segment {raw!r} has an empty name")
        segments.append(PathSegment(name, namespace))
    return BrowsePath(tuple(segments))


def is_alias(text: str) -> bool:
    """Whether ``text`` can be used as a namespace alias in browse paths."""
    return bool(_ALIAS.match(text)) and not text.isdigit()


def chunks(items: Sequence[T], size: int | None) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items (all at once when ``size`` is None or 0)."""
    if not size or size >= len(items):
        if items:
            yield items
        return
    for start in range(0, len(items), size):
        yield items[start : start + size]


def request_count(items: int, limit: int | None) -> int:
    """Service calls needed for ``items`` operations under a per-call ``limit`` (0/None: none)."""
    if items <= 0:
        return 0
    if not limit:
        return 1
    return math.ceil(items / limit)


def effective_limit(server: int | None, configured: int | None) -> int | None:
    """The tighter of the server's operation limit and the configured cap (0/None: no limit)."""
    limits = [v for v in (server, configured) if v]
    return min(limits) if limits else None


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not preceded by the escape character ``&``."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "&" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(name: str, whole: str) -> str:
    """Resolve ``&/``, ``&:`` and ``&&``; a lone or unknown escape is an error."""
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "&":
            if i + 1 >= len(name) or name[i + 1] not in "/:&":
                raise ValueError(
                    f"browse_path {whole!r}: '&' escapes only '/', ':' or '&' (write '&&' for '&')"
                )
            out.append(name[i + 1])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _escape(name: str) -> str:
    """Inverse of :func:`_unescape`."""
    return name.replace("&", "&&").replace("/", "&/").replace(":", "&:")
