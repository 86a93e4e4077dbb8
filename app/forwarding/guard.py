"""The HTTP client forwarding sends with. Its connections are checked after DNS resolution:
a hostname that resolves to a link-local (metadata) address is refused before any byte is
sent, and the client connects to the very address it checked, so a DNS answer that changes
between the check and the connect (rebinding) cannot slip through."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable

import httpcore
import httpx

from app.forwarding.urls import blocked_address


class RefusedAddress(httpcore.ConnectError):
    """The target resolves to an address forwarding must not connect to."""


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses; RefusedAddress if any of them is blocked."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for addr in addresses:
        if blocked_address(addr):
            raise RefusedAddress(f"{host} resolves to the link-local address {addr}, "
                                 "which forwarding refuses")
    return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        error: Exception | None = None
        for addr in addresses:
            try:
                return await self._inner.connect_tcp(addr, port, timeout=timeout,
                                                      local_address=local_address,
                                                      socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None  # getaddrinfo never answers an empty list
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("forwarding does not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, its connection pool given the guarded network backend (httpx
    takes no backend argument; the pool it builds is replaced before first use)."""

    def __init__(self, *, max_keepalive: int) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=None,  # each endpoint's lane limits its own concurrency
            max_keepalive_connections=max_keepalive,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(),
        )


def make_client(*, max_keepalive: int = 64) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment would connect on our behalf, unchecked.
    # No redirects: a 3xx is an answer like any other non-2xx, as webhook senders do.
    return httpx.AsyncClient(transport=GuardedTransport(max_keepalive=max_keepalive),
                             trust_env=False, follow_redirects=False,
                             headers={"user-agent": "dlr-receiver-webhooks/0.1"})
