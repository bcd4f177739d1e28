"""Secure-channel set-up for the OPC UA client and the server-certificate trust check.

asyncua's client defaults are insecure: it takes whatever certificate a server presents.
The gateway instead fetches the server's endpoints, checks the certificate of the chosen
endpoint against ``security.trust`` itself (:func:`check_server_certificate`, pure), and
only then pins that certificate into the secure channel; asyncua refuses a session whose
certificate differs from the pinned one.

A refused certificate gives a :class:`UntrustedServerError` whose message names the
certificate (subject, SHA-256 thumbprint, validity) and says which file to add to
``security.trust``; with ``security.rejected_dir`` set, the certificate is saved there
first so trusting it is a single file move.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies, uacrypto
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from shopfloor_gateway.adapters.base import ConnectError
from shopfloor_gateway.adapters.opcua.config import (
    OpcUaConnectionConfig,
    OpcUaSecurityConfig,
    insecure_reasons,
)

log = structlog.get_logger(__name__)

#: Config policy names to asyncua policy classes.
POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "None": security_policies.SecurityPolicyNone,
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}

#: Config mode names to OPC UA message security modes.
MODES: dict[str, ua.MessageSecurityMode] = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

__all__ = [
    "MODES",
    "POLICIES",
    "SecuritySetupError",
    "UntrustedServerError",
    "apply",
    "check_server_certificate",
    "insecure_reasons",
]

_DER = Encoding.DER
_CERT_SUFFIXES = {".pem", ".der", ".crt", ".cer"}


class UntrustedServerError(ConnectError):
    """The server's certificate is not in the trust list, or is expired or not yet valid."""


class SecuritySetupError(ConnectError):
    """The gateway's own certificate, key or the server's endpoints do not fit the config."""


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-256 thumbprint in hex, as certificate tools show it."""
    return hashlib.sha256(cert.public_bytes(_DER)).hexdigest()


def describe(cert: x509.Certificate) -> str:
    """``subject 'CN=...', SHA-256 ab12..., valid 2026-01-01..2027-01-01``: for messages."""
    return (
        f"subject '{cert.subject.rfc4514_string()}', SHA-256 {thumbprint(cert)}, valid "
        f"{cert.not_valid_before_utc:%Y-%m-%d}..{cert.not_valid_after_utc:%Y-%m-%d}"
    )


def application_uri_of(cert: x509.Certificate) -> str | None:
    """The application URI in a certificate's SubjectAltName, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def load_certificate_file(path: Path) -> x509.Certificate:
    """One certificate from a PEM or DER file (detected by content, not by suffix)."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_trust(paths: Iterable[Path]) -> list[x509.Certificate]:
    """Certificates from the trust list: files, or directories of certificate files.

    Raises :class:`SecuritySetupError` naming the file that cannot be read.
    """
    certs: list[x509.Certificate] = []
    for path in paths:
        files = (
            sorted(p for p in path.iterdir() if p.suffix.lower() in _CERT_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        for file in files:
            try:
                certs.append(load_certificate_file(file))
            except (OSError, ValueError) as exc:
                raise SecuritySetupError(
                    f"security.trust: cannot read certificate {str(file)!r}: {exc}"
                ) from exc
    return certs


def check_server_certificate(
    cert: x509.Certificate, trusted: Sequence[x509.Certificate], now: float
) -> str | None:
    """Why ``cert`` must be refused, or ``None`` when it is trusted and within its validity.

    Trusted means: the certificate itself is in the list, or it was directly issued by a
    CA certificate in the list (issuer name matches and the signature verifies).
    """
    moment = datetime.fromtimestamp(now, UTC)
    if cert.not_valid_after_utc < moment:
        return f"the server certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > moment:
        return (
            f"the server certificate is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check both clocks)"
        )
    der = cert.public_bytes(_DER)
    for anchor in trusted:
        if anchor.public_bytes(_DER) == der:
            return None
    for anchor in trusted:
        if anchor.subject != cert.issuer or not _is_ca(anchor):
            continue
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if anchor.not_valid_after_utc < moment:
            return (
                f"the issuing CA certificate '{anchor.subject.rfc4514_string()}' expired on "
                f"{anchor.not_valid_after_utc:%Y-%m-%d}"
            )
        return None
    return "the server certificate is not in security.trust"


def _is_ca(cert: x509.Certificate) -> bool:
    """Whether a certificate may issue others (BasicConstraints ca=true)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def refusal_message(
    url: str,
    cert: x509.Certificate,
    problem: str,
    security: OpcUaSecurityConfig,
    saved: Path | None,
) -> str:
    """The message for a refused server certificate: what is wrong and how to trust it."""
    where = (
        ", ".join(repr(str(p)) for p in security.trust) if security.trust else "a trust directory"
    )
    if "expired" in problem or "not valid before" in problem:
        fix = "renew the certificate on the server (an expired certificate is never trusted)"
    elif saved is not None:
        fix = f"if this is the right server, move {str(saved)!r} into {where}"
    else:
        fix = (
            f"if this is the right server, copy its certificate file into {where} or add the "
            "file to security.trust (set security.rejected_dir to have the gateway save it)"
        )
    return f"refused server {url}: {problem} ({describe(cert)}); {fix}"


def save_rejected(directory: Path, cert: x509.Certificate) -> Path:
    """Write a refused certificate as ``<CN>-<thumbprint>.der`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common = str(names[0].value) if names else "server"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in common)[:60]
    path = directory / f"{safe}-{thumbprint(cert)[:16]}.der"
    path.write_bytes(cert.public_bytes(_DER))
    return path


def default_application_uri(connection: OpcUaConnectionConfig) -> str:
    """Configured URI, else the one in the gateway's certificate, else ``urn:<host>:shopfloor``."""
    if connection.application_uri:
        return connection.application_uri
    if connection.security.certificate is not None:
        try:
            uri = application_uri_of(load_certificate_file(connection.security.certificate))
        except (OSError, ValueError):
            uri = None
        if uri:
            return uri
    return f"urn:{socket.gethostname()}:shopfloor"


async def apply(client: Client, connection: OpcUaConnectionConfig, now: float) -> None:
    """Configure ``client`` for the connection's policy, mode and identity; check the server.

    Must run under the caller's timeout: it opens a short discovery connection to fetch
    the endpoints. Raises :class:`UntrustedServerError` or :class:`SecuritySetupError`.
    """
    sec = connection.security
    await _apply_user_identity(client, connection)
    if sec.policy == "None":
        return
    policy = POLICIES[sec.policy]
    mode = MODES[sec.effective_mode]
    certificate = _read(sec.certificate, "security.certificate")
    private_key = _read(sec.private_key, "security.private_key")
    endpoints = await client.connect_and_get_server_endpoints()
    endpoint = next(
        (ep for ep in endpoints if ep.SecurityPolicyUri == policy.URI and ep.SecurityMode == mode),
        None,
    )
    if endpoint is None:
        offered = sorted(
            {
                f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}"
                for ep in endpoints
            }
        )
        raise SecuritySetupError(
            f"server {connection.url} offers no endpoint with policy {sec.policy} and mode "
            f"{sec.effective_mode} (it offers: {', '.join(offered) or 'none'})"
        )
    server_der = endpoint.ServerCertificate
    if not server_der:
        raise SecuritySetupError(f"server {connection.url} sent no certificate for {sec.policy}")
    try:
        server_cert = _first_certificate(server_der)
    except ValueError as exc:
        raise SecuritySetupError(f"server {connection.url} sent an unreadable certificate") from exc
    trusted = load_trust(sec.trust)
    problem = check_server_certificate(server_cert, trusted, now)
    if problem is not None:
        if not sec.allow_untrusted or "expired" in problem or "not valid before" in problem:
            saved = save_rejected(sec.rejected_dir, server_cert) if sec.rejected_dir else None
            raise UntrustedServerError(
                refusal_message(connection.url, server_cert, problem, sec, saved)
            )
        log.warning(
            "opcua.server_untrusted_allowed",
            url=connection.url,
            certificate=describe(server_cert),
            reason=problem,
        )
    password = sec.private_key_password.get_secret_value() if sec.private_key_password else None
    try:
        await client.set_security(
            policy,
            uacrypto.CertProperties(certificate, extension=_format(certificate)),
            uacrypto.CertProperties(private_key, extension=_format(private_key), password=password),
            server_certificate=uacrypto.CertProperties(server_cert.public_bytes(_DER), "der"),
            mode=mode,
        )
    except (ValueError, TypeError) as exc:
        raise SecuritySetupError(
            f"cannot use the gateway certificate {str(sec.certificate)!r} / key "
            f"{str(sec.private_key)!r}: {exc}"
        ) from exc


async def _apply_user_identity(client: Client, connection: OpcUaConnectionConfig) -> None:
    """Username/password or an X.509 user certificate; anonymous when neither is set."""
    if connection.username is not None and connection.password is not None:
        client.set_user(connection.username)
        client.set_password(connection.password.get_secret_value())
    if connection.user_certificate is not None and connection.user_private_key is not None:
        cert = _read(connection.user_certificate, "user_certificate")
        key = _read(connection.user_private_key, "user_private_key")
        try:
            await client.load_client_certificate(cert, _format(cert))  # type: ignore[arg-type]
            await client.load_private_key(key, None, _format(key))  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise SecuritySetupError(f"cannot use the user certificate or key: {exc}") from exc


def _read(path: Path | None, key: str) -> bytes:
    """Bytes of a configured file, or a :class:`SecuritySetupError` naming the key."""
    if path is None:
        raise SecuritySetupError(f"{key} is not set")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecuritySetupError(f"{key}: cannot read {str(path)!r}: {exc.strerror}") from exc


def _first_certificate(der: bytes) -> x509.Certificate:
    """The leaf of a DER certificate or chain (servers may send their chain concatenated)."""
    cert: x509.Certificate = uacrypto.x509_from_der(der)  # type: ignore[no-untyped-call]
    return cert


def _format(data: bytes) -> str:
    """``pem`` or ``der``, by content."""
    return "pem" if data.lstrip().startswith(b"-----BEGIN") else "der"
