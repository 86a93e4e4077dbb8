"""Who may call: the provider (token, source allow-list) and API key holders."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, status
from itsdangerous import BadSignature, TimestampSigner

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
    """The caller's address, or None when it cannot be known.

    X-Forwarded-For is believed only from a trusted proxy, and then read from the right,
    stopping at the first hop that is not itself a trusted proxy: the left part of the header
    is whatever the client chose to write. A request that came through a proxy but names no
    usable client (no, an empty or a garbled X-Forwarded-For, or only trusted hops) has no
    known address: never the proxy's own, which on the same host would pass as loopback.
    """
    peer = _parse(request.client.host) if request.client else None
    if peer is None:
        return None
    if not _in(peer, trusted_proxies):
        # A loopback peer that forwards for someone else is a proxy on this host that is
        # not configured as trusted: whoever it forwards for is unknown, not local.
        if peer.is_loopback and any(
                name in request.headers for name in ("x-forwarded-for", "forwarded", "x-real-ip")):
            return None
        return peer
    header = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [h for h in header.split(",") if h.strip()]
    for hop in reversed(hops):
        addr = _parse(hop)
        if addr is None:
            return None  # a garbled chain names nobody we can trust
        if not _in(addr, trusted_proxies):
            return addr
    return None  # only trusted hops, or none at all


def token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def matching_key(keys: list[str], accepts: Callable[[str], bool]) -> str | None:
    """The key that `accepts` takes, after trying every key whatever the outcome, so that the
    time taken does not say which one nearly matched. (The one way every check against the
    configured keys is made: a presented key, a session cookie, the sign-in form.)"""
    matched: str | None = None
    for key in keys:
        if accepts(key):
            matched = key
    return matched


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
        ok = matching_key(keys, lambda key: token_matches(given, key)) is not None
        # A dashboard session stands in for the key on reads only; a presented key that is
        # wrong is refused even beside a valid session, so the answer never misleads.
        if not ok and given is None and session_may_read(request):
            ok = has_valid_session(request, keys)
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
    check_loopback_browser(request)


# Without API keys, a loopback peer is not enough: any web page open in a browser on this
# machine can make it send requests here. A page on a rebinding domain (evil.example resolving
# to 127.0.0.1) reads answers as its own, and a plain form on any site can POST. So, without
# keys, the request must also be addressed to a loopback name (a rebound request carries the
# attacker's host name), and a request the browser marks as coming from another site is
# refused: `Sec-Fetch-Site: cross-site`, and for a method that changes something, an `Origin`
# that is not a loopback origin (older browsers send no Sec-Fetch-Site).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback_host(host: str) -> bool:
    """`localhost`, `*.localhost`, an address in 127.0.0.0/8 or `[::1]`, with or without a
    port (a Host header's spelling; a trailing dot and letter case do not matter)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if colon and not port.isdigit():
            return False
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    addr = _parse(name)
    return addr is not None and addr.is_loopback


def _loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        netloc = parts.netloc
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(netloc) and is_loopback_host(netloc)


def check_loopback_browser(request: Request) -> None:
    """Raise 403 unless the request is addressed to a loopback name and no browser marks it as
    sent by another site. (A request without a Host header, from HTTP/1.0 tools, passes.)"""
    host = request.headers.get("host")
    if host is not None and not is_loopback_host(host):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "no API keys are configured: requests must be addressed to localhost or a "
            f"loopback address, not {host[:100]!r} (set DLR_API_KEYS to serve other names)")
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "no API keys are configured: cross-site requests are refused")
    origin = request.headers.get("origin")
    if (request.method not in _SAFE_METHODS and origin is not None
            and not _loopback_origin(origin)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"no API keys are configured: requests from the web origin {origin[:100]!r} are "
            "refused (only pages served from localhost or a loopback address may send)")


# Dashboard sessions. The cookie holds a random id, a timestamp and a signature whose key is
# derived (HMAC-SHA256 with a purpose salt) from one API key: never the key itself. Nothing
# is stored on the server, so sessions survive a restart and work across workers, and
# removing a key from DLR_API_KEYS ends every session opened with it. Cross-site requests
# cannot use it: SameSite=Strict keeps the browser from sending it on them, and it opens
# GET and HEAD only, which change nothing; sends still need the key itself.
SESSION_COOKIE = "dlr_session"
SESSION_MAX_AGE = 12 * 3600
_SESSION_SALT = "dlr.dashboard-session.v1"
_SESSION_METHODS = frozenset({"GET", "HEAD"})


def _session_signer(api_key: str) -> TimestampSigner:
    return TimestampSigner(api_key, salt=_SESSION_SALT, key_derivation="hmac",
                           digest_method=hashlib.sha256)


def new_session(api_key: str) -> str:
    """A fresh session cookie value for a browser that presented `api_key`."""
    return _session_signer(api_key).sign(secrets.token_urlsafe(16)).decode()


def session_may_read(request: Request) -> bool:
    """A session opens reads of the API and the dashboard page, and nothing else."""
    path: str = request.scope["path"]
    return request.method in _SESSION_METHODS and (path.startswith("/api/")
                                                   or path == "/dashboard")


def has_valid_session(request: Request, keys: list[str]) -> bool:
    """The request carries a session cookie signed for one of `keys`, at most 12 h old."""
    value = request.cookies.get(SESSION_COOKIE)
    if not value:
        return False

    def signed_with(key: str) -> bool:
        try:
            _session_signer(key).unsign(value, max_age=SESSION_MAX_AGE)
        except BadSignature:  # also expired, or dated in the future
            return False
        return True

    return matching_key(keys, signed_with) is not None


def arrived_over_https(request: Request, trusted_proxies: list[IPNetwork]) -> bool:
    """The browser's connection is TLS: directly, or at a trusted proxy that says so."""
    if request.url.scheme == "https":
        return True
    peer = _parse(request.client.host) if request.client else None
    if peer is None or not _in(peer, trusted_proxies):
        return False
    proto = request.headers.get("x-forwarded-proto", "").split(",")[-1].strip().lower()
    return proto == "https"


ApiAccess = Annotated[None, Depends(require_api_access)]
