"""Config models of the OPC UA adapter: one server connection, many node-addressed signals.

Validation errors are short ``ValueError`` texts that say what to fix; the config loader
adds the file, line and path in front of them. Durations are seconds, like everywhere else
in the gateway config (the adapter converts to the milliseconds OPC UA speaks).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.core.signals import SignalConfig
from shopfloor_gateway.adapters.opcua.nodes import is_alias, parse_browse_path, parse_node_id

#: Security policies the gateway speaks. Basic128Rsa15 and Basic256 are deprecated by the
#: OPC Foundation (SHA-1, RSA PKCS#1 v1.5) and refused.
SecurityPolicyName = Literal[
    "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"
]

#: Message security modes: ``Sign`` protects integrity, ``SignAndEncrypt`` also secrecy.
SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]

#: Spellings accepted for the policies (asyncua's class names, the URI fragments).
_POLICY_ALIASES = {
    "none": "None",
    "basic256sha256": "Basic256Sha256",
    "aes128_sha256_rsaoaep": "Aes128_Sha256_RsaOaep",
    "aes128sha256rsaoaep": "Aes128_Sha256_RsaOaep",
    "aes256_sha256_rsapss": "Aes256_Sha256_RsaPss",
    "aes256sha256rsapss": "Aes256_Sha256_RsaPss",
}
_WEAK_POLICIES = {"basic128rsa15": "Basic128Rsa15", "basic256": "Basic256"}


class OpcUaSecurityConfig(BaseModel):
    """Secure channel settings: policy, mode, the gateway's own certificate, the trust list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: SecurityPolicyName = "None"
    #: Defaults to ``SignAndEncrypt`` when a policy is set, ``None`` otherwise.
    mode: SecurityModeName | None = None
    #: The gateway's application instance certificate (PEM or DER), see ``shopfloor opcua-cert``.
    certificate: Path | None = None
    private_key: Path | None = None
    private_key_password: SecretStr | None = None
    #: Trusted server certificates or CA certificates: files, or directories of
    #: ``.pem``/``.der``/``.crt`` files. A server certificate is accepted when it is in the
    #: list or directly issued by a CA certificate in it, and is within its validity period.
    trust: tuple[Path, ...] = ()
    #: Accept any server certificate (still checks nothing else): for commissioning only.
    allow_untrusted: bool = False
    #: Where to save a refused server certificate, so trusting it is one file move.
    rejected_dir: Path | None = None

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_name(cls, value: object) -> object:
        """Accept common spellings; refuse the deprecated policies with the reason."""
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            if key in _WEAK_POLICIES:
                raise ValueError(
                    f"security policy {_WEAK_POLICIES[key]} is deprecated (SHA-1 / RSA PKCS#1 "
                    "v1.5) and refused: use Basic256Sha256, Aes128_Sha256_RsaOaep or "
                    "Aes256_Sha256_RsaPss"
                )
            return _POLICY_ALIASES.get(key, value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Policy and mode agree; a secure policy has a certificate, a key and a trust list."""
        if self.policy == "None":
            if self.mode not in (None, "None"):
                raise ValueError(f"mode {self.mode} needs a security policy (e.g. Basic256Sha256)")
            return self
        if self.mode == "None":
            raise ValueError(f"policy {self.policy} needs mode Sign or SignAndEncrypt")
        missing = [k for k in ("certificate", "private_key") if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"policy {self.policy} needs {' and '.join(missing)}: create them with "
                "'shopfloor opcua-cert --out DIR --application-uri URN'"
            )
        if not self.trust and not self.allow_untrusted:
            raise ValueError(
                "security needs a trust list: add the server's certificate file (or a directory "
                "of trusted certificates) to 'trust', or set allow_untrusted: true while "
                "commissioning"
            )
        return self

    @property
    def effective_mode(self) -> SecurityModeName:
        """The mode in force after defaults."""
        if self.mode is not None:
            return self.mode
        return "None" if self.policy == "None" else "SignAndEncrypt"


class OpcUaConnectionConfig(BaseModel):
    """How to reach one OPC UA server and how to acquire its values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["opcua"] = "opcua"
    #: Endpoint URL, ``opc.tcp://host:port[/path]``.
    url: str
    #: Accept security policy None to a server on another machine (logged at start).
    allow_insecure: bool = False
    #: ``subscription``: monitored items, the server pushes changes (default);
    #: ``polling``: one batched Read per poll interval.
    mode: Literal["subscription", "polling"] = "subscription"
    #: Seconds between publish responses; defaults to the machine's poll interval.
    publishing_interval: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: Seconds between the server's samples of each node; defaults to a quarter of the
    #: publishing interval (:func:`sampling_for`). 0 asks for the fastest rate the server
    #: supports.
    sampling_interval: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    #: Changes the server keeps per monitored item between two publish responses.
    queue_size: int = Field(default=10, ge=1, le=10000)
    #: Seconds to wait for the connection and for each request.
    timeout: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    #: Seconds between liveness probes of an idle connection (a read of the server state).
    watchdog_interval: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    #: Seconds the server keeps the session after the gateway vanished without closing it.
    session_timeout: float = Field(default=60.0, ge=10, allow_inf_nan=False)
    security: OpcUaSecurityConfig = OpcUaSecurityConfig()
    username: str | None = None
    password: SecretStr | None = None
    #: Certificate user identity (an X.509 user token), instead of username/password.
    user_certificate: Path | None = None
    user_private_key: Path | None = None
    #: The gateway's application URI; defaults to the URI in ``security.certificate``,
    #: or ``urn:<hostname>:shopfloor`` without one.
    application_uri: str | None = None
    #: Namespace aliases for browse paths and NodeIds: ``{alias: namespace URI}``.
    namespaces: dict[str, str] = Field(default_factory=dict)
    #: Alias used by browse-path segments without a prefix (namespace 0 when unset).
    default_namespace: str | None = None
    #: Node the browse paths start from (default: the Objects folder).
    root: str = "i=85"
    #: Caps below the server's own operation limits (for servers that advertise none but
    #: choke on large requests).
    max_nodes_per_read: int | None = Field(default=None, ge=1)
    max_monitored_items_per_call: int | None = Field(default=None, ge=1)
    #: Seconds to wait for further notifications before yielding a batch. 0 (the default)
    #: still takes every notification already received (one publish response carries all
    #: of a subscription's changes) without adding a wait to each change's latency.
    coalesce: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        """An ``opc.tcp://host:port`` URL with a host."""
        parsed = urlparse(value.strip())
        # Quoted without its user:password part: these messages are printed and logged.
        shown = repr(_without_credentials(value.strip()))
        if parsed.scheme != "opc.tcp":
            raise ValueError(f"url {shown} must start with opc.tcp://")
        if not parsed.hostname:
            raise ValueError(f"url {shown} has no host")
        try:
            parsed.port  # noqa: B018  (raises for a non-numeric or out-of-range port)
        except ValueError:
            raise ValueError(f"url {shown} has an invalid port") from None
        if parsed.username or parsed.password:
            raise ValueError(f"put credentials in username/password, not in the url (use {shown})")
        return value.strip()

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        """The root must be a NodeId in string notation."""
        parse_node_id(value)
        return value

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: dict[str, str]) -> dict[str, str]:
        """Aliases are short identifiers; URIs are not blank."""
        for alias, uri in value.items():
            if not is_alias(alias):
                raise ValueError(
                    f"namespace alias {alias!r} must start with a letter or '_' and contain "
                    "only letters, digits, '_', '.', '-'"
                )
            if not isinstance(uri, str) or not uri.strip():
                raise ValueError(f"namespace alias {alias!r} needs a namespace URI")
        return value

    @model_validator(mode="after")
    def _identity(self) -> Self:
        """One user identity at most, each complete; the default alias exists."""
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if (self.user_certificate is None) != (self.user_private_key is None):
            raise ValueError("user_certificate and user_private_key go together")
        if self.username is not None and self.user_certificate is not None:
            raise ValueError("choose one user identity: username/password or user_certificate")
        if self.user_certificate is not None and self.security.policy == "None":
            raise ValueError("a certificate user identity needs a security policy to sign with")
        if self.default_namespace is not None and self.default_namespace not in self.namespaces:
            raise ValueError(
                f"default_namespace {self.default_namespace!r} is not an alias in 'namespaces'"
            )
        return self

    @property
    def host(self) -> str:
        """Host part of the URL."""
        return urlparse(self.url).hostname or ""


class OpcUaSignalConfig(SignalConfig):
    """Where one signal lives on the server (a NodeId or a browse path) plus its mapping."""

    #: ``ns=2;s=Machine.State``, ``nsu=<uri>;i=1001``, ``i=2258``.
    node_id: str | None = None
    #: ``alias:Machine/alias:Monitoring/State``, relative to the connection's ``root``.
    browse_path: str | None = None
    #: Element of an array value to use (0-based).
    array_index: int | None = Field(default=None, ge=0)

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        """Check the NodeId notation now, not at connect time."""
        if value is not None:
            parse_node_id(value)
        return value

    @field_validator("browse_path")
    @classmethod
    def _browse_path(cls, value: str | None) -> str | None:
        """Check the browse-path notation now, not at connect time."""
        if value is not None:
            parse_browse_path(value)
        return value

    @field_validator("array_index", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        """Refuse YAML booleans where a number is meant."""
        if isinstance(value, bool):
            raise ValueError("must be a whole number, not true/false")
        return value

    @model_validator(mode="after")
    def _one_address(self) -> Self:
        """Exactly one of node_id and browse_path."""
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError(
                "give exactly one of node_id (e.g. 'ns=2;s=Machine.State') or browse_path "
                "(e.g. 'tools:Machine/Monitoring/State')"
            )
        return self


def check(connection: OpcUaConnectionConfig, signals: dict[str, OpcUaSignalConfig]) -> list[str]:
    """Cross-model checks: aliases used by signals exist; certificate and trust files exist."""
    problems: list[str] = []
    known = set(connection.namespaces)
    for name, sig in signals.items():
        if sig.browse_path is None:
            continue
        for alias in sorted(parse_browse_path(sig.browse_path).aliases - known):
            problems.append(
                f"signal {name}: browse_path uses namespace alias {alias!r}, which is not in "
                f"connection.namespaces (known: {', '.join(sorted(known)) or 'none'})"
            )
    sec = connection.security
    files = {
        "security.certificate": sec.certificate,
        "security.private_key": sec.private_key,
        "user_certificate": connection.user_certificate,
        "user_private_key": connection.user_private_key,
    }
    for key, path in files.items():
        if path is not None and not path.is_file():
            problems.append(f"{key}: file {str(path)!r} does not exist")
    for path in sec.trust:
        if not path.exists():
            problems.append(f"security.trust: {str(path)!r} does not exist")
    if sec.policy == "None" and not _is_loopback(connection.host) and not connection.allow_insecure:
        # Secure by default: an unsigned session to another machine is a choice to spell out.
        problems.append(
            f"security policy None to {connection.host}: set security.policy (e.g. "
            "Basic256Sha256) and trust the server certificate, or set allow_insecure: true "
            "to accept unsigned, unencrypted traffic"
        )
    return problems


def insecure_reasons(connection: OpcUaConnectionConfig) -> list[str]:
    """Settings that weaken security, for the config check to print as warnings."""
    reasons: list[str] = []
    sec = connection.security
    if sec.policy == "None" and not _is_loopback(connection.host):
        reasons.append(
            f"security policy None: traffic to {connection.host} is neither signed nor encrypted"
        )
    if sec.policy == "None" and connection.username is not None:
        reasons.append("username/password over a channel without security policy")
    if sec.policy != "None" and sec.effective_mode == "Sign":
        reasons.append("security mode Sign: values are signed but not encrypted")
    if sec.policy != "None" and sec.allow_untrusted:
        reasons.append(
            "security.allow_untrusted: any server certificate is accepted "
            "(a man in the middle can pose as the server)"
        )
    return reasons


def _without_credentials(url: str) -> str:
    """``url`` with its ``user:password@`` removed (up to the last ``@`` before the path)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (literal loopback address or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Default sampling interval as a fraction of the publishing interval. A change waits up to
#: one sampling interval to be seen and up to one publishing interval to be sent: sampling
#: as slowly as publishing (the former default) doubled the worst case and added half a
#: publishing interval to the median; a quarter adds at most 25 % while asking the server
#: for only four samples per node and publishing cycle (0, its fastest rate, may be far
#: more on a PLC that samples by polling).
DEFAULT_SAMPLING_FRACTION = 0.25


def sampling_for(sampling_interval: float | None, publishing_interval: float) -> float:
    """Sampling interval in seconds to request: the configured one, else the default."""
    if sampling_interval is not None:
        return sampling_interval
    return publishing_interval * DEFAULT_SAMPLING_FRACTION
