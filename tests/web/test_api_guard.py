"""Bodies sent to /api/*: who may send one is decided before a byte is read, and every body
has a size limit and a read deadline. A client that goes away mid-body is no error."""

from __future__ import annotations

import asyncio
import json
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


# --- each route's own limit, and short error answers -------------------------------------------

async def test_every_other_api_body_is_held_to_64_kib(app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1")
    key = {"x-api-key": "k1", "content-type": "application/json"}
    junk = b'{"url": "https://example.com/", "events": [' + b'"x",' * 30000 + b'"x"]}'
    assert len(junk) > 64 * 1024
    for path in ("/api/v1/endpoints", "/api/v1/endpoints/1/replay",
                 "/api/v1/deliveries/1/retry"):
        status, body, asked = await call(app, "POST", path,
                                         key | {"content-length": str(len(junk))}, [junk])
        assert (status, asked) == (413, 0), path
        assert b"65536" in body and len(body) < 200
    for path in ("/api/v1/endpoints", "/api/v1/endpoints/1/replay"):
        # Chunked: refused once 64 KiB have come, whatever follows.
        status, _, asked = await call(app, "POST", path, key, [b" " * 16384] * 100)
        assert status == 413 and asked < 10, path
    status, _, asked = await call(app, "PATCH", "/api/v1/endpoints/1",
                                  key | {"content-length": str(len(junk))}, [junk])
    assert (status, asked) == (413, 0)


async def test_a_send_may_carry_up_to_1_mib_and_an_upload_its_own_limit(
        app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1", upload_max_bytes=3_000_000)
    key = {"x-api-key": "k1", "content-type": "application/json"}
    # 900 KB of JSON is read (and answered on its merits), 1.1 MB is not.
    status, _, _ = await call(app, "POST", "/api/v1/messages", key,
                              [b"[" + b" " * 900_000 + b"]"])
    assert status not in (413, 500)
    status, _, asked = await call(app, "POST", "/api/v1/messages",
                                  key | {"content-length": "1100000"}, [b" " * 1_100_000])
    assert (status, asked) == (413, 0)
    form = {"x-api-key": "k1", "content-type": "multipart/form-data; boundary=b"}
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + b"x" * 2_000_000 + b"\r\n--b--\r\n")
    status, _, _ = await call(app, "POST", "/api/v1/images", form, [part])
    assert status != 413  # within DLR_UPLOAD_MAX_BYTES (then refused: no partner account)


async def test_a_validation_answer_lists_at_most_20_errors(app_with: AppFactory) -> None:
    app = await app_with(api_keys="k1")
    body = ('{"url": "https://example.com/", "events": ['
            + ",".join(f'"junk{i}"' for i in range(1000)) + "]}").encode()
    status, answer, _ = await call(app, "POST", "/api/v1/endpoints",
                                   {"x-api-key": "k1", "content-type": "application/json"},
                                   [body])
    assert status == 422
    detail = json.loads(answer)["detail"]
    assert 1 <= len(detail) <= 21
    assert all({"loc", "msg", "type"} <= set(item) for item in detail)
    assert len(answer) < 8192


def test_the_validation_answer_keeps_fastapi_shape_and_says_how_many_more() -> None:
    from fastapi.exceptions import RequestValidationError

    from app.main import MAX_VALIDATION_ERRORS, _validation_response

    errors = [{"loc": ("body", "events", i), "msg": "bad", "type": "literal_error",
               "input": f"junk{i}"} for i in range(500_000)]
    errors[0]["input"] = "x" * 100_000  # a long input is left out
    errors[1]["input"] = "a\ud800b"  # a lone surrogate cannot break the answer
    response = _validation_response(RequestValidationError(errors))
    assert response.status_code == 422
    detail = json.loads(bytes(response.body))["detail"]
    assert len(detail) == MAX_VALIDATION_ERRORS + 1
    assert detail[0] == {"loc": ["body", "events", 0], "msg": "bad", "type": "literal_error"}
    assert detail[1]["input"] == "a\ud800b"
    assert detail[2]["input"] == "junk2"
    assert detail[-1] == {"loc": [], "msg": f"and {500_000 - MAX_VALIDATION_ERRORS} more "
                          "errors not shown", "type": "too_many_errors"}
    assert len(response.body) < 4096
