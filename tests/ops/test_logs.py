"""No callback token in the logs or in what the rejected archive keeps, however it is spelled."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from app.ops.logs import (
    AccessLog,
    BufferedStreamHandler,
    RedactTokens,
    TextFormatter,
    redact,
    redact_query,
)

from ..helpers import running_server

SPELLINGS = [b"token", b"tok%65n", b"TOKEN", b"%74%6F%6B%65%6E", b"To%4Ben"]


@pytest.mark.parametrize("key", SPELLINGS)
def test_redact_query_masks_every_spelling_of_token(key: bytes) -> None:
    data = b"type=bogus&" + key + b"=SECRET&msg_id=x"
    masked = redact_query(data)
    assert masked == b"type=bogus&" + key + b"=***&msg_id=x"
    # The receiver's own reading of the masked bytes finds no secret under any key.
    assert "SECRET" not in str(parse_qsl(masked.decode()))


def test_redact_query_keeps_everything_else_byte_for_byte() -> None:
    data = b"msg_id=%FF%00\xfe&text=a+b%26c&tokens=keep&my_token=keep&tok%2565n=keep&x&&=v"
    assert redact_query(data) == data
    assert redact_query(b"") == b""
    assert redact_query(b"\xff\xfe=token") == b"\xff\xfe=token"


def test_redact_query_masks_repeated_and_empty_tokens() -> None:
    assert redact_query(b"token=a&token=b&token=") == b"token=***&token=***&token=***"
    assert redact_query(b"token") == b"token"  # a key without a value carries no secret


@pytest.mark.parametrize("line", [
    '127.0.0.1:5000 - "GET /dlr?type=seen&tok%65n=SECRET&msg_id=x HTTP/1.1" 200',
    '127.0.0.1:5000 - "GET /dlr?TOKEN=SECRET HTTP/1.1" 403',
    '127.0.0.1:5000 - "GET /dlr/SECRET?type=seen HTTP/1.1" 200',
    # The router matches the decoded path: every spelling of /dlr/ carries the token.
    '127.0.0.1:5000 - "GET /%64lr/SECRET HTTP/1.1" 200',
    '127.0.0.1:5000 - "GET /dl%72/SECRET HTTP/1.1" 200',
    '127.0.0.1:5000 - "POST /%44%4C%52/SECRET HTTP/1.1" 200',
    '127.0.0.1:5000 - "GET /D%6cR/SECRET?type=seen HTTP/1.1" 200',
    '127.0.0.1:5000 - "GET /dlr%2FSECRET HTTP/1.1" 200',
    '127.0.0.1:5000 - "GET /dlr?a=b?token=SEC?RET HTTP/1.1" 200',
    "query was token=SECRET&type=seen",
])
def test_log_lines_never_show_the_token(line: str) -> None:
    out = redact(line)
    assert "SECRET" not in out and "SEC" not in out
    assert "***" in out


def test_log_lines_keep_other_parameters() -> None:
    line = '127.0.0.1:5000 - "GET /dlr?type=seen&msg_id=x&tokens=1 HTTP/1.1" 200'
    assert redact(line) == line


def test_the_access_log_filter_masks_its_arguments() -> None:
    # uvicorn's access log passes the path with its query as an argument, not in the message.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactTokens())
    logger = logging.getLogger("test_logs.access")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                       "/dlr?type=seen&t%6Fken=SECRET", "1.1", 200)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == '127.0.0.1:5000 - "GET /dlr?type=seen&t%6Fken=*** HTTP/1.1" 200\n'


def test_the_access_line_masks_every_spelling_of_the_token_path() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream)
    access = AccessLog(handler, TextFormatter())
    for path in ("/%64lr/SECRET", "/dl%72/SECRET?type=seen", "/DL%52/SECRET"):
        access.write("127.0.0.1:5000", "GET", path, "1.1", 200)
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and not any("SECRET" in line for line in lines)
    assert lines[1].endswith('"GET /dl%72/***?type=seen HTTP/1.1" 200')


def _serve_and_log(tmp_path: Any, log_format: str) -> list[str]:
    """Requests to a real `dlr serve` with its default access log; the lines it wrote."""
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'logs.db'}",
           "DLR_CALLBACK_TOKEN": "SECRET-TOKEN"}
    with running_server(env, "--log-level", "info", "--log-format", log_format) as (url, proc):
        with httpx.Client(base_url=url) as c:
            assert c.get("/healthz").status_code == 200
            assert c.post("/dlr/SECRET-TOKEN", data={"type": "seen", "msg_id": "m1"}
                          ).status_code == 200
            for n, path in enumerate(("/%64lr/SECRET-TOKEN", "/dl%72/SECRET-TOKEN")):
                r = c.get(httpx.URL(url + path, params={"type": "seen", "msg_id": f"e{n}"}))
                assert r.status_code == 200  # routed: the token is right
            assert c.get("/dlr?type=seen&msg_id=m2&tok%65n=SECRET-TOKEN").status_code == 200
            assert c.get("/dlr?type=seen&msg_id=m3&token=WRONG-SECRET").status_code == 403
            assert c.get("/api/v1/messages/nope").status_code == 404
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        lines = proc.stdout.read().decode().splitlines()
    # uvicorn's last line comes just before it kills the process with the signal it caught:
    # nothing logged, up to the very end, waits in the buffer and dies with it.
    assert "Finished server process" in lines[-1]
    return lines


EXPECTED_ACCESS = [  # (request line as logged, status); tokens masked
    ("GET /healthz HTTP/1.1", 200),
    ("POST /dlr/*** HTTP/1.1", 200),
    ("GET /%64lr/***?type=seen&msg_id=e0 HTTP/1.1", 200),
    ("GET /dl%72/***?type=seen&msg_id=e1 HTTP/1.1", 200),
    ("GET /dlr?type=seen&msg_id=m2&tok%65n=*** HTTP/1.1", 200),
    ("GET /dlr?type=seen&msg_id=m3&token=*** HTTP/1.1", 403),
    ("GET /api/v1/messages/nope HTTP/1.1", 404),
]


def _requests(messages: list[str]) -> list[tuple[str, int]]:
    """(request line, status) of each access message after those of the start-up probe."""
    logged = [(m.split('"')[1], int(m.rsplit(" ", 1)[1])) for m in messages]
    probes = len(logged) - len(EXPECTED_ACCESS)
    assert probes >= 1 and set(logged[:probes]) == {("GET /healthz HTTP/1.1", 200)}
    return logged[probes:]


@pytest.mark.slow
def test_the_server_writes_an_access_line_per_request_with_tokens_masked(tmp_path: Any
                                                                         ) -> None:
    lines = _serve_and_log(tmp_path, "text")
    access = [line for line in lines if " INFO uvicorn.access: " in line]
    assert _requests([line.split(": ", 1)[1] for line in access]) == EXPECTED_ACCESS
    # time, level, logger, then uvicorn's own line: client - "request" status
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn\.access: "
                            r'127\.0\.0\.1:\d+ - ".+" \d{3}', line) for line in access)
    assert not any("SECRET-TOKEN" in line or "WRONG-SECRET" in line for line in lines)


@pytest.mark.slow
def test_json_access_lines_are_objects_with_tokens_masked(tmp_path: Any) -> None:
    lines = _serve_and_log(tmp_path, "json")
    docs = [json.loads(line) for line in lines if line.startswith("{")]
    access = [d for d in docs if d["logger"] == "uvicorn.access"]
    assert _requests([d["message"] for d in access]) == EXPECTED_ACCESS
    assert {d["level"] for d in access} == {"info"}
    assert all(datetime.fromisoformat(d["time"]).tzinfo is not None for d in access)
    assert not any("SECRET-TOKEN" in line or "WRONG-SECRET" in line for line in lines)
