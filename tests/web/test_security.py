"""Who the caller is behind a proxy: a request that names no usable client is not loopback."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.requests import Request

from app.config import IPNetwork
from app.web.security import client_ip, is_loopback_host

from ..helpers import AppFactory, client_for, events

NETS = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")]


def request_from(peer: str, *xff: str, other: tuple[str, str] | None = None) -> Request:
    headers = [(b"x-forwarded-for", v.encode()) for v in xff]
    if other is not None:
        headers.append((other[0].encode(), other[1].encode()))
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers,
                    "client": (peer, 40000), "query_string": b""})


@pytest.mark.parametrize(("peer", "xff", "trusted", "expected"), [
    # Direct callers are who they are.
    ("127.0.0.1", (), [], "127.0.0.1"),
    ("198.51.100.7", (), NETS, "198.51.100.7"),
    ("198.51.100.7", ("203.0.113.9",), NETS, "198.51.100.7"),  # forged header, untrusted peer
    # A trusted proxy: the first untrusted hop from the right.
    ("127.0.0.1", ("203.0.113.9",), NETS, "203.0.113.9"),
    ("127.0.0.1", ("203.0.113.9, 198.51.100.7",), NETS, "198.51.100.7"),
    ("127.0.0.1", ("198.51.100.7, 10.1.1.1",), NETS, "198.51.100.7"),
    ("127.0.0.1", ("203.0.113.9", "10.1.1.1"), NETS, "203.0.113.9"),
    # A trusted proxy that names no usable client: unknown, never the proxy itself.
    ("127.0.0.1", (), NETS, None),
    ("127.0.0.1", ("",), NETS, None),
    ("127.0.0.1", (" , ",), NETS, None),
    ("127.0.0.1", ("10.1.1.1, 127.0.0.1",), NETS, None),
    ("10.2.2.2", (), NETS, None),
    ("127.0.0.1", ("not-an-address",), NETS, None),
    # A proxy on this host that is not configured as trusted forwards for an unknown client.
    ("127.0.0.1", ("203.0.113.9",), [], None),
    ("::1", ("",), [], None),
])
def test_client_ip(peer: str, xff: tuple[str, ...], trusted: list[IPNetwork],
                   expected: str | None) -> None:
    addr = client_ip(request_from(peer, *xff), trusted)
    assert (str(addr) if addr is not None else None) == expected


@pytest.mark.parametrize("header", [("forwarded", "for=203.0.113.9"), ("x-real-ip", "203.0.113.9")])
def test_other_forwarding_headers_from_loopback_are_a_proxy(header: tuple[str, str]) -> None:
    assert client_ip(request_from("127.0.0.1", other=header), []) is None


async def test_a_same_host_proxy_without_client_address_is_not_loopback(
    app_with: AppFactory,
) -> None:
    app = await app_with(trusted_proxies="127.0.0.1/32")
    async with client_for(app, "127.0.0.1") as proxy:
        refused = [
            await proxy.get("/api/v1/rejected"),
            await proxy.get("/api/v1/stats", headers={"X-Forwarded-For": ""}),
            await proxy.get("/api/v1/stats", headers={"X-Forwarded-For": "127.0.0.1"}),
            await proxy.get("/api/v1/stats", headers={"X-Forwarded-For": "203.0.113.9"}),
        ]
    assert [r.status_code for r in refused] == [403, 403, 403, 403]
    assert all("loopback" in r.json()["detail"] for r in refused)


async def test_an_unconfigured_same_host_proxy_is_not_loopback(app_with: AppFactory) -> None:
    app = await app_with()
    async with client_for(app, "127.0.0.1") as local:
        assert (await local.get("/api/v1/stats")).status_code == 200  # a local user
        forwarded = await local.get("/api/v1/rejected", headers={"X-Forwarded-For": ""})
        assert forwarded.status_code == 403


async def test_allow_list_behind_a_proxy_needs_the_client_address(
    app_with: AppFactory, engine: Engine,
) -> None:
    app = await app_with(callback_allowed_ips="203.0.113.0/24", trusted_proxies="10.0.0.0/8")
    params = {"type": "seen", "msg_id": "p1"}
    async with client_for(app, "10.1.2.3") as proxy:
        ok = await proxy.get("/dlr", params=params, headers={"X-Forwarded-For": "203.0.113.9"})
        no_header = await proxy.get("/dlr", params=params)
        empty = await proxy.get("/dlr", params=params, headers={"X-Forwarded-For": ""})
        inner = await proxy.get("/dlr", params=params, headers={"X-Forwarded-For": "10.9.9.9"})
    assert [r.status_code for r in (ok, no_header, empty, inner)] == [200, 403, 403, 403]
    assert events(engine) == 1  # the allowed one is stored; the refused ones are not


# --- without API keys: loopback names only, nothing a browser marks as cross-site --------------
# A page on a rebinding domain (evil.example resolving to 127.0.0.1) or any site's form would
# otherwise read and write the API through a browser on this machine.

@pytest.mark.parametrize(("host", "ok"), [
    ("localhost", True), ("LOCALHOST:8000", True), ("localhost.", True),
    ("dash.localhost:8000", True), ("127.0.0.1", True), ("127.1.2.3:80", True),
    ("[::1]", True), ("[::1]:8000", True),
    ("evil.example", False), ("evil.example:8000", False), ("127.0.0.1.nip.io", False),
    ("localhost.evil.example", False), ("0.0.0.0:8000", False), ("10.0.0.1", False),
    ("localhost:x", False), ("[::1]x", False), ("", False),
])
def test_loopback_host_names(host: str, ok: bool) -> None:
    assert is_loopback_host(host) is ok


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/messages"), ("GET", "/api/v1/stats"), ("GET", "/dashboard"),
    ("POST", "/api/v1/endpoints"), ("POST", "/api/v1/images"),
    ("POST", "/api/v1/endpoints/1/rotate-secret"), ("POST", "/api/v1/deliveries/1/retry"),
])
async def test_a_rebound_host_name_is_refused_without_keys(app: FastAPI, method: str,
                                                           path: str) -> None:
    async with client_for(app) as c:
        r = await c.request(method, path, headers={"host": "evil.example",
                                                   "accept": "application/json"})
    assert r.status_code == 403
    assert "localhost" in r.json()["detail"]


async def test_a_cross_site_browser_request_is_refused_without_keys(app: FastAPI) -> None:
    async with client_for(app) as c:
        r = await c.get("/api/v1/messages", headers={"sec-fetch-site": "cross-site"})
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
        # A cross-site form POST (older browsers send no Sec-Fetch-Site, but an Origin).
        for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
            r = await c.post("/api/v1/endpoints/1/rotate-secret", headers={"origin": origin})
            assert r.status_code == 403, origin
            assert "origin" in r.json()["detail"]
        r = await c.post("/api/v1/images", headers={"origin": "https://evil.example"},
                         files={"image": ("a.png", b"\x89PNG\r\n\x1a\n", "image/png")})
        assert r.status_code == 403


async def test_loopback_names_and_same_origin_pages_are_served_without_keys(
        app: FastAPI) -> None:
    async with client_for(app) as c:
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "app.localhost"):
            r = await c.get("/api/v1/messages", headers={"host": host})
            assert r.status_code == 200, host
        r = await c.get("/api/v1/messages", headers={"sec-fetch-site": "same-origin"})
        assert r.status_code == 200
        # The dashboard's own script, and a GET from anywhere that names loopback.
        r = await c.post("/api/v1/endpoints", json={"url": "https://example.com/hook"},
                         headers={"origin": "http://localhost:8000",
                                  "sec-fetch-site": "same-origin"})
        assert r.status_code == 201, r.text
        r = await c.get("/api/v1/messages", headers={"origin": "https://elsewhere.example"})
        assert r.status_code == 200


async def test_a_request_without_a_host_header_is_served_without_keys(app: FastAPI) -> None:
    # HTTP/1.0 tools may send no Host; no browser does.
    scope_headers: list[tuple[bytes, bytes]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.0",
               "method": "GET", "scheme": "http", "path": "/api/v1/messages",
               "raw_path": b"/api/v1/messages", "query_string": b"", "root_path": "",
               "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
               "headers": scope_headers}, receive, send)
    assert sent[0]["status"] == 200


async def test_with_keys_any_host_name_and_origin_with_the_key_are_served(
        app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1")
    async with client_for(app, peer="203.0.113.9") as c:
        r = await c.get("/api/v1/messages", headers={"host": "dlr.example.com",
                                                     "x-api-key": "k1"})
        assert r.status_code == 200
        r = await c.get("/api/v1/messages", headers={"host": "evil.example"})
        assert r.status_code == 401
