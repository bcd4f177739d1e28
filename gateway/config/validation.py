"""From YAML data to models, with messages that say what to fix and never show a secret.

Shared by every step of loading: ``${ENV}`` substitution, model validation turned into
:class:`~gateway.config.yamlsource.SourceError` lines with file, line and the path the user
wrote, and :class:`Hidden`, which scrubs secrets and substituted values from every message.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError

from gateway.config.influx import InfluxConfig
from gateway.config.models import (
    Config,
)
from gateway.config.protocols import installed
from gateway.config.yamlsource import (
    Located,
    Path_,
    SourceError,
    format_path,
    lookup,
    strip_url_credentials,
)

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config file has problems; ``errors`` lists every one with file and line."""

    def __init__(self, errors: Iterable[SourceError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


_M = TypeVar("_M", bound=BaseModel)


def substitute_env(
    data: Any, path: Path_, env: Mapping[str, str], src: Located, errors: list[SourceError]
) -> Any:
    """``data`` with each ``${VAR}`` replaced (``$$`` is a literal ``$``); unset ones are errors."""
    if isinstance(data, dict):
        return {k: substitute_env(v, (*path, str(k)), env, src, errors) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute_env(v, (*path, i), env, src, errors) for i, v in enumerate(data)]
    if isinstance(data, str) and "$" in data:
        used = False

        def repl(m: re.Match[str]) -> str:
            nonlocal used
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in env:
                # Only values from the environment are hidden: a default is in the file.
                used = True
                return env[name]
            if default is not None:
                return default
            errors.append(
                SourceError(
                    src.file,
                    src.line_of(path),
                    format_path(path),
                    f"environment variable {name} is not set "
                    f"(set it, or write ${{{name}:-default}})",
                )
            )
            return ""

        text = _ENV_RE.sub(repl, data)
        if used:
            # Error messages show the reference as written, never what it stood for: a
            # ${MQTT_PASSWORD} put in the wrong field must not end up on a terminal or in a log.
            src.substituted[path] = data
        return text
    return data


def validate(
    model: type[_M], data: Any, src: Located, base: Path_, errors: list[SourceError]
) -> _M | None:
    """``data`` as a ``model``, or ``None`` with its problems added to ``errors``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.extend(_errors_from(exc, data, src, base))
        return None


def _errors_from(exc: ValidationError, data: Any, src: Located, base: Path_) -> list[SourceError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _data_path(data, tuple(err["loc"]))
        full = (*base, *loc)
        msg = _message(err, _hidden_as(full, src))
        out.append(SourceError(src.file, src.line_of(full), format_path(full), msg))
    return out


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    # Pydantic adds union/tag members and validator names to ``loc`` that are not keys of
    # the data; keep only the parts that exist, so the path is what the user wrote.
    out: list[str | int] = []
    cur_ok, cur = True, data
    for part in loc:
        if not cur_ok:
            break
        ok, nxt = lookup(cur, (part,))
        if ok:
            out.append(part if isinstance(part, int) else str(part))
            cur = nxt
        elif isinstance(cur, dict) and isinstance(part, str) and part not in cur:
            # A missing or extra key: name it, then stop.
            out.append(part)
            cur_ok = False
    return tuple(out)


@functools.cache
def _fields() -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """Every field of the config models, nested ones included: (name, its type's parts)."""
    todo: list[type[BaseModel]] = [Config, InfluxConfig]
    for spec in installed().values():
        todo += [spec.connection_model, spec.signal_model]
    out: list[tuple[str, tuple[Any, ...]]] = []
    seen: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            parts = tuple(_type_parts(info.annotation))
            out.append((name, parts))
            todo += [a for a in parts if isinstance(a, type) and issubclass(a, BaseModel)]
    return tuple(out)


def _known_keys() -> list[str]:
    """Every key of the config models, nested ones included (for spelling suggestions)."""
    return sorted({name for name, _ in _fields()})


def _secret_keys() -> frozenset[str]:
    """Names of every ``SecretStr`` field in the config models, nested ones included."""
    names = {"password", "secret", "token", "private_key_password"}
    return frozenset(names | {name for name, parts in _fields() if SecretStr in parts})


def _type_parts(annotation: Any) -> list[Any]:
    out, todo = [], [annotation]
    while todo:
        t = todo.pop()
        out.append(t)
        todo.extend(getattr(t, "__args__", ()))
    return out


_SECRET_KEYS: frozenset[str] | None = None


def _is_secret_path(path: Path_) -> bool:
    global _SECRET_KEYS
    if _SECRET_KEYS is None:
        _SECRET_KEYS = _secret_keys()
    names = [p for p in path if isinstance(p, str)]
    return bool(names) and names[-1] in _SECRET_KEYS


def _hidden_as(path: Path_, src: Located) -> str | None:
    """How to refer to the value at ``path`` when it must not be shown; ``None``: show it."""
    written = src.substituted.get(path)
    if written is not None:
        return f"{written!r}, its value not shown"
    if _is_secret_path(path):
        return "a value that is not shown: it is a secret"
    return None


class Hidden:
    """Values no config message may contain: secrets as written and ``${VAR}`` values.

    Validators and cross-field checks quote values (``'x' is not a valid identifier``,
    ``broker HOST is on another machine``); a secret put in the wrong field, or a
    substituted value quoted by another field's check, would be printed by ``check`` and
    logged by a rejected reload. Every message passes through :meth:`scrub` first.
    """

    #: Shorter values are too likely to occur by chance ("1", "on"); the field-level rule
    #: (no "got" for a secret or substituted field) still covers them where they are wrong.
    MIN_LEN = 3

    def __init__(self, data: Any, src: Located, env: Mapping[str, str]) -> None:
        self._labels: dict[str, str] = {}
        for written in src.substituted.values():
            for m in _ENV_RE.finditer(written):
                name = m.group(1)
                value = env.get(name) if name else None
                if value:
                    self._add(value, f"${{{name}}}")
        self._walk(data, ())
        # Longest first, so a value containing another is replaced whole.
        self._order = sorted(self._labels, key=len, reverse=True)

    def _add(self, value: str, label: str) -> None:
        if len(value) >= self.MIN_LEN:
            self._labels.setdefault(value, label)

    def _walk(self, data: Any, path: Path_) -> None:
        if isinstance(data, Mapping):
            for k, v in data.items():
                self._walk(v, (*path, str(k)))
        elif isinstance(data, list):
            for i, v in enumerate(data):
                self._walk(v, (*path, i))
        elif (
            isinstance(data, str | int | float)
            and not isinstance(data, bool)
            and _is_secret_path(path)
        ):
            self._add(str(data), "***")

    def scrub(self, text: str) -> str:
        """``text`` with every hidden value replaced by its label."""
        for value in self._order:
            if value in text:
                text = text.replace(value, self._labels[value])
        return text

    def errors(self, errors: Iterable[SourceError]) -> list[SourceError]:
        """The same errors, scrubbed."""
        return [
            SourceError(e.file, e.line, e.path, self.scrub(e.message)) if self._order else e
            for e in errors
        ]


def _message(err: Mapping[str, Any], hidden: str | None = None) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "extra_forbidden":
        loc = err.get("loc", ())
        key = str(loc[-1]) if loc else ""
        known = _known_keys()
        if key in known:
            # A real key, written in the wrong section: suggesting itself would not help.
            hint = f"{key!r} is not a key of this section;"
        else:
            guess = difflib.get_close_matches(key, known, 1, 0.75)
            hint = f"did you mean {guess[0]!r}?" if guess else "check the spelling;"
        return f"unknown key ({hint} config/example.yaml shows every key)"
    if kind == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    if kind not in {"missing"} and isinstance(value, str | int | float | bool) and value != "":
        if hidden is not None:
            # A validator that quoted the value is scrubbed later (see Hidden).
            return msg if str(value) in msg else f"{msg} (got {hidden})"
        shown = repr(strip_url_credentials(value) if isinstance(value, str) else value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        if shown not in msg:
            msg = f"{msg} (got {shown})"
    return msg


# ---------------------------------------------------------------------------- profiles
