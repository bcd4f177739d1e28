"""Telemetry publish modes: which of a poll's values are due on the wire (pure: no clock, no I/O).

Every mapped signal of a machine can be published as telemetry (see
:mod:`gateway.delivery.mqtt.telemetry`). Per signal a :class:`PublishRule` decides when a value
is *due*:

* ``every_poll``: every value read is due.
* ``on_change``: a value is due when it differs from the last one published, or when its
  quality changed.
* ``deadband``: like ``on_change``, but a number is due only once it moved at least
  ``deadband`` (absolute, device units after scale/offset) and at least ``deadband_percent``
  percent of the last published value away from it (every band that is set must be
  reached). Text and booleans are due on any change. ``on_change`` with a band set acts the
  same.
* ``never``: the signal is not published as telemetry.

Two timers apply to every mode but ``never``: ``min_interval`` (seconds) holds a due value
back until that long after the signal's last publish (the value is then compared again, so
the latest reading goes out, not a stale one); ``max_interval`` (the heartbeat) makes the
current value due once that long passed since the last publish, changed or not.

Comparisons are against the last *published* value, so a slow drift past the deadband
goes out even when each poll moves it only a little. Time is the poll's wall clock (``now``),
passed in by the caller.

The config model (:class:`TelemetryConfig`) has every field optional: the rule of a
signal is built from layers (gateway default, profile, machine, signal), each filling what
the later ones leave unset (:func:`resolve`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.core.model import Quality, Sample, Value

PublishMode = Literal["every_poll", "on_change", "deadband", "never"]


class TelemetryConfig(BaseModel):
    """When a signal's values are published as telemetry; unset fields inherit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: every_poll, on_change, deadband or never (default: on_change).
    publish: PublishMode | None = None
    #: Smallest absolute change of a number that is published (``deadband`` mode).
    deadband: float | None = Field(default=None, ge=0.0, le=1e15)
    #: Smallest change of a number, in percent of the last published value.
    deadband_percent: float | None = Field(default=None, ge=0.0, le=1000.0)
    #: Seconds at least between two publishes of one signal (0: no limit).
    min_interval: float | None = Field(default=None, ge=0.0, le=86_400.0)
    #: Heartbeat: seconds after which the value is published even if unchanged (0: none).
    max_interval: float | None = Field(default=None, ge=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _intervals(self) -> TelemetryConfig:
        if self.min_interval and self.max_interval and self.max_interval < self.min_interval:
            raise ValueError(
                f"max_interval ({self.max_interval}) is shorter than min_interval "
                f"({self.min_interval}): make the heartbeat at least the minimum interval"
            )
        return self


@dataclass(frozen=True, slots=True)
class PublishRule:
    """The resolved publish rule of one signal."""

    mode: PublishMode = "on_change"
    deadband: float = 0.0
    deadband_percent: float = 0.0
    min_interval: float = 0.0
    #: 0 means no heartbeat.
    max_interval: float = 0.0
    #: On change with no band and no timer: the common case, decided in one comparison.
    plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Work out ``plain`` once."""
        plain = self.mode == "on_change" and not (
            self.deadband or self.deadband_percent or self.min_interval or self.max_interval
        )
        object.__setattr__(self, "plain", plain)

    def problem(self) -> str | None:
        """Why this combination cannot work (``None``: it can)."""
        if self.mode == "deadband" and not (self.deadband > 0 or self.deadband_percent > 0):
            return (
                "publish: deadband needs deadband (absolute) or deadband_percent above 0; "
                "or use publish: on_change"
            )
        if self.max_interval and self.min_interval and self.max_interval < self.min_interval:
            return (
                f"max_interval ({self.max_interval}) is shorter than min_interval "
                f"({self.min_interval})"
            )
        return None


DEFAULT_RULE = PublishRule()


def resolve(*layers: TelemetryConfig | None, deadband: float = 0.0) -> PublishRule:
    """The rule of a signal from its layers, most general first (later layers win).

    ``deadband`` is the signal's own mapping ``deadband`` key: the absolute band when no
    layer sets one.
    """
    mode: PublishMode = "on_change"
    band = deadband
    percent = 0.0
    min_interval = 0.0
    max_interval = 0.0
    for layer in layers:
        if layer is None:
            continue
        if layer.publish is not None:
            mode = layer.publish
        if layer.deadband is not None:
            band = layer.deadband
        if layer.deadband_percent is not None:
            percent = layer.deadband_percent
        if layer.min_interval is not None:
            min_interval = layer.min_interval
        if layer.max_interval is not None:
            max_interval = layer.max_interval
    return PublishRule(mode, band, percent, min_interval, max_interval)


class _Last:
    """What was last published of one signal."""

    __slots__ = ("quality", "time", "value")

    def __init__(self, value: Value, quality: Quality, time: float) -> None:
        self.value = value
        self.quality = quality
        self.time = time


def _is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def changed_enough(rule: PublishRule, last: Value, value: Value) -> bool:
    """Whether ``value`` differs enough from the ``last`` published one to be due."""
    if value == last and type(value) is type(last):
        return False
    if not (rule.deadband or rule.deadband_percent) or not (_is_number(value) and _is_number(last)):
        return True
    diff = abs(value - last)  # type: ignore[operator]
    if rule.deadband and diff < rule.deadband:
        return False
    return not (rule.deadband_percent and diff < abs(last) * rule.deadband_percent / 100.0)  # type: ignore[arg-type]


class TelemetryFilter:
    """The publish state of one machine: feed it every poll, it returns the samples due."""

    __slots__ = ("_every", "_last", "default", "rules")

    def __init__(
        self, rules: Mapping[str, PublishRule] | None = None, default: PublishRule = DEFAULT_RULE
    ) -> None:
        """Rules per signal; signals without one follow ``default``."""
        self.rules = dict(rules or {})
        self.default = default
        self._last: dict[str, _Last] = {}
        # The common fast case: every signal is published on every poll.
        self._every = default.mode == "every_poll" and all(
            r == default for r in self.rules.values()
        )

    def due(self, samples: Sequence[Sample], now: float) -> list[Sample]:
        """The samples of one poll that are due now; remembers them as published."""
        if self._every and not self.default.min_interval:
            return list(samples)
        out: list[Sample] = []
        rules = self.rules
        default = self.default
        last_of = self._last
        for sample in samples:
            signal = sample[1]
            rule = rules.get(signal, default)
            value = sample[2]
            quality = sample[4]
            last = last_of.get(signal)
            if last is None:
                if rule.mode == "never":
                    continue
                last_of[signal] = _Last(value, quality, now)
                out.append(sample)
                continue
            if rule.plain:
                # Same outcome as the general path below for on_change without options.
                before = last.value
                if value == before and type(value) is type(before) and quality is last.quality:
                    continue
                last.value = value
                last.quality = quality
                last.time = now
                out.append(sample)
                continue
            if rule.mode == "never":
                continue
            age = now - last.time
            if rule.min_interval and age < rule.min_interval:
                continue
            if not (
                rule.mode == "every_poll"
                or (rule.max_interval and age >= rule.max_interval)
                or quality is not last.quality
                or changed_enough(rule, last.value, value)
            ):
                continue
            last.value = value
            last.quality = quality
            last.time = now
            out.append(sample)
        return out

    def forget(self) -> None:
        """Start afresh: the next value of every signal is due (e.g. after a reload)."""
        self._last.clear()
