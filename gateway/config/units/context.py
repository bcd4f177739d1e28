"""What every compile unit reads and where it reports its problems."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.models import Config
from gateway.config.yamlsource import Located, Path_, SourceError, format_path


@dataclass(slots=True)
class Unit:
    """The validated config, the file it came from, and the errors and warnings found so far."""

    config: Config
    src: Located
    config_path: Path
    errors: list[SourceError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(
        self,
        path: Path_,
        message: str,
        *,
        src: Located | None = None,
        line_from: Path_ | None = None,
        default_line: int | None = None,
    ) -> None:
        """Report a problem at ``path`` of ``src`` (default: the config file).

        The line is that of ``line_from`` (default: ``path``), else ``default_line``.
        """
        s = self.src if src is None else src
        line = s.line_of(path if line_from is None else line_from)
        self.errors.append(
            SourceError(s.file, default_line if line is None else line, format_path(path), message)
        )

    def relative(self, name: str) -> Path:
        """``name`` as a path; a relative one is taken from the config file's folder."""
        p = Path(name)
        return p if p.is_absolute() else self.config_path.resolve().parent / p


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost`` or a loopback address (127/8, ::1).

    A name is not resolved here: ``127.mqtt.partner.example`` is a name like any other.
    """
    name = host.strip().rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False
