"""The shipped HTTP protocol (app/ops/http_protocol.py) in a real uvicorn server, in a thread
of the test process, talked to over raw sockets (the client must be able to misbehave).

The server serves a small ASGI app of the test's own; the head deadline comes from settings
with a short DLR_CALLBACK_READ_TIMEOUT (the protocol reads `get_settings()`, patched here).
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import uvicorn

from app.config import load_settings
from app.ops import http_protocol
from app.ops.http_protocol import HEAD_LIMIT, HeaderTimeoutProtocol, body_received

from ..helpers import free_port

# The head deadline most tests run with, and how late a close may come on a busy machine.
DEADLINE = 0.5
MARGIN = 1.0


class _App:
    """The routes the tests need, as a bare ASGI app.

    /hello     200 "hello" (fixed length)
    /stream    200, two chunks (no length)
    /slow?S    200 after S seconds
    /echo      reads the whole body; answers "<body_received at the start> <body length>"
    /too-large?N 413 without reading the body, N bytes of answer
    /forbidden?N 403 without reading the body, N bytes of answer
    """

    def __init__(self) -> None:
        self.echo_started = threading.Event()  # /echo has looked at body_received

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd"})
            return
        if path == "/slow":
            await asyncio.sleep(float(scope["query_string"]))
            await _answer(send, 200, b"slow")
        elif path == "/echo":
            received = body_received(scope)
            self.echo_started.set()
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            await _answer(send, 200, b"%s %d" % (str(received).encode(), len(body)))
        elif path in ("/too-large", "/forbidden"):
            size = int(scope["query_string"] or b"0")
            await _answer(send, 413 if path == "/too-large" else 403, b"n" * size)
        else:
            await _answer(send, 200, b"hello")


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def app() -> _App:
    return _App()


@pytest.fixture
def serve(app: _App, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., int]]:
    """`serve(deadline=DEADLINE) -> port`: uvicorn with HeaderTimeoutProtocol, in a thread,
    with the given head deadline; stopped after the test."""

    with ExitStack() as stack:

        def start(deadline: float = DEADLINE) -> int:
            settings = load_settings(_env_file=None, callback_read_timeout=deadline)
            monkeypatch.setattr(http_protocol, "get_settings", lambda: settings)
            return stack.enter_context(_running(app))

        yield start


@contextmanager
def _running(app: _App) -> Iterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(),  # type: ignore[arg-type]
                            http=HeaderTimeoutProtocol, log_level="warning", lifespan="off",
                            proxy_headers=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.005)
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server did not stop"


# --- a raw HTTP/1.1 client ------------------------------------------------------------------


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    return sock


def _read_response(sock: socket.socket, buffered: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response off the socket (status, lower-case headers, body); later bytes stay in
    `buffered`. Fixed-length and chunked bodies."""
    head = _read_until(sock, buffered, b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(_read_until(sock, buffered, b"\r\n"), 16):
            body += _read_exactly(sock, buffered, size)
            assert _read_exactly(sock, buffered, 2) == b"\r\n"
        assert _read_until(sock, buffered, b"\r\n") == b""  # no trailers
    else:
        body = _read_exactly(sock, buffered, int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def _read_until(sock: socket.socket, buffered: bytearray, end: bytes) -> bytes:
    while end not in buffered:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {end!r}: {bytes(buffered)!r}"
        buffered += chunk
    found, _, _ = bytes(buffered).partition(end)
    del buffered[:len(found) + len(end)]
    return found


def _read_exactly(sock: socket.socket, buffered: bytearray, size: int) -> bytes:
    while len(buffered) < size:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        buffered += chunk
    data = bytes(buffered[:size])
    del buffered[:size]
    return data


def _seconds_until_closed(sock: socket.socket, since: float) -> float:
    """Seconds from `since` until the server closes the connection (it must, within the
    socket's timeout, and send nothing before)."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        data = b""
    except TimeoutError:
        pytest.fail("the server kept the connection open")
    assert data == b"", f"unexpected bytes instead of a close: {data!r}"
    return time.monotonic() - since


def _get(path: bytes = b"/hello", *headers: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, b"".join(h + b"\r\n" for h in headers))


def _post(path: bytes, body: bytes, length: int | None = None) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (path, len(body) if length is None else length, body))


# --- the head size ------------------------------------------------------------------------

BIG = b"a" * (20 * 1024)
OVER_LIMIT = {
    "one big header": _get(b"/hello", b"X-Big: " + BIG),
    "a long URL": _get(b"/hello?x=" + BIG),
    "many headers": _get(b"/hello", *(b"X-H%d: %s" % (i, b"v" * 40) for i in range(500))),
    "an unfinished head": b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + BIG,
}


def _send_in_chunks(sock: socket.socket, data: bytes, size: int) -> None:
    """Send `data` in writes of `size` bytes, apart in time so that each arrives alone."""
    for start in range(0, len(data), size):
        sock.sendall(data[start:start + size])
        time.sleep(0.01)


@pytest.mark.parametrize("sent", ["at once", "in 4 KiB chunks"])
@pytest.mark.parametrize("name", OVER_LIMIT)
def test_a_head_over_16_kib_gets_431_and_the_connection_is_closed(
        serve: Callable[..., int], name: str, sent: str) -> None:
    with _connect(serve()) as sock:
        if sent == "at once":
            sock.sendall(OVER_LIMIT[name])
        else:
            _send_in_chunks(sock, OVER_LIMIT[name], 4096)
        status, headers, body = _read_response(sock, bytearray())
        assert (status, headers.get("connection")) == (431, "close")
        assert body == b"Request head over %d bytes" % HEAD_LIMIT
        assert _seconds_until_closed(sock, time.monotonic()) < MARGIN


@pytest.mark.parametrize("sent", ["at once", "in 4 KiB chunks"])
def test_a_head_of_15_kib_is_served(serve: Callable[..., int], sent: str) -> None:
    request = _get(b"/hello", b"X-Big: " + b"a" * (15 * 1024))
    assert len(request) < HEAD_LIMIT
    with _connect(serve()) as sock:
        if sent == "at once":
            sock.sendall(request)
        else:
            _send_in_chunks(sock, request, 4096)
        status, headers, body = _read_response(sock, bytearray())
        assert (status, body, headers.get("connection")) == (200, b"hello", None)
        # and the connection stays usable
        sock.sendall(_get())
        assert _read_response(sock, bytearray())[:3:2] == (200, b"hello")


def test_a_big_head_pipelined_behind_a_request_is_refused_after_that_request_is_answered(
        serve: Callable[..., int]) -> None:
    with _connect(serve()) as sock:
        sock.sendall(_get() + OVER_LIMIT["one big header"])
        buffered = bytearray()
        assert _read_response(sock, buffered)[::2] == (200, b"hello")
        assert _read_response(sock, buffered)[0] == 431
        assert _seconds_until_closed(sock, time.monotonic()) < MARGIN


# --- the head deadline ----------------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"", b"POST /echo HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half a head"])
def test_a_connection_without_a_whole_head_is_closed_at_the_deadline(
        serve: Callable[..., int], sent: bytes) -> None:
    port = serve()
    started = time.monotonic()
    with _connect(port) as sock:
        sock.sendall(sent)
        assert DEADLINE * 0.9 <= _seconds_until_closed(sock, started) < DEADLINE + MARGIN


def test_a_head_trickled_a_byte_at_a_time_does_not_extend_its_deadline(
        serve: Callable[..., int]) -> None:
    port = serve()
    started = time.monotonic()
    with _connect(port) as sock:
        closed = False
        for byte in _get(b"/hello", b"X-Slow: " + b"s" * 100):  # 10 s at a byte per 0.1 s
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([sock], [], [], 0.1)[0]:  # readable: closed (or answered)
                break
        if not closed:
            _seconds_until_closed(sock, started)
        assert DEADLINE * 0.9 <= time.monotonic() - started < DEADLINE + MARGIN


def test_a_head_pipelined_behind_an_answered_request_has_a_deadline(
        serve: Callable[..., int]) -> None:
    with _connect(serve()) as sock:
        # A whole request and the start of the next head, in one write.
        sock.sendall(_get() + b"GET /hello HTTP/1.1\r\nHo")
        assert _read_response(sock, bytearray())[::2] == (200, b"hello")
        answered = time.monotonic()
        assert _seconds_until_closed(sock, answered) < DEADLINE + MARGIN


def test_a_next_head_gets_its_own_deadline_counted_from_its_first_byte(
        serve: Callable[..., int]) -> None:
    with _connect(serve()) as sock:
        sock.sendall(_get())
        assert _read_response(sock, bytearray())[0] == 200
        # Idle past the deadline between requests: keep-alive, not the head deadline.
        time.sleep(DEADLINE * 0.6)
        sock.sendall(b"GET /hello HTTP/1.1\r\n")  # and never the rest
        began = time.monotonic()
        elapsed = _seconds_until_closed(sock, began)
        assert DEADLINE * 0.9 <= elapsed < DEADLINE + MARGIN


def test_idle_keep_alive_between_requests_is_not_cut_by_the_head_deadline(
        serve: Callable[..., int]) -> None:
    with _connect(serve()) as sock:
        buffered = bytearray()
        sock.sendall(_get())
        assert _read_response(sock, buffered)[0] == 200
        time.sleep(DEADLINE * 1.4)
        sock.sendall(_get())
        assert _read_response(sock, buffered)[::2] == (200, b"hello")


def test_the_wait_for_an_answer_does_not_count_against_the_next_heads_deadline(
        serve: Callable[..., int]) -> None:
    # Request 1 takes longer than the deadline to answer; request 2's head began behind it,
    # in the same write, and is completed shortly after the answer: it is served.
    deadline = 0.4
    with _connect(serve(deadline)) as sock:
        buffered = bytearray()
        sock.sendall(_get(b"/slow?%.1f" % (deadline + 0.2)) + b"GET /hello HTTP/1.1\r\n")
        assert _read_response(sock, buffered)[::2] == (200, b"slow")
        time.sleep(0.1)
        sock.sendall(b"Host: x\r\n\r\n")
        assert _read_response(sock, buffered)[::2] == (200, b"hello")


# --- answers given before the body is in ----------------------------------------------------

@pytest.mark.parametrize(("path", "status"), [(b"/too-large", 413), (b"/forbidden", 403)])
def test_an_answer_before_the_body_is_in_closes_gently(
        serve: Callable[..., int], path: bytes, status: int) -> None:
    # A long answer to a client with a small receive buffer: most of the answer still waits
    # in the server's send queue when the client goes on sending its body. A server that
    # closed outright would leave those body bytes unread, and closing with unread bytes
    # sends a reset that throws away the rest of the answer.
    size = 256 * 1024
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    with sock:
        sock.connect(("127.0.0.1", serve()))
        sock.sendall(_post(b"%s?%d" % (path, size), b"x" * 10_000, length=1_000_000))
        assert select.select([sock], [], [], 5)[0], "no answer"
        for _ in range(5):
            sock.sendall(b"x" * 10_000)
        time.sleep(0.1)  # time for a server that closes outright to have done so
        status_got, headers, body = _read_response(sock, bytearray())
        assert (status_got, headers.get("connection")) == (status, "close")
        assert len(body) == size
        # Then the server's end is closed (half-closed: nothing more comes).
        assert _seconds_until_closed(sock, time.monotonic()) < MARGIN


def test_a_client_that_keeps_sending_after_an_early_answer_is_cut_off_after_linger(
        serve: Callable[..., int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_protocol, "LINGER", 0.3)
    with _connect(serve()) as sock:
        sock.sendall(_post(b"/too-large", b"", length=1_000_000))
        status, headers, _ = _read_response(sock, bytearray())
        assert (status, headers.get("connection")) == (413, "close")
        answered = time.monotonic()
        cut_off = False
        while not cut_off and time.monotonic() - answered < 0.3 + MARGIN:
            time.sleep(0.02)
            try:
                sock.sendall(b"x" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
        assert cut_off


@pytest.mark.parametrize(("path", "status"), [(b"/too-large", 413), (b"/forbidden", 403)])
def test_a_refused_request_sent_whole_keeps_its_connection(
        serve: Callable[..., int], path: bytes, status: int) -> None:
    with _connect(serve()) as sock:
        buffered = bytearray()
        for _ in range(2):
            sock.sendall(_post(path, b"type=seen&msg_id=whole"))
            status_got, headers, _ = _read_response(sock, buffered)
            assert (status_got, headers.get("connection")) == (status, None)
        sock.sendall(_get())
        assert _read_response(sock, buffered)[::2] == (200, b"hello")


# --- answers ---------------------------------------------------------------------------------

def test_answers_are_byte_correct(serve: Callable[..., int]) -> None:
    # A fixed-length answer (head and body written together), the same answer to HEAD
    # (no body to wait for) and a streamed one, in order on one connection.
    with _connect(serve()) as sock:
        sock.sendall(_get() + b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n" + _get(b"/stream"))
        status_line = b"HTTP/1.1 200 OK\r\n"
        # uvicorn adds date and server headers between the status line and the app's own.
        tails = [b"content-type: text/plain\r\ncontent-length: 5\r\n\r\nhello",
                 b"content-type: text/plain\r\ncontent-length: 5\r\n\r\n",
                 b"transfer-encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"]
        got = b""
        while not got.endswith(tails[-1]):
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        answers = [status_line + part for part in got.split(status_line)[1:]]
        assert len(answers) == len(tails) and got.startswith(status_line)
        for answer, tail in zip(answers, tails, strict=True):
            assert answer.endswith(tail)


# --- body_received --------------------------------------------------------------------------

def test_body_received_is_true_when_the_body_came_with_the_head(
        serve: Callable[..., int]) -> None:
    with _connect(serve()) as sock:
        buffered = bytearray()
        sock.sendall(_post(b"/echo", b"type=seen&msg_id=whole"))
        assert _read_response(sock, buffered)[::2] == (200, b"True 22")
        sock.sendall(_get(b"/echo"))  # no body at all: it is all in too
        assert _read_response(sock, buffered)[::2] == (200, b"True 0")


def test_body_received_is_false_when_the_body_comes_later(
        serve: Callable[..., int], app: _App) -> None:
    with _connect(serve()) as sock:
        sock.sendall(_post(b"/echo", b"type=seen", length=22))
        assert app.echo_started.wait(5)
        sock.sendall(b"&msg_id=later")
        assert _read_response(sock, bytearray())[::2] == (200, b"False 22")
