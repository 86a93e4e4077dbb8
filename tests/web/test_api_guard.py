"""Bodies sent to /api/*: who may send one is decided before a byte is read, and every body
has a size limit and a read deadline. A client that goes away mid-body is no error."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi import FastAPI

from ..helpers import AppFactory

SEND = {"phone": ["79031234567"], "txt": "hi"}


async def call(app: FastAPI, method: str, path: str, headers: dict[str, str],
               chunks: list[bytes], *, pause: float = 0.0,
               peer: str = "127.0.0.1") -> tuple[int, bytes, int]:
    """Drive the app at the ASGI level: the body arrives in `chunks`, `pause` seconds apart.
    Returns the status, the body and how many chunks the app asked for."""
    asked = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if asked > len(chunks):
            await asyncio.sleep(3600)  # the client sends nothing more
        await asyncio.sleep(pause)
        return {"type": "http.request", "body": chunks[asked - 1],
                "more_body": asked < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": (peer, 40000),
             "server": ("testserver", 80),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, asked


async def test_without_a_key_nothing_of_the_body_is_read(app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1")
    big = [b"x" * 65536] * 1600  # 100 MB, if anyone read it
    for path, ctype in (("/api/v1/messages", "application/json"),
                        ("/api/v1/images", "multipart/form-data; boundary=b")):
        status, body, asked = await call(app, "POST", path, {"content-type": ctype}, big)
        assert (status, asked) == (401, 0)
        assert b"API key" in body


async def test_an_api_body_over_the_limit_is_refused(app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1", upload_max_bytes=100_000)
    key = {"x-api-key": "k1", "content-type": "multipart/form-data; boundary=b"}
    # Declared too large: refused before reading.
    status, _, asked = await call(app, "POST", "/api/v1/images",
                                  key | {"content-length": "10000000"}, [b"x"])
    assert (status, asked) == (413, 0)
    # Not declared (chunked): refused once the bytes read pass the limit, not at the end.
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    status, body, asked = await call(app, "POST", "/api/v1/images", key,
                                     [part] + [b"x" * 65536] * 50)
    assert status == 413 and b"over" in body
    assert asked < 50


async def test_a_json_send_has_its_own_tighter_limit(app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1", bulk_user="u", bulk_secret_key="k", bulk_from="Shop")
    status, _, _ = await call(app, "POST", "/api/v1/messages",
                              {"x-api-key": "k1", "content-type": "application/json"},
                              [b"[" + b" " * 65536] * 40)  # 2.6 MB of JSON
    assert status == 413


async def test_an_api_body_that_trickles_in_gets_408(app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1", api_read_timeout=0.3, bulk_user="u",
                         bulk_secret_key="k", bulk_from="Shop")
    status, body, asked = await call(
        app, "POST", "/api/v1/messages", {"x-api-key": "k1", "content-type": "application/json"},
        [b'{"phone": ', b'["79031234567"], ', b'"txt": "hi"}'], pause=0.2)
    assert status == 408 and b"not received within" in body
    assert asked < 3


async def test_a_client_gone_mid_body_is_an_info_line_not_an_error(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/dlr", "raw_path": b"/dlr",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000),
             "server": ("testserver", 80),
             "headers": [(b"content-type", b"application/x-www-form-urlencoded")]}
    with caplog.at_level(logging.INFO):
        await app(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("disconnected" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
