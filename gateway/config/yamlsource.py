"""YAML loading that remembers where every value came from.

Config errors must name the file and line (``gateway.yaml:14: machines[2].connection.port:
...``), so the loader keeps a map from each value's path to its line. It also refuses
duplicate keys, which plain YAML silently resolves to the last one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

#: ``scheme:[//]user:password@`` in any text: the userinfo part of a URL. Greedy up to the
#: last ``@`` of the word, so a password with an unescaped ``@`` is removed whole.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*:/{0,2})[^\s'\"<>]*@")


def strip_url_credentials(text: str) -> str:
    """``opc.tcp://user:pw@host:4840`` → ``opc.tcp://host:4840``, wherever it occurs in ``text``."""
    return _URL_USERINFO.sub(r"\1", text) if "@" in text else text


@dataclass(frozen=True, slots=True)
class SourceError:
    """One problem found while reading or validating a config file."""

    file: str
    line: int | None
    path: str
    message: str

    def __post_init__(self) -> None:
        # Messages quote URLs from the config; their credentials must never be printed or
        # logged, whichever validator wrote the message.
        object.__setattr__(self, "message", strip_url_credentials(self.message))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass(slots=True)
class Located:
    """Parsed YAML data plus the line of every mapping key and sequence item."""

    file: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    errors: list[SourceError] = field(default_factory=list)
    #: Paths whose value came (partly) from ``${VAR}`` substitution → the text as written.
    #: Error messages name the variable there and never show the value.
    substituted: dict[Path_, str] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """The line of the deepest known prefix of ``path``."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def format_path(path: Path_) -> str:
    """``("machines", 2, "signals", "state")`` → ``machines[2].signals.state``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load(path: str | Path) -> Located:
    """Read a YAML file; syntax errors and duplicate keys land in ``errors``, never raise."""
    p = Path(path)
    name = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Located(name, None, errors=[SourceError(name, None, "", "file not found")])
    except (OSError, UnicodeDecodeError) as exc:
        return Located(name, None, errors=[SourceError(name, None, "", f"cannot read: {exc}")])
    return loads(text, name)


def loads(text: str, name: str = "<string>") -> Located:
    """Parse YAML text; see :func:`load`."""
    try:
        # The reader refuses control characters already here, before any parsing.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        return Located(name, None, errors=[SourceError(name, None, "", f"YAML: {exc}")])
    try:
        node = loader.get_single_node()
        if node is None:
            return Located(name, {})
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or str(exc)
        return Located(name, None, errors=[SourceError(name, line, "", f"YAML syntax: {problem}")])
    except yaml.YAMLError as exc:
        return Located(name, None, errors=[SourceError(name, None, "", f"YAML syntax: {exc}")])
    except RecursionError:
        return Located(name, None, errors=[_recursive(name)])
    finally:
        loader.dispose()
    located = Located(name, data)
    try:
        _walk(node, (), located, 0)
    except RecursionError:
        return Located(name, None, errors=[_recursive(name)])
    return located


def _recursive(name: str) -> SourceError:
    return SourceError(
        name, None, "", "YAML nesting is too deep or an alias refers to itself (&a [*a])"
    )


#: A config is a handful of levels deep; anything deeper is a mistake or an attack.
MAX_DEPTH = 64


def _walk(node: yaml.Node, path: Path_, out: Located, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise RecursionError
    out.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            # Keys are compared as YAML would construct them (``1`` and ``"1"`` differ), but
            # for error paths the text form is what a user recognises.
            line = key_node.start_mark.line + 1
            if key in seen:
                out.errors.append(
                    SourceError(
                        out.file,
                        line,
                        format_path((*path, key)),
                        f"duplicate key (first defined on line {seen[key]})",
                    )
                )
                continue
            seen[key] = line
            child: Path_ = (*path, _key_for_path(key))
            out.lines[child] = line
            _walk(value_node, child, out, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), out, depth + 1)


def _key_for_path(key: Any) -> str | int:
    # Path components for mapping keys are always strings, even for ``0: idle`` in an
    # enum map, so they never collide with sequence indexes.
    return str(key)


def lookup(data: Any, path: Path_) -> tuple[bool, Any]:
    """Follow ``path`` into nested dicts/lists; ``(False, None)`` where it leaves the data."""
    cur = data
    for part in path:
        if isinstance(cur, Mapping):
            if part in cur:
                cur = cur[part]
                continue
            matches = [k for k in cur if str(k) == str(part)]
            if not matches:
                return False, None
            cur = cur[matches[0]]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        else:
            return False, None
    return True, cur
