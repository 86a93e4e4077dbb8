"""The real server, started with `dlr serve` exactly as the README says."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from app.config import Settings

from ..helpers import DLR, UUID_B, events, free_port, running_server

# Every test starts `dlr serve` as a subprocess (1.5 s to 4.5 s each).
pytestmark = pytest.mark.slow


def test_serve_migrates_a_new_sqlite_file_and_answers(tmp_path: Path) -> None:
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    with running_server(env) as (url, proc):
        r = httpx.get(f"{url}/dlr", params={"type": "delivery", "msg_id": UUID_B.upper(),
                                            "status": "delivered"})
        assert (r.status_code, r.text) == (200, "OK")
        m = httpx.get(f"{url}/api/v1/messages/{UUID_B}").json()
        assert (m["msg_id"], m["status"]) == (UUID_B.upper(), "delivered")
        assert httpx.get(f"{url}/readyz").status_code == 200
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so supervisors see the cause.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert (tmp_path / "fresh.db").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_one_error_line_and_exit_2(tmp_path: Path, workers: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")} | {
        "DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'busy.db'}"}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = subprocess.run([DLR, "serve", "--port", str(port), "--workers", workers],
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use "
        "(another dlr serve?); choose another with --port"]
    assert not (tmp_path / "busy.db").exists()  # nothing done before the port was checked


def test_forwarded_for_is_not_believed_from_loopback(tmp_path: Path) -> None:
    # uvicorn trusts X-Forwarded-For from loopback by default; the service must not.
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'xff.db'}",
           "DLR_CALLBACK_ALLOWED_IPS": "203.0.113.0/24"}
    with running_server(env) as (url, _):
        r = httpx.get(f"{url}/dlr", params={"type": "seen", "msg_id": "x"},
                      headers={"X-Forwarded-For": "203.0.113.5"})
        assert r.status_code == 403
        assert httpx.get(f"{url}/api/v1/messages/x").status_code == 404  # nothing stored


def test_two_workers_share_the_database(settings: Settings, engine: Engine) -> None:
    with running_server({"DLR_DATABASE_URL": settings.database_url}, "--workers", "2") as (
        url, _
    ):
        with httpx.Client(base_url=url) as c, ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(
                lambda i: c.post("/dlr", data={"type": "delivery", "msg_id": f"w{i % 150}",
                                               "status": "delivered"}).status_code,
                range(300)))
    assert set(answers) == {200}
    assert events(engine) == 150


def test_slow_request_heads_are_cut_off(tmp_path: Path) -> None:
    import socket
    import time

    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'slow.db'}",
           "DLR_CALLBACK_READ_TIMEOUT": "0.5"}
    with running_server(env) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as idle, \
                socket.create_connection((host, int(port))) as slow:
            slow.sendall(b"POST /dlr HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            idle.settimeout(5)
            slow.settimeout(5)
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server
            assert idle.recv(1024) == b""
            assert time.monotonic() - started < 4
        # Ordinary requests are not affected.
        assert httpx.get(f"{url}/dlr", params={"type": "seen", "msg_id": "s"}).status_code == 200


# --- connection-level limits against the real server (raw sockets: the client must be able
# to misbehave) --------------------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(5)
    return sock


def _read_response(sock: socket.socket, buffered: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response off the socket (status, lower-case headers, body); later bytes stay in
    `buffered`."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response head: {bytes(buffered)!r}"
        buffered += chunk
    head, _, _ = bytes(buffered).partition(b"\r\n\r\n")
    del buffered[:len(head) + 4]
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(buffered) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        buffered += chunk
    body = bytes(buffered[:length])
    del buffered[:length]
    return int(status_line.split()[1]), headers, body


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (waits up to the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'conn.db'}"} | {
        f"DLR_{k.upper()}": v for k, v in values.items()}


def test_request_heads_over_16_kib_get_431_and_a_closed_connection(tmp_path: Path) -> None:
    big = 20 * 1024
    heads = {
        "one big header": b"GET /dlr HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * big + b"\r\n\r\n",
        "a long URL": b"GET /dlr?x=" + b"a" * big + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "many headers": b"GET /dlr HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(500)) + b"\r\n",
        "an unfinished head": b"GET /dlr HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * big,
    }
    with running_server(_env(tmp_path)) as (url, _):
        for name, head in heads.items():
            with _connect(url) as sock:
                sock.sendall(head)
                status, headers, _ = _read_response(sock, bytearray())
                assert (status, headers.get("connection")) == (431, "close"), name
                assert _closed_by_server(sock), name
        # A head just under the limit is served as before.
        ok = httpx.get(f"{url}/dlr", params={"type": "seen", "msg_id": "h"},
                       headers={"X-Big": "a" * (15 * 1024)})
        assert ok.status_code == 200


def test_an_endless_header_is_cut_off_early(tmp_path: Path) -> None:
    # The reported attack: a 57 MB header was read whole. The server must stop reading it:
    # the client can then only fill the kernel's buffers (a few MiB at most) before its
    # writes fail or the answer arrives.
    limit = 32 * 1024 * 1024
    with running_server(_env(tmp_path)) as (url, _), _connect(url) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.sendall(b"GET /dlr HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < limit and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"a" * 65536)
                sent += 65536
        assert sent < limit
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(65536).startswith(b"HTTP/1.1 431 ")


def test_pipelining_does_not_bypass_the_head_deadline(tmp_path: Path) -> None:
    with running_server(_env(tmp_path, callback_read_timeout="0.5")) as (url, _), \
            _connect(url) as pipelined:
        # A whole request, and behind it the start of the next head, in one write.
        pipelined.sendall(b"GET /dlr?type=seen&msg_id=p1 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /dlr?type=seen&msg_id=p2 HTTP/1.1\r\nHo")
        assert _read_response(pipelined, bytearray())[0] == 200
        # Connected only now: an idle connection's head deadline runs from its connect, and
        # a fresh server's first commit can take longer than the 0.5 s.
        with _connect(url) as blank_lines:
            blank_lines.sendall(b"GET /dlr?type=seen&msg_id=p3 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(blank_lines, bytearray())[0] == 200
            # Then a byte every 0.2 s, each well inside the deadline, for up to 20 deadlines.
            open_ones = {"pipelined": pipelined, "blank_lines": blank_lines}
            trickle = {"pipelined": b"x", "blank_lines": b"\r\n"}
            for _ in range(50):
                time.sleep(0.2)
                for name, sock in list(open_ones.items()):
                    try:
                        sock.sendall(trickle[name])
                    except (BrokenPipeError, ConnectionResetError):
                        del open_ones[name]
                if not open_ones:
                    break
            assert not open_ones, f"still open after 10 s: {sorted(open_ones)}"


def test_answers_sent_before_the_body_is_in_close_the_connection(tmp_path: Path) -> None:
    env = _env(tmp_path, callback_token="s3cret", callback_read_timeout="1",
               max_callback_bytes="2048")
    partial = b"type=seen&msg_id=early"  # of a body announced as 1000 bytes
    cases = {
        403: b"POST /dlr HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + partial,
        413: b"POST /dlr?token=s3cret HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
             + partial,
        405: b"PUT /dlr HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + partial,
        408: b"POST /dlr?token=s3cret HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
             + partial,  # and the rest never comes
    }
    with running_server(env) as (url, _):
        for expected, request in cases.items():
            with _connect(url) as sock:
                sock.sendall(request)
                status, headers, _ = _read_response(sock, bytearray())
                assert (status, headers.get("connection")) == (expected, "close")
                assert _closed_by_server(sock), expected
        # A request sent whole keeps its connection, even when it is refused.
        with _connect(url) as sock:
            buffered = bytearray()
            body = b"type=seen&msg_id=whole"
            for _ in range(2):
                sock.sendall(b"POST /dlr HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                status, headers, _ = _read_response(sock, buffered)
                assert (status, headers.get("connection")) == (403, None)


def test_a_client_that_keeps_sending_after_a_refusal_is_cut_off(tmp_path: Path) -> None:
    # After an early answer the server drops the rest of the body for a short while (so that
    # the answer is not destroyed by a reset), then closes even if the client goes on.
    with running_server(_env(tmp_path, max_callback_bytes="2048")) as (url, _), \
            _connect(url) as sock:
        sock.sendall(b"POST /dlr HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        status, headers, _ = _read_response(sock, bytearray())
        assert (status, headers.get("connection")) == (413, "close")
        cut_off = False
        for _ in range(100):  # 10 s of a byte every 0.1 s
            time.sleep(0.1)
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
                break
        assert cut_off


def test_a_callback_body_sent_in_parts_within_the_deadline_is_stored(tmp_path: Path) -> None:
    # A body that is not all in when the route starts is read under the deadline (a whole
    # one is read without it: app/ops/http_protocol.py's body_received).
    env = _env(tmp_path, callback_read_timeout="2")
    body = b"type=seen&msg_id=in-parts"
    with running_server(env) as (url, _), _connect(url) as sock:
        sock.sendall(b"POST /dlr HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body[:10]))
        time.sleep(0.5)
        sock.sendall(body[10:])
        status, _, answer = _read_response(sock, bytearray())
        assert (status, answer) == (200, b"OK")
        stored = httpx.get(f"{url}/api/v1/messages/in-parts")
    assert stored.status_code == 200 and stored.json()["status"] == "seen"


class _Recording:
    """A transport that records each write (one write: one system call)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.writes.append(b"<closed>")


def _cycle(method: str, transport: _Recording) -> Any:
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    from app.ops.http_protocol import _sending

    cycle = RequestResponseCycle(
        scope={"type": "http", "method": method, "http_version": "1.1", "headers": [],
               "path": "/", "query_string": b"", "client": None, "server": None},
        transport=transport, flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"), access_log=False, default_headers=[],
        message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
        on_response=lambda: None)
    cycle.more_body = False  # the request is all in
    cycle.send = _sending(cycle, lambda: None, None)  # type: ignore[method-assign,assignment]
    return cycle


async def test_a_short_answer_goes_out_in_one_write_head_and_body_together() -> None:
    transport = _Recording()
    cycle = _cycle("GET", transport)
    await cycle.send({"type": "http.response.start", "status": 200,
                      "headers": [(b"content-length", b"2")]})
    assert transport.writes == []  # the head waits for the body...
    await cycle.send({"type": "http.response.body", "body": b"OK"})
    assert len(transport.writes) == 1  # ...and goes out with it
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\nOK")
    assert cycle.transport is transport and cycle.response_complete


async def test_answers_without_a_body_to_join_are_written_as_before() -> None:
    # HEAD: uvicorn writes no body, so the head must not wait for one.
    head = _Recording()
    cycle = _cycle("HEAD", head)
    await cycle.send({"type": "http.response.start", "status": 200,
                      "headers": [(b"content-length", b"2")]})
    await cycle.send({"type": "http.response.body", "body": b"OK"})
    assert len(head.writes) == 1 and head.writes[0].endswith(b"\r\n\r\n")
    # A streamed answer (no length): the head, then each chunk, as uvicorn writes them.
    streamed = _Recording()
    cycle = _cycle("GET", streamed)
    await cycle.send({"type": "http.response.start", "status": 200, "headers": []})
    await cycle.send({"type": "http.response.body", "body": b"a", "more_body": True})
    await cycle.send({"type": "http.response.body", "body": b""})
    assert [w[:9] for w in streamed.writes] == [b"HTTP/1.1 ", b"1\r\na\r\n", b"0\r\n\r\n"]
    # A transport used between head and body (here: closed) gets the head first.
    closed = _Recording()
    cycle = _cycle("GET", closed)
    await cycle.send({"type": "http.response.start", "status": 200,
                      "headers": [(b"content-length", b"2")]})
    cycle.transport.close()
    assert closed.writes[0].startswith(b"HTTP/1.1 200") and closed.writes[1] == b"<closed>"
