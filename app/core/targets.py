"""Which endpoint URLs are allowed. Link-local addresses, where cloud metadata services live
(169.254.169.254, fe80::/10), are refused; loopback and private ranges are allowed, since
forwarding to the user's own internal services is the point."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL = 2048
BLOCKED = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


def blocked_address(value: str) -> bool:
    """Whether an IP address (text) is one forwarding must never connect to."""
    try:
        addr = ipaddress.ip_address(value.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:169.254.169.254 is the same target
    return any(addr in net for net in BLOCKED)


def check_url(url: str) -> str:
    """The URL if it may be an endpoint; ValueError with the reason otherwise."""
    url = url.strip()
    if len(url) > MAX_URL:
        raise ValueError(f"URL is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("URL must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    if blocked_address(host):
        raise ValueError(f"{host} is a link-local (cloud metadata) address, which is refused")
    return url

class RefusedAddress(ConnectionError):
    """The target resolves to an address forwarding must not connect to."""


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses; RefusedAddress if any of them is blocked."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for addr in addresses:
        if blocked_address(addr):
            raise RefusedAddress(f"{host} resolves to the link-local address {addr}, "
                                 "which forwarding refuses")
    return addresses
