"""Where forwarding may connect. Every new connection resolves the endpoint's host itself
and refuses it if any address is link-local (cloud metadata); the client then connects to
the very address checked, so a DNS answer that changes between the check and the connect
(rebinding) cannot slip through."""

from __future__ import annotations

import asyncio
import socket

from app.forwarding.urls import blocked_address


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
