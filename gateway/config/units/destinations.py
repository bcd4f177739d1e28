"""The ``broker:`` / ``destinations:`` sections: each broker, its route, and who takes commands.

``broker:`` is shorthand for one destination named ``default``. Secure by default: a broker
on another machine needs TLS and credentials unless ``allow_insecure`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from pydantic import SecretStr

from gateway.config.models import BrokerConfig, DestinationConfig
from gateway.config.plans import BrokerPlan, DestinationPlan, MachinePlan, SparkplugPlan, TlsPlan
from gateway.config.units.context import Unit, is_loopback
from gateway.config.units.secrets import read_secret_file
from gateway.config.yamlsource import Path_, SourceError
from gateway.core.routing import OperatorPolicy, Route, RouteRules, machine_visible

_Entry = tuple[DestinationConfig | BrokerConfig, str, Path_]


def compile_destinations(unit: Unit) -> list[DestinationPlan]:
    """Every destination's plan, in the order written; problems go to ``unit``."""
    out: list[DestinationPlan] = []
    seen: set[str] = set()
    client_ids: set[tuple[str, int, str]] = set()
    for b, name, base in _entries(unit):
        if name in seen:
            unit.error((*base, "name"), f"duplicate destination name {name!r}")
            continue
        seen.add(name)
        n_errors = len(unit.errors)
        _check_tls(unit, b, base)
        password = _password(unit, b, base)
        _check_secure(unit, b, base)
        if len(unit.errors) != n_errors:
            continue
        broker = _broker_plan(unit, b, name, password)
        endpoint = (broker.host, broker.port, broker.client_id)
        if endpoint in client_ids:
            unit.error(
                base,
                f"client id {broker.client_id!r} is used twice on {broker.host}:"
                f"{broker.port}; the broker would disconnect one of them",
            )
            continue
        client_ids.add(endpoint)
        spb = None
        if isinstance(b, DestinationConfig) and b.format == "sparkplug":
            spb = SparkplugPlan(
                group_id=b.group_id or unit.config.gateway.site,
                edge_node_id=b.edge_node_id or unit.config.gateway.id,
                primary_host_id=b.primary_host_id,
            )
        out.append(
            DestinationPlan(name, broker, _route(b, name), commands=spb is None, sparkplug=spb)
        )
    return out


def _entries(unit: Unit) -> list[_Entry]:
    config = unit.config
    if config.broker is not None and config.destinations:
        unit.error(
            ("destinations",), "use either broker: (one destination) or destinations:, not both"
        )
        return []
    entries: list[_Entry] = []
    if config.broker is not None:
        entries.append((config.broker, "default", ("broker",)))
    for i, d in enumerate(config.destinations):
        entries.append((d, d.name, ("destinations", i)))
    if not entries:
        unit.errors.append(
            SourceError(
                unit.src.file, 1, "broker", "required key is missing (broker: or destinations:)"
            )
        )
    return entries


def _check_tls(unit: Unit, b: BrokerConfig, base: Path_) -> None:
    if b.tls is None:
        return
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(b.tls, key)
        if value is not None and not Path(value).is_file():
            unit.error((*base, "tls", key), f"{value}: no such file")
    if (b.tls.cert_file is None) != (b.tls.key_file is None):
        unit.error(
            (*base, "tls"),
            "cert_file and key_file go together: set both for a client certificate, or neither",
        )


def _password(unit: Unit, b: BrokerConfig, base: Path_) -> SecretStr | None:
    password = b.password
    if b.password_file is not None:
        if b.password is not None:
            unit.error((*base, "password_file"), "set password or password_file, not both")
        else:
            password = read_secret_file(unit, b.password_file, (*base, "password_file"))
    if password is not None and b.username is None:
        unit.error((*base, "username"), "a password needs a username", line_from=base)
    return password


def _check_secure(unit: Unit, b: BrokerConfig, base: Path_) -> None:
    if is_loopback(b.host) or b.allow_insecure:
        return
    # Secure by default: events, order ids and credentials leave the factory here.
    weak = []
    if b.tls is None:
        weak.append("plain TCP (add tls:)")
    if b.username is None and (b.tls is None or b.tls.cert_file is None):
        weak.append("no credentials (add username/password or a client certificate)")
    if weak:
        unit.error(
            base,
            f"broker {b.host} is on another machine and the connection would use "
            + " and ".join(weak)
            + "; fix that, or set allow_insecure: true to accept the risk",
        )


def _broker_plan(unit: Unit, b: BrokerConfig, name: str, password: SecretStr | None) -> BrokerPlan:
    t = b.tls
    tls = TlsPlan(t.ca_file, t.cert_file, t.key_file, t.verify_hostname) if t is not None else None
    default_id = f"shopfloor-{unit.config.gateway.id}"
    if name != "default":
        default_id += f"-{name}"
    return BrokerPlan(
        host=b.host,
        port=b.port or (8883 if tls is not None else 1883),
        client_id=b.client_id or default_id,
        username=b.username,
        password=password,
        keepalive=b.keepalive,
        tls=tls,
        max_queue=b.max_queue,
        protocol=b.protocol,
    )


def _route(b: BrokerConfig, name: str) -> Route:
    if not isinstance(b, DestinationConfig):
        return Route(name)
    r = b.routing
    rules = RouteRules(
        tuple(r.machines), tuple(r.event_types), tuple(r.customers), tuple(r.order_ids)
    )
    operator: OperatorPolicy = b.operator
    return Route(name, rules, operator, b.batch)


def broker_warnings(unit: Unit, destinations: Sequence[DestinationPlan]) -> None:
    """Warn about connections that are allowed but weak: plain text, anonymous, any certificate."""
    for d in destinations:
        if d.broker.tls is None and not is_loopback(d.broker.host):
            unit.warnings.append(
                f"destination {d.name}: broker {d.broker.host} is not on this machine and TLS "
                "is off: events and credentials travel in plain text (add tls)"
            )
    for d in destinations:
        b = d.broker
        anonymous = b.username is None and (b.tls is None or b.tls.cert_file is None)
        if anonymous and not is_loopback(b.host):
            unit.warnings.append(f"destination {d.name}: anonymous MQTT to {b.host}")
    for d in destinations:
        if d.broker.tls is not None and not d.broker.tls.verify_hostname:
            unit.warnings.append(
                f"destination {d.name}: tls.verify_hostname is false: any certificate from the "
                f"trusted CAs is accepted for {d.broker.host}, so another server holding one "
                "can pose as the broker"
            )


def _command_clash(a: DestinationPlan, b: DestinationPlan, machines: Iterable[MachinePlan]) -> str:
    """Why ``a`` and ``b`` may not both take commands for some machine ("" when they may)."""
    shared = next(
        (
            m.id
            for m in machines
            if machine_visible(a.route.rules, m.id) and machine_visible(b.route.rules, m.id)
        ),
        None,
    )
    if shared is None:
        return ""
    if (a.broker.host, a.broker.port) == (b.broker.host, b.broker.port):
        return (
            f"both take commands for machine {shared} on {a.broker.host}:{a.broker.port}, "
            "so every command would be run and answered twice"
        )
    unscoped = [d.name for d in (a, b) if not d.route.rules.order_scoped]
    if unscoped:
        return (
            f"both take commands for machine {shared}, and {unscoped[0]} sees every order of it "
            "(only destinations scoped by routing.customers or order_ids may share a machine's "
            "commands)"
        )
    return ""


def command_owners(
    unit: Unit, destinations: list[DestinationPlan], machines: list[MachinePlan]
) -> list[DestinationPlan]:
    """Decide which destinations take order commands; at most one owner per machine.

    A machine's commands are owned by one destination, or shared by order-scoped destinations
    on different brokers (each can touch only its own customers' orders). Destinations with
    ``commands: true`` come first and may not clash (a config error names both); an unset
    one takes commands unless it clashes with an owner, and then takes none, with a warning.
    """
    explicit: dict[str, tuple[bool | None, Path_]] = {
        d.name: (d.commands, ("destinations", i, "commands"))
        for i, d in enumerate(unit.config.destinations)
    }
    owners: list[DestinationPlan] = []
    decided: dict[str, bool] = {}
    ordered = [d for d in destinations if explicit.get(d.name, (None, ()))[0] is True]
    ordered += [d for d in destinations if explicit.get(d.name, (None, ()))[0] is None]
    for d in ordered:
        wanted, where = explicit.get(d.name, (None, ()))
        clash = next(((o, why) for o in owners if (why := _command_clash(o, d, machines))), None)
        if clash is None:
            owners.append(d)
            decided[d.name] = True
            continue
        owner, why = clash
        decided[d.name] = False
        if wanted is True:
            unit.error(
                where,
                f"destinations {owner.name} and {d.name} {why}; set commands: false on one of them",
            )
        else:
            unit.warnings.append(
                f"destination {d.name}: takes no commands: it and {owner.name} {why}; "
                f"{owner.name} owns them (set commands: true/false to choose)"
            )
    return [replace(d, commands=decided.get(d.name, False)) for d in destinations]
