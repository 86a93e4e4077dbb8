"""Who the caller is behind a proxy: a request that names no usable client is not loopback."""

from __future__ import annotations

import ipaddress

import pytest
from sqlalchemy import Engine
from starlette.requests import Request

from app.config import IPNetwork
from app.web.security import client_ip

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
