"""The HTTP client forwarding sends with: HTTP/1.1 (h11) over asyncio streams, keep-alive
connections per origin, every new connection checked after DNS resolution (app/core/targets.py).

Why not httpx: through httpcore's pool and anyio streams one webhook cost ~1.4 ms of CPU on
the event loop that also answers the provider's callbacks (measured on the 2-core bench
machine); h11 on asyncio streams costs ~0.2 ms. h11 is the same HTTP/1.1 state machine
httpcore uses underneath.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from app.core.targets import resolve

USER_AGENT = b"dlr-receiver-webhooks/0.1"
READ_CHUNK = 65536
MAX_BODY_READ = 64 * 1024   # more than this of an answer is not read; the connection closes
KEEPALIVE_SECONDS = 30.0
IDLE_PER_ORIGIN = 64


class ClientError(Exception):
    """The request got no complete answer (besides timeouts and OS-level errors)."""


@dataclass(frozen=True, slots=True)
class Target:
    """An endpoint URL, parsed once."""

    tls: bool
    host: str
    port: int
    path: bytes
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        """The target of an endpoint URL; ValueError for one no request can be made to (a
        host IDNA cannot encode, a path that is not ASCII: app/core/targets.py refuses both
        when an endpoint is made, so only a row stored before that check can have one)."""
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            # The host alone: IDNA encodes labels, and `host:port` would be read as one.
            shown = f"[{host}]" if ":" in host else host.encode("idna").decode("ascii")
            path_bytes = path.encode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"no request can be made to {url!r}: {exc}") from None
        if any(c <= 0x20 or c == 0x7F for c in path_bytes):
            raise ValueError(f"no request can be made to {url!r}: a blank or control "
                             "character in its path")
        default = port == (443 if tls else 80)
        return cls(tls, host, port, path_bytes,
                   (shown if default else f"{shown}:{port}").encode("ascii"))

    @property
    def origin(self) -> tuple[bool, str, int]:
        return self.tls, self.host, self.port


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    try:  # the same CA bundle httpx would use, when present
        import certifi

        context.load_verify_locations(certifi.where())
    except ImportError:  # pragma: no cover - the system's store alone
        pass
    return context


class WebhookClient:
    def __init__(self) -> None:
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(self, target: Target, body: bytes, headers: list[tuple[bytes, bytes]],
                   keep: int = 1024) -> tuple[int, bytes]:
        """POST `body`; the answer's status and the first `keep` bytes of its body."""
        conn = self._take_idle(target)
        if conn is not None:
            try:
                return await self._exchange(target, conn, body, headers, keep)
            except _StaleConnection:
                pass  # the server had closed it while idle: nothing was read; a new one
        conn = await self._connect(target)  # a new one is never stale: no second retry
        return await self._exchange(target, conn, body, headers, keep)

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take_idle(self, target: Target) -> _Connection | None:
        conns = self._idle.get(target.origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if now - conn.idle_since < KEEPALIVE_SECONDS and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _connect(self, target: Target) -> _Connection:
        error: OSError | None = None
        for addr in await resolve(target.host, target.port):
            try:
                if target.tls:
                    if self._tls is None:
                        self._tls = _tls_context()
                    reader, writer = await asyncio.open_connection(
                        addr, target.port, ssl=self._tls, server_hostname=target.host)
                else:
                    reader, writer = await asyncio.open_connection(addr, target.port)
                return _Connection(reader, writer)
            except OSError as exc:
                error = exc
        assert error is not None  # resolve() never answers an empty list
        raise error

    async def _exchange(self, target: Target, conn: _Connection, body: bytes,
                        headers: list[tuple[bytes, bytes]], keep: int) -> tuple[int, bytes]:
        reused = conn.h11.their_state is h11.IDLE and conn.idle_since > 0
        try:
            request = h11.Request(method=b"POST", target=target.path, headers=[
                (b"host", target.host_header), (b"user-agent", USER_AGENT),
                (b"content-length", str(len(body)).encode()), *headers])
            conn.writer.write(conn.h11.send(request) + (conn.h11.send(h11.Data(data=body)) or b"")
                              + (conn.h11.send(h11.EndOfMessage()) or b""))
            status, kept = await self._answer(conn, keep, reused)
        except BaseException:
            conn.close()
            raise
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            conn.idle_since = time.monotonic()
            idle = self._idle.setdefault(target.origin, [])
            if len(idle) < IDLE_PER_ORIGIN:
                idle.append(conn)
                return status, kept
        conn.close()
        return status, kept

    async def _answer(self, conn: _Connection, keep: int, reused: bool) -> tuple[int, bytes]:
        status: int | None = None
        kept = b""
        read = 0
        received_any = False
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientError(f"malformed answer: {exc}") from None
            if event is h11.NEED_DATA:
                data = await conn.reader.read(READ_CHUNK)
                if not data and not received_any:
                    if reused:
                        raise _StaleConnection
                    # Said here: h11 would report it as a protocol error of its own.
                    raise ClientError("the server closed the connection without answering")
                received_any = received_any or bool(data)
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                read += len(event.data)
                if len(kept) < keep:
                    kept += bytes(event.data[:keep - len(kept)])
                if read > MAX_BODY_READ:
                    break  # enough: the connection is closed rather than drained
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                if status is None:
                    raise ClientError("the server closed the connection without answering")
                break
        if status is None:  # pragma: no cover - h11 yields a Response before any Data
            raise ClientError("no answer")
        return status, kept


class _StaleConnection(Exception):
    """A kept-alive connection turned out closed before any answer: safe to retry once."""
