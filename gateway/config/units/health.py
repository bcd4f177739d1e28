"""The ``health:`` section: the local HTTP endpoint, the web console and its token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import SecretStr

from gateway.config.listen import parse_listen
from gateway.config.units.context import Unit, is_loopback
from gateway.config.units.secrets import one_secret


@dataclass(frozen=True, slots=True)
class HealthPlan:
    """The endpoint's address (``None``: off), readiness bound and console settings."""

    listen: tuple[str, int] | None
    max_pending_age: float
    console: bool
    token: SecretStr | None
    commands_as: str | None


def compile_health(unit: Unit, destinations: Sequence[str]) -> HealthPlan:
    """Check the endpoint against the destinations named ``destinations``; warn when it is open."""
    h = unit.config.health
    listen = parse_listen(h.listen) if h.listen else None
    token = one_secret(unit, "health", "token", h.token, h.token_file, default_line=1)
    open_to_network = listen is not None and not is_loopback(listen[0])
    if open_to_network and h.console and token is None:
        unit.error(
            ("health", "listen"),
            f"{h.listen} is reachable from other machines: the web console there needs a "
            "token (health.token: ${VAR} or health.token_file), or listen on 127.0.0.1, "
            "or set health.console: false to serve only /healthz and /metrics",
            default_line=1,
        )
    if h.commands_as is not None and h.commands_as not in destinations:
        unit.error(
            ("health", "commands_as"),
            f"no destination named {h.commands_as!r}; known: " + ", ".join(destinations),
            default_line=1,
        )
    if open_to_network:
        unit.warnings.append(
            f"health.listen {h.listen}: /healthz and /metrics (machine and order "
            "counts, without authentication) are open to the network; use 127.0.0.1 unless a "
            "scraper on another machine needs them"
        )
    return HealthPlan(listen, h.max_pending_age, h.console, token, h.commands_as)
