"""Who may call: the provider (token, source allow-list) and API key holders."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from app.config import IPNetwork, Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _in(addr: IPAddress, networks: list[IPNetwork]) -> bool:
    return any(addr in net for net in networks)


def _parse(value: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_ip(request: Request, trusted_proxies: list[IPNetwork]) -> IPAddress | None:
    """The caller's address. X-Forwarded-For is believed only from a trusted proxy, and then
    read from the right, stopping at the first hop that is not itself a trusted proxy: the
    left part of the header is whatever the client chose to write."""
    peer = _parse(request.client.host) if request.client else None
    if peer is None or not _in(peer, trusted_proxies):
        return peer
    header = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [h for h in header.split(",") if h.strip()]
    for hop in reversed(hops):
        addr = _parse(hop)
        if addr is None:
            return None  # a garbled chain names nobody we can trust
        if not _in(addr, trusted_proxies):
            return addr
    return peer


def token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def check_callback(request: Request, settings: Settings, path_token: str | None) -> None:
    """Raise 403 unless the callback carries the token and comes from an allowed address.

    With no token configured, a path token is ignored rather than refused: a 404 would tell
    the provider to stop re-sending, and the notification would be lost.
    """
    if settings.callback_token is not None:
        given = path_token if path_token is not None else request.query_params.get("token")
        if not token_matches(given, settings.callback_token.get_secret_value()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong or missing callback token")
    if settings.callback_allowed_ips is not None:
        addr = client_ip(request, settings.trusted_proxies)
        if addr is None or not _in(addr, settings.callback_allowed_ips):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "source address not allowed")


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")


async def require_api_access(request: Request) -> None:
    """API keys when configured; otherwise loopback clients only (async: no thread hop)."""
    check_api_access(request)


def check_api_access(request: Request) -> None:
    settings: Settings = request.app.state.settings
    keys = settings.api_key_values()
    if keys:
        given = _presented_key(request)
        # Compare against every key so the time taken does not say which one nearly matched.
        ok = False
        for key in keys:
            ok |= token_matches(given, key)
        if not ok:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong API key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return
    addr = client_ip(request, settings.trusted_proxies)
    if addr is None or not addr.is_loopback:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "no API keys are configured: loopback clients only"
        )


ApiAccess = Annotated[None, Depends(require_api_access)]
