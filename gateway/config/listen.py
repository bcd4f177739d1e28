"""Listen addresses (``host:port``) of the gateway's own servers."""

from __future__ import annotations

import ipaddress

#: Where the health server and console listen unless the config says otherwise.
DEFAULT_LISTEN = "127.0.0.1:9108"


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into a pair; ``ValueError`` says what is wrong.

    The host must be an IP address: a name would resolve at start-up to something the
    config file does not show.
    """
    raw = text.strip()
    if raw.startswith("["):
        host, sep, port_text = raw[1:].partition("]:")
        if not sep:
            raise ValueError(f"listen address {text!r}: write IPv6 as [address]:port")
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or not host:
            raise ValueError(f"listen address {text!r}: expected host:port, e.g. {DEFAULT_LISTEN}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen address {text!r}: {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and not raw.startswith("["):
        raise ValueError(f"listen address {text!r}: write IPv6 as [address]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r}: port must be 0..65535")
    return str(ip), int(port_text)
