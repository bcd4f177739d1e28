"""``shopfloor opcua-cert``: create the gateway's OPC UA client certificate and private key.

The certificate follows OPC 10000-6, 6.2.2: the application URI in the SubjectAltName (it
must equal the client's ``application_uri``, which the adapter reads from this certificate
by default), this machine's host name (asyncua checks it) and any ``--hostname`` as DNS
names, key usages for signing and encryption, and the
``clientAuth`` extended key usage. The key is written with mode 0600.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

CERT_NAME = "client-cert.pem"
KEY_NAME = "client-key.pem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``opcua-cert`` sub-command."""
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument(
        "--application-uri",
        required=True,
        help="application URI, e.g. urn:factory-edge-01:shopfloor (goes into the certificate)",
    )
    parser.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "another DNS name of this machine for the certificate, e.g. the name or FQDN the "
            "server knows it by (repeatable); this machine's own host name "
            f"({socket.gethostname()}) is always included, as the OPC UA client checks it"
        ),
    )
    parser.add_argument(
        "--common-name", default=None, help="subject CN (default: the application URI)"
    )
    parser.add_argument("--days", type=int, default=730, help="validity in days (default 730)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    """Write ``client-cert.pem`` and ``client-key.pem``; 0 on success, 2 on bad input."""
    uri: str = args.application_uri
    if ":" not in uri or any(ch.isspace() for ch in uri):
        _err(f"error: --application-uri {uri!r} is not a URI (e.g. urn:host:shopfloor)")
        return 2
    if not 1 <= args.days <= 36500:
        _err("error: --days must be between 1 and 36500")
        return 2
    extra: list[str] = list(args.hostname or [])
    bad = [name for name in extra if not name or any(ch.isspace() or ch in "/:" for ch in name)]
    if bad:
        _err(f"error: --hostname {bad[0]!r} is not a DNS name (e.g. edge-01.plant.example)")
        return 2
    out: Path = args.out
    cert_path, key_path = out / CERT_NAME, out / KEY_NAME
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not args.force:
        names = ", ".join(str(p) for p in existing)
        _err(f"error: {names} already exist; pass --force to replace them")
        return 2
    hostnames = host_names(extra)
    cert_pem, key_pem = make_certificate(
        uri, hostnames, common_name=args.common_name or uri, days=args.days
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, key_pem)
        cert_path.write_bytes(cert_pem)
    except OSError as exc:
        _err(f"error: cannot write to {out}: {exc.strerror}")
        return 2
    _out(f"wrote {cert_path} and {key_path} (mode 0600); DNS names: {', '.join(hostnames)}")
    _out("next: give the server the certificate (its trusted folder), then set in the config:")
    _out(f"  security: {{certificate: {cert_path}, private_key: {key_path}, ...}}")
    log.info("opcua.certificate_created", certificate=str(cert_path), application_uri=uri)
    return 0


def host_names(extra: Sequence[str] = ()) -> list[str]:
    """This machine's host name first, then the extra names (duplicates dropped).

    asyncua checks the client certificate against ``socket.gethostname()`` on every
    connect (a warning each time it is missing), so that name is always in; servers that
    check the client's DNS name want the name they know the machine by: the extras.
    """
    names: list[str] = []
    for name in (socket.gethostname(), *extra):
        if name and name not in names:
            names.append(name)
    return names


def make_certificate(
    application_uri: str, hostname: str | Sequence[str], *, common_name: str, days: int
) -> tuple[bytes, bytes]:
    """A self-signed OPC UA application certificate and its RSA-2048 key, both PEM.

    ``hostname``: one DNS name or several for the SubjectAltName.
    """
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for name in [hostname] if isinstance(hostname, str) else hostname:
        if name:
            names.append(x509.DNSName(name))
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, {}, names, extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=days
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _out(text: str) -> None:
    """A line for the user on stdout (a command's output, not a log line)."""
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    """An error for the user on stderr."""
    sys.stderr.write(text + "\n")


def _write_private(path: Path, data: bytes) -> None:
    """Write a file that only its owner can read, without a window where others could."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
