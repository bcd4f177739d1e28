"""Server certificate trust decisions and the ``opcua-cert`` command (no network)."""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from shopfloor_gateway.adapters.opcua import cert as opcua_cert
from shopfloor_gateway.adapters.opcua.config import OpcUaSecurityConfig
from shopfloor_gateway.adapters.opcua.security import (
    SecuritySetupError,
    application_uri_of,
    check_server_certificate,
    load_trust,
    refusal_message,
    save_rejected,
)

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make(
    cn: str,
    *,
    issuer: x509.Certificate | None = None,
    ca: bool = False,
    days: tuple[int, int] = (-10, 365),
) -> x509.Certificate:
    """A certificate signed by ``issuer`` (or itself), valid around NOW."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + dt.timedelta(days=days[0]))
        .not_valid_after(NOW + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"urn:{cn}")]),
            critical=False,
        )
    )
    return builder.sign(_KEY, hashes.SHA256())


def test_exact_certificate_is_trusted() -> None:
    """A self-signed server certificate in the list is accepted."""
    server = make("server")
    assert check_server_certificate(server, [make("other"), server], NOW.timestamp()) is None


def test_unknown_certificate_is_refused() -> None:
    """Not in the list: refused."""
    problem = check_server_certificate(make("server"), [make("other")], NOW.timestamp())
    assert problem == "the server certificate is not in security.trust"


def test_certificate_issued_by_a_trusted_ca() -> None:
    """A CA in the list vouches for the certificates it issued, not for others."""
    ca = make("plant-ca", ca=True)
    assert check_server_certificate(make("server", issuer=ca), [ca], NOW.timestamp()) is None
    not_a_ca = make("plant-ca", ca=False)
    assert check_server_certificate(make("server", issuer=not_a_ca), [not_a_ca], NOW.timestamp())


@pytest.mark.parametrize(
    ("days", "fragment"), [((-400, -1), "expired on"), ((5, 400), "not valid before")]
)
def test_expired_or_future_certificate_is_refused_even_when_trusted(
    days: tuple[int, int], fragment: str
) -> None:
    """The validity period is checked before the trust list."""
    server = make("server", days=days)
    problem = check_server_certificate(server, [server], NOW.timestamp())
    assert problem is not None and fragment in problem


def test_refusal_message_says_how_to_trust(tmp_path: Path) -> None:
    """The message names the certificate, the saved file and where it goes."""
    server = make("My Server/1")
    saved = save_rejected(tmp_path / "rejected", server)
    assert saved.read_bytes() == server.public_bytes(serialization.Encoding.DER)
    assert "/" not in saved.name
    sec = OpcUaSecurityConfig(
        policy="Basic256Sha256", certificate=Path("c"), private_key=Path("k"), trust=(tmp_path,)
    )
    text = refusal_message("opc.tcp://x:4840", server, "not trusted", sec, saved)
    assert str(saved) in text and str(tmp_path) in text and "SHA-256" in text
    expired = refusal_message("opc.tcp://x:4840", server, "the certificate expired on", sec, None)
    assert "renew" in expired


def test_load_trust_reads_files_and_directories(tmp_path: Path) -> None:
    """PEM and DER, by content; unreadable files are named."""
    a, b = make("a"), make("b")
    (tmp_path / "a.der").write_bytes(a.public_bytes(serialization.Encoding.DER))
    (tmp_path / "b.crt").write_bytes(b.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "notes.txt").write_text("ignored")
    assert {c.subject for c in load_trust([tmp_path])} == {a.subject, b.subject}
    (tmp_path / "broken.pem").write_text("garbage")
    with pytest.raises(SecuritySetupError, match=r"broken\.pem"):
        load_trust([tmp_path])


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    opcua_cert.add_arguments(parser)
    return parser.parse_args(
        [
            "--out",
            str(out),
            "--application-uri",
            "urn:edge-1:shopfloor",
            "--hostname",
            "edge-1",
            *extra,
        ]
    )


def test_opcua_cert_writes_a_usable_pair(tmp_path: Path) -> None:
    """Certificate with the URI and host, key mode 0600, no silent overwrite."""
    out = tmp_path / "pki"
    assert opcua_cert.run(_args(out)) == 0
    cert = x509.load_pem_x509_certificate((out / "client-cert.pem").read_bytes())
    assert application_uri_of(cert) == "urn:edge-1:shopfloor"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # This host's name (asyncua checks the client certificate against it) and the name the
    # server knows the machine by.
    assert san.get_values_for_type(x509.DNSName) == [socket.gethostname(), "edge-1"]
    key_file = out / "client-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    before = key_file.read_bytes()
    assert opcua_cert.run(_args(out)) == 2
    assert key_file.read_bytes() == before
    assert opcua_cert.run(_args(out, "--force")) == 0
    assert key_file.read_bytes() != before


def test_opcua_cert_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a URI: exit 2 with a message."""
    parser = argparse.ArgumentParser()
    opcua_cert.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--application-uri", "shopfloor"])
    assert opcua_cert.run(args) == 2
    assert "not a URI" in capsys.readouterr().err
    args = parser.parse_args(
        ["--out", str(tmp_path), "--application-uri", "urn:a:b", "--hostname", "edge 1"]
    )
    assert opcua_cert.run(args) == 2
    assert "not a DNS name" in capsys.readouterr().err
