"""Secrets: the ``redaction:`` section (the site secret) and secrets read from files.

A ``*_file`` key names a file whose first line is the secret (a systemd credential, a
secret mount). Problems name the file and the reason, never its content.
"""

from __future__ import annotations

from pydantic import SecretStr

from gateway.config.units.context import Unit
from gateway.config.yamlsource import Path_


def read_secret_file(unit: Unit, name: str, where: Path_) -> SecretStr | None:
    """The first line of file ``name`` (the key at ``where``), or ``None`` with an error."""
    p = unit.relative(name)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # Name the file and the reason, never its content.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        unit.error(where, f"{p}: {reason}")
        return None
    lines = text.splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        unit.error(where, f"{p} is empty")
        return None
    return SecretStr(value)


def one_secret(
    unit: Unit,
    section: str,
    key: str,
    value: SecretStr | None,
    file: str | None,
    *,
    default_line: int | None = None,
) -> SecretStr | None:
    """A secret given inline (``key``) or as a file (``key_file``), not both."""
    if value is not None and file is not None:
        unit.error((section,), f"set {key} or {key}_file, not both", default_line=default_line)
        return None
    if file is not None:
        return read_secret_file(unit, file, (section, f"{key}_file"))
    return value


def compile_redaction(unit: Unit) -> SecretStr | None:
    """The site secret that keys operator pseudonyms (``redaction.secret`` or ``secret_file``)."""
    r = unit.config.redaction
    return one_secret(unit, "redaction", "secret", r.secret, r.secret_file)


def check_pseudonymise(unit: Unit, secret: SecretStr | None, pseudonymised: bool) -> None:
    """``operator: pseudonymise`` on some destination needs the site secret."""
    if secret is None and pseudonymised:
        unit.error(
            ("redaction",),
            "operator: pseudonymise needs a site secret (redaction.secret or secret_file)",
            default_line=1,
        )
