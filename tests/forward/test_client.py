"""Forwarding's HTTP client (app/forward/client.py) against a receiver of the test's own: an
HTTP/1.1 server on loopback, in the test's event loop, that keeps connections alive and
counts what it accepts and answers (plain TCP or TLS with a certificate from a test CA)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import h11
import pytest
import trustme

from app.core.targets import RefusedAddress
from app.forward import client as client_module
from app.forward.client import MAX_BODY_READ, USER_AGENT, ClientError, Target, WebhookClient


@dataclass
class Request:
    connection: int  # which accepted connection (1, 2, ...) it came on
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    delay: float = 0.0
    drop: bool = False  # close the connection instead of answering
    close_after: bool = False  # close the connection once answered (it said keep-alive)


class Receiver:
    """An HTTP/1.1 server that keeps connections alive. `answer(request) -> Answer` decides
    each answer; `arrived` is every request read whole, `answered` those answered."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.answer: Callable[[Request], Answer] = lambda request: Answer()
        self.connections = 0
        self.closed = 0  # connections whose client end closed (or reset) them
        self.arrived: list[Request] = []
        self.answered: list[Request] = []
        self.port = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def open(self) -> int:
        """Connections it has not closed yet."""
        return len(self._handlers)

    @property
    def bodies(self) -> list[bytes]:
        return [r.body for r in self.answered]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()  # each handler then sees its connection end, and returns
        await asyncio.wait_for(asyncio.gather(*self._handlers), 5)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 2.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    got = Request(number, request.target,
                                  {bytes(k): bytes(v) for k, v in request.headers}, body)
                    self.arrived.append(got)
                    answer = self.answer(got)
                    if answer.drop:
                        break
                    await asyncio.sleep(answer.delay)
                    writer.write(conn.send(h11.Response(status_code=answer.status, headers=[
                        (b"content-length", b"%d" % len(answer.body)), *answer.headers])))
                    writer.write(conn.send(h11.Data(data=answer.body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    self.answered.append(got)
                    await self._notify()
                    if answer.close_after:
                        break
                    conn.start_next_cycle()
                else:  # ConnectionClosed: the client closed it
                    self.closed += 1
                    break
        except (ConnectionError, h11.RemoteProtocolError):
            self.closed += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self._handlers.discard(task)
            self._writers.discard(writer)
            await self._notify()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def client() -> AsyncIterator[WebhookClient]:
    c = WebhookClient()
    yield c
    await c.aclose()


HEADERS = [(b"content-type", b"application/json"), (b"webhook-id", b"msg_1")]


# --- keep-alive ---------------------------------------------------------------------------

async def test_sequential_posts_to_one_origin_share_one_connection(
        receiver: Receiver, client: WebhookClient) -> None:
    target = Target.parse(receiver.url("/hook?lane=a"))
    for i in range(3):
        assert await client.post(target, b'{"n": %d}' % i, HEADERS) == (200, b"ok")
    assert receiver.connections == 1
    assert receiver.bodies == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    first = receiver.answered[0]
    assert first.target == b"/hook?lane=a"
    assert first.headers[b"host"] == b"127.0.0.1:%d" % receiver.port
    assert first.headers[b"user-agent"] == USER_AGENT
    assert first.headers[b"content-length"] == b"8"
    assert first.headers[b"webhook-id"] == b"msg_1"


async def test_concurrent_posts_do_not_share_a_busy_connection(
        receiver: Receiver, client: WebhookClient) -> None:
    receiver.answer = lambda request: Answer(body=request.body, delay=0.05)
    target = Target.parse(receiver.url())
    answers = await asyncio.gather(*(client.post(target, b"p%d" % i, HEADERS) for i in range(2)))
    assert answers == [(200, b"p0"), (200, b"p1")]  # each its own answer
    assert receiver.connections == 2
    # Both are kept; the next posts reuse them rather than connecting again.
    await asyncio.gather(*(client.post(target, b"q%d" % i, HEADERS) for i in range(2)))
    assert receiver.connections == 2


async def test_a_connection_the_receiver_closed_while_idle_is_not_used(
        receiver: Receiver, client: WebhookClient) -> None:
    receiver.answer = lambda request: Answer(close_after=True)
    target = Target.parse(receiver.url())
    assert await client.post(target, b"one", HEADERS) == (200, b"ok")
    await receiver.wait_until(lambda: receiver.open == 0)  # it has closed its end
    await asyncio.sleep(0.01)  # and the client's loop has seen the close
    receiver.answer = lambda request: Answer()
    assert await client.post(target, b"two", HEADERS) == (200, b"ok")
    assert receiver.connections == 2
    assert [(r.connection, r.body) for r in receiver.arrived] == [(1, b"one"), (2, b"two")]


async def test_a_kept_connection_closed_as_the_post_goes_out_is_retried_once_on_a_new_one(
        receiver: Receiver, client: WebhookClient) -> None:
    # The receiver closes a kept-alive connection just as the next post arrives (its idle
    # timeout raced the post): nothing was answered, so the post is sent again, once, on a
    # new connection, and the caller sees that answer.
    receiver.answer = lambda request: Answer(
        drop=request.connection == 1 and request.body == b"two", body=request.body)
    target = Target.parse(receiver.url())
    assert await client.post(target, b"one", HEADERS) == (200, b"one")
    assert await client.post(target, b"two", HEADERS) == (200, b"two")
    assert receiver.connections == 2
    assert [(r.connection, r.body) for r in receiver.answered] == [(1, b"one"), (2, b"two")]
    # The new connection is kept for the next post.
    assert await client.post(target, b"three", HEADERS) == (200, b"three")
    assert receiver.connections == 2


async def test_a_new_connection_closed_without_an_answer_is_an_error_not_retried(
        receiver: Receiver, client: WebhookClient) -> None:
    receiver.answer = lambda request: Answer(drop=request.body != b"one")
    target = Target.parse(receiver.url())
    with pytest.raises(ClientError):
        await client.post(target, b"first", HEADERS)  # on a fresh connection
    assert len(receiver.arrived) == 1
    # On a kept connection: retried once on a new one, then given up.
    assert await client.post(target, b"one", HEADERS) == (200, b"ok")
    with pytest.raises(ClientError):
        await client.post(target, b"two", HEADERS)
    assert [(r.connection, r.body) for r in receiver.arrived] == [
        (1, b"first"), (2, b"one"), (2, b"two"), (3, b"two")]


async def test_a_receiver_that_closes_without_answering_is_reported_as_such(
        receiver: Receiver, client: WebhookClient) -> None:
    receiver.answer = lambda request: Answer(drop=True)
    with pytest.raises(ClientError) as raised:
        await client.post(Target.parse(receiver.url()), b"first", HEADERS)
    assert str(raised.value) == "the server closed the connection without answering"


# --- what is read of an answer -------------------------------------------------------------

async def test_an_answer_over_the_cap_is_cut_short_and_its_connection_closed(
        receiver: Receiver, client: WebhookClient) -> None:
    big = bytes(range(256)) * (4 * MAX_BODY_READ // 256)
    receiver.answer = lambda request: Answer(status=507, body=big)
    target = Target.parse(receiver.url())
    assert await client.post(target, b"one", HEADERS, keep=100) == (507, big[:100])
    # The client closed that connection rather than read the rest of the answer...
    await receiver.wait_until(lambda: receiver.closed == 1)
    # ...and the next post goes out on a new one.
    receiver.answer = lambda request: Answer()
    assert await client.post(target, b"two", HEADERS) == (200, b"ok")
    assert receiver.connections == 2


async def test_an_answer_under_the_cap_is_read_whole_and_its_connection_kept(
        receiver: Receiver, client: WebhookClient) -> None:
    body = b"x" * (MAX_BODY_READ - 1)
    receiver.answer = lambda request: Answer(body=body)
    target = Target.parse(receiver.url())
    assert await client.post(target, b"one", HEADERS, keep=len(body)) == (200, body)
    assert await client.post(target, b"two", HEADERS, keep=10) == (200, body[:10])
    assert receiver.connections == 1 and receiver.closed == 0


async def test_a_redirect_is_returned_not_followed(
        receiver: Receiver, client: WebhookClient) -> None:
    elsewhere = Receiver()
    await elsewhere.start()
    try:
        receiver.answer = lambda request: Answer(
            status=302, body=b"moved", headers=[(b"location", elsewhere.url().encode())])
        assert await client.post(Target.parse(receiver.url()), b"one", HEADERS) == (302, b"moved")
        assert [r.body for r in receiver.arrived] == [b"one"]
        assert elsewhere.connections == 0
    finally:
        await elsewhere.stop()


# --- TLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def _tls_receiver(ca: trustme.CA, *names: str) -> AsyncIterator[Receiver]:
    """A receiver serving TLS with a certificate from `ca` for `names`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    r = Receiver(tls=context)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def tls_receiver(ca: trustme.CA) -> AsyncIterator[Receiver]:
    async with _tls_receiver(ca, "localhost", "127.0.0.1") as r:
        yield r


@pytest.fixture
def trust_the_test_ca(ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client trusts the test CA (and only it) instead of the public ones."""

    def trusting() -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    monkeypatch.setattr(client_module, "_tls_context", trusting)


@pytest.mark.usefixtures("trust_the_test_ca")
async def test_https_to_a_receiver_with_a_trusted_certificate(
        tls_receiver: Receiver, client: WebhookClient) -> None:
    target = Target.parse(tls_receiver.url(host="localhost"))
    for body in (b"one", b"two"):
        assert await client.post(target, body, HEADERS) == (200, b"ok")
    assert tls_receiver.bodies == [b"one", b"two"]
    assert tls_receiver.connections == 1  # kept alive over TLS too
    assert tls_receiver.answered[0].headers[b"host"] == b"localhost:%d" % tls_receiver.port


async def test_https_to_an_untrusted_certificate_fails_without_sending(
        tls_receiver: Receiver, client: WebhookClient) -> None:
    target = Target.parse(tls_receiver.url(host="localhost"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await client.post(target, b"secret", HEADERS)
    assert tls_receiver.arrived == []


@pytest.mark.usefixtures("trust_the_test_ca")
async def test_https_to_a_certificate_for_another_name_fails_without_sending(
        client: WebhookClient, ca: trustme.CA) -> None:
    # The CA is trusted, but the certificate names another host.
    async with _tls_receiver(ca, "other.example") as receiver:
        target = Target.parse(receiver.url(host="localhost"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await client.post(target, b"secret", HEADERS)
        assert receiver.arrived == []


# --- where the client may connect -----------------------------------------------------------

@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data",
                                 "https://169.254.169.254/", "http://[fe80::1]:8080/",
                                 "http://[::ffff:169.254.169.254]/"])
async def test_a_link_local_target_is_refused_before_connecting(
        client: WebhookClient, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    attempts: list[object] = []

    async def recording(*args: object, **kwargs: object) -> object:
        attempts.append(args)  # and nothing leaves the machine
        raise ConnectionRefusedError("a connection was attempted")

    monkeypatch.setattr(asyncio, "open_connection", recording)
    with pytest.raises(RefusedAddress, match="link-local"):
        await client.post(Target.parse(url), b"{}", HEADERS)
    assert attempts == []


def test_target_parse() -> None:
    assert Target.parse("https://example.com/a?b=1") == Target(
        True, "example.com", 443, b"/a?b=1", b"example.com")
    assert Target.parse("http://example.com") == Target(
        False, "example.com", 80, b"/", b"example.com")
    assert Target.parse("http://[::1]:8080/x") == Target(False, "::1", 8080, b"/x", b"[::1]:8080")
    assert Target.parse("http://bücher.example:81/").host_header == b"xn--bcher-kva.example:81"
