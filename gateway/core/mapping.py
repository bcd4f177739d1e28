"""Signal mapping: decoded device values into the canonical vocabulary (pure).

Applied between an adapter and the tracker. Per signal, in this order: enum ``map`` (with
``map_default``), then ``scale`` and ``offset`` for numbers, then a type check of the canonical
signals. A value that does not fit (a state code nobody mapped, a negative counter, a float
``nan``) becomes a bad-quality sample and a :class:`MappingProblem` the shell logs once per
episode, so one odd register never stops a machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.core.model import Quality, Sample, Value
from gateway.core.signals import SignalConfig
from gateway.core.vocabulary import PARSERS, TYPED_SIGNALS


@dataclass(frozen=True, slots=True)
class MappingProblem:
    """Why one sample was turned into a bad-quality one."""

    signal: str
    value: Value
    reason: str


@dataclass(frozen=True, slots=True)
class Mapper:
    """The compiled mapping of one machine's signals."""

    signals: Mapping[str, SignalConfig]
    #: Signals passed through as they are (no map, scale or offset; free telemetry): the
    #: common case, checked once here instead of per sample (see docs/performance.md).
    _plain: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Sort out the pass-through signals once."""
        plain = frozenset(
            name
            for name, cfg in self.signals.items()
            if cfg.map is None
            and cfg.scale == 1.0
            and cfg.offset == 0.0
            and name not in TYPED_SIGNALS
        )
        object.__setattr__(self, "_plain", plain)

    def apply(self, batch: Sequence[Sample]) -> tuple[list[Sample], list[MappingProblem]]:
        """Map a batch; returns the mapped samples and the problems found."""
        out: list[Sample] = []
        problems: list[MappingProblem] = []
        plain = self._plain
        append = out.append
        isfinite = math.isfinite
        for sample in batch:
            value = sample[2]  # .value, without the descriptor (every sample of every poll)
            # Same outcome as map_value() for a signal without map, scale or offset.
            if (
                sample[1] in plain
                and value is not None
                and (type(value) is not float or isfinite(value))
            ):
                append(sample)
                continue
            cfg = self.signals.get(sample.signal)
            if cfg is None or sample.quality is Quality.BAD:
                out.append(sample)
                continue
            value, reason = map_value(sample.signal, sample.value, cfg)
            if reason is not None:
                problems.append(MappingProblem(sample.signal, sample.value, reason))
                out.append(sample._replace(value=None, quality=Quality.BAD))
            elif value is sample.value:
                out.append(sample)
            else:
                out.append(sample._replace(value=value))
        return out, problems


def map_value(signal: str, raw: Value, cfg: SignalConfig) -> tuple[Value, str | None]:
    """Map one value; returns ``(value, None)`` or ``(None, reason)``."""
    value = raw
    if cfg.map is not None:
        mapped = _lookup(cfg.map, raw)
        if mapped is not _MISSING:
            value = mapped  # type: ignore[assignment]
        elif cfg.map_default is not None:
            value = cfg.map_default
        elif signal == "state":
            return None, f"state value {raw!r} is not in the map; add it to signals.state.map"
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (cfg.scale != 1.0 or cfg.offset != 0.0)
    ):
        value = value * cfg.scale + cfg.offset
    return _check(signal, value)


class _Missing:
    pass


_MISSING = _Missing()


def _lookup(table: Mapping[int | str | bool, object], raw: Value) -> object:
    if isinstance(raw, int | str) and raw in table:
        return table[raw]
    # YAML keys may be written as strings ("3": fault) while the device gives ints, and
    # vice versa; compare by text as a fallback.
    text = str(raw)
    for key, mapped in table.items():
        if str(key) == text:
            return mapped
    return _MISSING


def _check(signal: str, value: Value) -> tuple[Value, str | None]:
    if value is None:
        return None, "no value"
    if isinstance(value, float) and not math.isfinite(value):
        return None, f"{value} is not a finite number"
    parse = PARSERS.get(signal)
    if parse is None:
        return value, None
    try:
        # The tracker parses with the same functions: what passes here, it takes.
        return parse(value), None
    except ValueError as exc:
        return None, str(exc)
