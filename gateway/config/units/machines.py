"""The ``machines:`` section with ``profiles:`` and ``profile_dirs:``: one plan per machine.

A profile is a reusable machine description (protocol, poll interval, signals, tracker
settings): built-in ones live in ``config/profiles/*.yaml``; a config may add its own under
``profiles:`` or point ``profile_dirs:`` at more files. A machine names a profile and adds or
overrides single signals (``signals: {stitch_rate: null}`` removes one). Each signal is
validated with its protocol's model, then against the canonical vocabulary.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gateway.config.models import MachineConfig, ProfileConfig, TrackerConfig
from gateway.config.plans import MachinePlan
from gateway.config.protocols import ProtocolSpec, installed
from gateway.config.units.context import Unit
from gateway.config.validation import validate
from gateway.config.yamlsource import Located, Path_, load
from gateway.core.model import Location
from gateway.core.signals import SignalConfig
from gateway.core.telemetry import PublishRule, resolve
from gateway.core.tracker import TrackerSettings
from gateway.core.vocabulary import (
    COUNT_SIGNALS,
    COUNTER_SIGNALS,
    DEVICE_STATES,
    TYPED_SIGNALS,
    normalise,
)

#: Built-in profiles shipped with the project.
#: ``gateway/data`` is a link to the checkout's ``config/`` folder, so the profiles are the
#: same files in a checkout and inside an installed wheel (where the link becomes a copy).
BUILTIN_PROFILE_DIR = Path(__file__).resolve().parents[2] / "data" / "profiles"

DEFAULT_POLL_INTERVAL = 1.0

_SIGNAL_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

#: Validated profile signals, shared by every machine that takes them unchanged, keyed by
#: protocol and the body's id (the entry keeps the body alive, so its id is not reused).
SharedSignals = dict[tuple[str, int], tuple[object, SignalConfig]]


@dataclass(slots=True)
class ProfileSource:
    """A profile and where it was written (for error lines)."""

    profile: ProfileConfig
    src: Located
    base: Path_


def compile_machines(unit: Unit) -> list[MachinePlan]:
    """Every machine's plan; duplicate ids and each machine's problems go to ``unit``."""
    profiles = load_profiles(unit)
    machines: list[MachinePlan] = []
    seen: dict[str, int] = {}
    # The models are frozen, and one copy per machine cost about 23 KiB per machine.
    shared: SharedSignals = {}
    for i, m in enumerate(unit.config.machines):
        base: Path_ = ("machines", i)
        if m.id in seen:
            unit.error(
                (*base, "id"),
                f"duplicate machine id {m.id!r} (also machines[{seen[m.id]}]); "
                "machine ids must be unique",
            )
            continue
        seen[m.id] = i
        plan = compile_machine(unit, m, base, profiles, shared)
        if plan is not None:
            machines.append(plan)
    return machines


def load_profiles(unit: Unit) -> dict[str, ProfileSource]:
    """Built-in profiles, then ``profile_dirs`` in order, then the config's own ``profiles``."""
    profiles: dict[str, ProfileSource] = {}
    dirs: list[Path] = [BUILTIN_PROFILE_DIR]
    for i, name in enumerate(unit.config.profile_dirs):
        p = Path(name)
        if not p.is_absolute():
            p = unit.config_path.parent / p
        if not p.is_dir():
            unit.error(("profile_dirs", i), f"{p} is not a directory")
            continue
        dirs.append(p)
    for d in dirs:
        for f in sorted(d.glob("*.yaml")):
            psrc = load(f)
            if psrc.errors:
                unit.errors.extend(psrc.errors)
                continue
            profile = validate(ProfileConfig, psrc.data, psrc, (), unit.errors)
            if profile is not None:
                # Later directories override earlier ones: a site's own profile of the same
                # name replaces the built-in one.
                profiles[f.stem] = ProfileSource(profile, psrc, ())
    for name, profile in unit.config.profiles.items():
        profiles[name] = ProfileSource(profile, unit.src, ("profiles", name))
    return profiles


def compile_machine(
    unit: Unit,
    m: MachineConfig,
    base: Path_,
    profiles: Mapping[str, ProfileSource],
    shared: SharedSignals | None = None,
) -> MachinePlan | None:
    """One machine's plan, or ``None`` with its problems in ``unit``."""
    n_errors = len(unit.errors)
    known, profile = _find_profile(unit, m, base, profiles)
    if not known:
        return None
    conn_raw = {**(profile.profile.connection if profile else {}), **m.connection}
    spec = _find_protocol(unit, m, base, profile, conn_raw)
    if spec is None:
        return None
    conn_raw["protocol"] = spec.name
    connection = validate(
        spec.connection_model, conn_raw, unit.src, (*base, "connection"), unit.errors
    )
    signals = _compile_signals(unit, m, base, profile, spec, shared)
    _check_machine(unit, base, spec, connection, signals, n_errors)
    poll = m.poll_interval or (profile.profile.poll_interval if profile else None)
    tracker = _tracker(unit, m, profile, signals, poll or DEFAULT_POLL_INTERVAL)
    telemetry = _telemetry_rules(unit, m, base, profile, signals)
    general = resolve(
        unit.config.telemetry, profile.profile.telemetry if profile else None, m.telemetry
    )
    if len(unit.errors) != n_errors or connection is None:
        return None
    return MachinePlan(
        id=m.id,
        location=Location(
            site=m.site or unit.config.gateway.site, area=m.area, line=m.line, machine=m.id
        ),
        protocol=spec,
        profile=m.profile,
        connection=connection,
        signals=signals,
        poll_interval=poll or DEFAULT_POLL_INTERVAL,
        tracker=tracker,
        telemetry=telemetry,
        telemetry_default=_RULES.setdefault(general, general),
    )


#: Resolved publish rules, shared: 500 machines x 30 signals mostly hold the same few.
_RULES: dict[PublishRule, PublishRule] = {}


def _telemetry_rules(
    unit: Unit,
    m: MachineConfig,
    base: Path_,
    profile: ProfileSource | None,
    signals: Mapping[str, SignalConfig],
) -> dict[str, PublishRule]:
    """Each signal's telemetry rule: gateway, profile, machine, then the signal's own keys."""
    general = (unit.config.telemetry, profile.profile.telemetry if profile else None, m.telemetry)
    rules: dict[str, PublishRule] = {}
    for name, sig in signals.items():
        rule = resolve(*general, sig.telemetry, deadband=sig.deadband)
        problem = rule.problem()
        if problem is not None:
            # Where the signal was written: the machine's own entry, else its profile's.
            if name in m.signals or profile is None:
                src, spath = unit.src, (*base, "signals", name)
            else:
                src, spath = profile.src, (*profile.base, "signals", name)
            unit.error((*spath, "telemetry"), problem, src=src, line_from=spath)
            continue
        rules[name] = _RULES.setdefault(rule, rule)
    return rules


def _find_profile(
    unit: Unit, m: MachineConfig, base: Path_, profiles: Mapping[str, ProfileSource]
) -> tuple[bool, ProfileSource | None]:
    """Whether the profile is known (an unknown one is reported), and the profile if any."""
    if m.profile is None:
        return True, None
    profile = profiles.get(m.profile)
    if profile is None:
        known = ", ".join(sorted(profiles)) or "none"
        guess = difflib.get_close_matches(m.profile, list(profiles), 1, 0.75)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        unit.error((*base, "profile"), f"unknown profile {m.profile!r} ({hint}known: {known})")
        return False, None
    return True, profile


def _find_protocol(
    unit: Unit,
    m: MachineConfig,
    base: Path_,
    profile: ProfileSource | None,
    conn_raw: Mapping[str, Any],
) -> ProtocolSpec | None:
    """The machine's protocol (from its connection, else its profile), or ``None`` (reported)."""
    protocols = installed()
    protocol_name = conn_raw.get("protocol") or (profile.profile.protocol if profile else None)
    if protocol_name is None:
        unit.error(
            (*base, "connection"),
            f"protocol is missing: add 'protocol: {' or '.join(protocols)}' or a profile",
        )
        return None
    spec = protocols.get(str(protocol_name))
    if spec is None:
        unit.error(
            (*base, "connection", "protocol"),
            f"unknown protocol {protocol_name!r} (supported: {', '.join(protocols)})",
        )
        return None
    if profile is not None and profile.profile.protocol != spec.name:
        unit.error(
            (*base, "connection", "protocol"),
            f"profile {m.profile!r} is for {profile.profile.protocol}, "
            f"the connection is {spec.name}",
        )
        return None
    return spec


_Merged = tuple[dict[str, Any] | None, Located, Path_, bool]


def _compile_signals(
    unit: Unit,
    m: MachineConfig,
    base: Path_,
    profile: ProfileSource | None,
    spec: ProtocolSpec,
    shared: SharedSignals | None,
) -> dict[str, SignalConfig]:
    # Merge signals: profile first, machine entries replace whole signals, null removes.
    merged: dict[str, _Merged] = {}
    if profile is not None:
        for name, body in profile.profile.signals.items():
            merged[name] = (body, profile.src, (*profile.base, "signals", name), True)
    for name, body in m.signals.items():
        merged[name] = (body, unit.src, (*base, "signals", name), False)
    signals: dict[str, SignalConfig] = {}
    for name, entry in merged.items():
        sig = _compile_signal(unit, name, entry, spec, shared)
        if sig is not None:
            signals[name] = sig
    return signals


def _compile_signal(
    unit: Unit, name: str, entry: _Merged, spec: ProtocolSpec, shared: SharedSignals | None
) -> SignalConfig | None:
    body, ssrc, spath, from_profile = entry
    if body is None:
        return None
    if not _SIGNAL_RE.match(name):
        unit.error(
            spath,
            "signal names are lower_snake_case (a-z, 0-9, _), starting with a letter",
            src=ssrc,
        )
        return None
    key = (spec.name, id(body))
    hit = shared.get(key) if shared is not None else None
    if hit is not None and hit[0] is body:
        sig: SignalConfig | None = hit[1]
    else:
        sig = validate(spec.signal_model, body, ssrc, spath, unit.errors)
        if sig is not None and shared is not None and from_profile:
            # Only a profile's bodies are shared (the entry keeps the body alive, so its
            # id is not reused); a machine's own entries are validated each time.
            shared[key] = (body, sig)
    if sig is None:
        return None
    problem = _check_canonical(name, sig)
    if problem:
        unit.error(spath, problem, src=ssrc)
        return None
    return sig


def _check_machine(
    unit: Unit,
    base: Path_,
    spec: ProtocolSpec,
    connection: BaseModel | None,
    signals: Mapping[str, SignalConfig],
    n_errors: int,
) -> None:
    """Checks over the whole machine, once each part is valid on its own."""
    if not signals and len(unit.errors) == n_errors:
        unit.error(base, "no signals mapped: name a profile or add signals")
    if connection is not None and signals and len(unit.errors) == n_errors:
        for problem in spec.check(connection, signals):
            unit.error((*base, "signals"), problem, default_line=unit.src.line_of(base))


def _tracker(
    unit: Unit,
    m: MachineConfig,
    profile: ProfileSource | None,
    signals: Mapping[str, SignalConfig],
    poll: float,
) -> TrackerSettings:
    tracker = _tracker_settings(
        poll, unit.config.tracker, profile.profile.tracker if profile else None, m.tracker
    )
    rules = tuple(
        (name, sig.mode, None if sig.wrap is None else 2**sig.wrap)
        for name, sig in signals.items()
        if name in COUNTER_SIGNALS and (sig.mode is not None or sig.wrap is not None)
    )
    return replace(tracker, counter_rules=rules) if rules else tracker


def _check_canonical(name: str, sig: SignalConfig) -> str | None:
    # The map's outputs must pass the vocabulary's validator, the one the mapper applies to
    # them at run time: a typo in the config is an error here, not a bad sample every poll.
    if name == "state" and sig.map is not None:
        bad = [v for v in sig.map.values() if not _valid(name, v)]
        if bad:
            return (
                f"map values must be machine states ({', '.join(DEVICE_STATES)}); "
                f"not {', '.join(repr(b) for b in bad)}"
            )
        if sig.map_default is not None and not _valid(name, sig.map_default):
            return f"map_default must be a machine state ({', '.join(DEVICE_STATES)})"
    if name in COUNT_SIGNALS and sig.map is not None:
        return "a counter cannot have a map; use scale/offset"
    if (sig.mode is not None or sig.wrap is not None) and name not in COUNTER_SIGNALS:
        return (
            "mode and wrap belong to a counter signal "
            f"({', '.join(COUNTER_SIGNALS)}), not to {name!r}"
        )
    if name in TYPED_SIGNALS and name != "state" and sig.map is not None:
        outputs = [*sig.map.values(), *([] if sig.map_default is None else [sig.map_default])]
        for value in outputs:
            try:
                normalise(name, value)
            except ValueError as exc:
                return f"map value {value!r}: {exc}"
    return None


def _valid(signal: str, value: object) -> bool:
    try:
        normalise(signal, value)
    except ValueError:
        return False
    return True


def _tracker_settings(poll_interval: float, *layers: TrackerConfig | None) -> TrackerSettings:
    values: dict[str, Any] = {"poll_interval": poll_interval}
    for layer in layers:
        if layer is None:
            continue
        for key, value in layer.model_dump(exclude_none=True).items():
            values[key] = value
    if "counter_wrap" in values:
        values["counter_wrap"] = 2 ** int(values["counter_wrap"])
    if "complete_when" in values:
        values["complete_when"] = tuple(dict.fromkeys(values["complete_when"]))
    return TrackerSettings(**values)
