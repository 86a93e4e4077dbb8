"""Which endpoint URLs forwarding may send to, and where it may connect.

Cloud metadata services are refused: the link-local ranges (169.254.169.254, fe80::/10) and
the providers' other metadata addresses, in every spelling (IPv4-mapped, NAT64). Loopback and
private ranges are allowed, since forwarding to the user's own internal services is the point.
A URL is checked when the endpoint is made or changed (`check_url`, and `refuse_if_blocked`
for what its host resolves to then), and again at every connection (`resolve`): the client
connects to the very address checked, so a DNS answer that changes between the check and the
connect (rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL = 2048
BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",     # link-local: AWS, GCP, Azure, DigitalOcean, OpenStack metadata
    "fe80::/10",          # IPv6 link-local
    "fd00:ec2::254/128",  # AWS's IPv6 metadata service
    "100.100.100.200/32",  # Alibaba Cloud's metadata service
    "192.0.0.192/32",     # Oracle Cloud's metadata service
))
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits (64:ff9b::a9fe:a9fe is
# 169.254.169.254 through a NAT64 gateway).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What resolving a host for a check may take; a host that does not resolve in time passes the
# check (every connection is checked again).
RESOLVE_SECONDS = 3.0


class RefusedAddress(ConnectionError):
    """The target resolves to an address forwarding must not connect to."""


def blocked_address(value: str) -> bool:
    """Whether an IP address (text) is one forwarding must never connect to."""
    try:
        addr = ipaddress.ip_address(value.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # ::ffff:169.254.169.254 is the same target
        elif addr in NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return any(addr in net for net in BLOCKED)


def check_url(url: str) -> str:
    """The URL if it may be an endpoint; ValueError with the reason otherwise.

    Refused before it is stored rather than when a request is made (where it would fail every
    attempt): anything but http(s), a host IDNA cannot encode (an empty or 64-character
    label), a user name or password (never shown, never sent), and a space, control character
    or non-ASCII character outside the host (percent-encode it)."""
    url = url.strip()
    if len(url) > MAX_URL:
        raise ValueError(f"URL is longer than {MAX_URL} characters")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("URL holds a character that is not valid Unicode") from None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("URL must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry a user name or password; the receiver checks "
                         "the webhook signature instead")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"URL's host {host!r} is not a valid domain name") from None
    rest = url[url.index(parts.netloc) + len(parts.netloc):]
    odd = next((c for c in rest if c.isspace() or not c.isprintable() or not c.isascii()), None)
    if odd is not None:
        raise ValueError(f"URL holds {odd!r} after the host; percent-encode it")
    if blocked_address(host):
        raise ValueError(f"{host} is a link-local or cloud metadata address, which is refused")
    return url


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses; RefusedAddress if any of them is blocked, ConnectionError if it
    does not resolve."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConnectionError(f"cannot resolve {host}: {reason}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for addr in addresses:
        if blocked_address(addr):
            raise RefusedAddress(f"{host} resolves to the link-local or cloud metadata "
                                 f"address {addr}, which forwarding refuses")
    return addresses


async def refuse_if_blocked(url: str) -> None:
    """RefusedAddress if the URL's host resolves to a refused address now. A host that does
    not resolve (yet), or not in RESOLVE_SECONDS, passes: every connection is checked again."""
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(RESOLVE_SECONDS):
            await resolve(parts.hostname or "", parts.port or 443)
    except RefusedAddress:
        raise
    except (OSError, TimeoutError):
        return
