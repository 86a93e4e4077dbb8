"""uvicorn's HTTP protocol (httptools) with the limits a public endpoint needs.

uvicorn times out idle keep-alive connections but nothing else at the connection level:

- The request head has a deadline. A client that connects and then sends its head a byte at
  a time (or nothing at all) is closed after DLR_CALLBACK_READ_TIMEOUT; the body has the
  same deadline in the receiver (callbacks.py). The deadline runs whenever the connection
  waits for a head: after connecting, and as soon as bytes of a next head arrive after a
  response, including a head pipelined behind a request that was being answered.
- The request head has a size limit, HEAD_LIMIT bytes for the request line and all headers
  together: over it the answer is 431 and the connection is closed. httptools keeps the whole
  head in memory and has no limit of its own (uvicorn's h11 setting does not apply to it).
  Requests pipelined before the refused head are answered first, in order: the 431 waits for
  them (reading stops meanwhile) and goes out after the last of their answers.
- An answer sent before the request body has fully arrived (408, 413, 403, 405, ...) goes
  out with `Connection: close` and the connection is closed, instead of reading the rest of
  a body nobody will use.

- The request tells its route whether its whole body has already arrived (`body_received`),
  as it almost always has for a callback (a few hundred bytes, in the head's packet): the
  receiver then reads it without arming its body deadline, a timer that cost a callback
  about 5% of the event loop's time (profiled under the benchmark's mix).
- The access line is written here, when the answer starts, through logs.AccessLog's
  cached formatter, when uvicorn's access logger holds only the project's own handler;
  otherwise uvicorn's own access logging runs as before. uvicorn's per-request LogRecord and
  its formatting were most of what the default access log cost a trivial route.

Both refusals close gently: the server half-closes, drops whatever the client still sends,
and closes when the client does or after LINGER seconds. Closing outright with unread bytes
makes the kernel answer them with a reset, which can destroy the answer before the client
has read it (the reason nginx lingers too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

if TYPE_CHECKING:
    from starlette.types import Scope
    from uvicorn._types import ASGISendEvent

    Send = Callable[[ASGISendEvent], Coroutine[Any, Any, None]]

from app.config import get_settings
from app.ops.logs import AccessLog

# The scope extension through which a request tells whether its body is all in.
_BODY_RECEIVED = "dlr.body_received"
# Request line plus headers. 16 KiB is what Node.js allows and twice nginx's default line
# buffer; a provider's callback needs well under 1 KiB.
HEAD_LIMIT = 16 * 1024
# Bytes a header line adds beyond its name and value: ": " and CRLF.
_HEADER_OVERHEAD = 4
# Seconds a refused connection is kept half-closed so that its answer can be read.
LINGER = 2.0


class HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing a head over the limit."""


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head limits above, writing the access log
    itself (`app.ops.logs.AccessLog`)."""

    _head_timer: asyncio.TimerHandle | None = None
    # Between a message's first byte and the end of its headers.
    _in_head = False
    # Bytes of the current head: counted from the raw chunks while the head spans them, and
    # from the parsed URL and header fields (a lower bound) when a chunk held more than it.
    _head_bytes = 0
    _field_bytes = 0
    # Set by the parser during one feed, read after it.
    _completed_in_feed = False
    _head_refused = False
    # After a refusal: the answer is out, whatever else arrives is dropped.
    _discarding = False
    _linger_timer: asyncio.TimerHandle | None = None
    # A head over the limit came while earlier requests were still being answered: the 431
    # is owed, sent once they all are. Nothing more is read (or parsed) meanwhile.
    _owes_431 = False

    # --- the head deadline -------------------------------------------------------------

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                get_settings().callback_read_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request head did not arrive in time")
            self.transport.close()

    def _answering(self) -> bool:
        """Whether a request is being answered (its head is in; its response is not done)."""
        return self.cycle is not None and not self.cycle.response_complete

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The cycles uvicorn creates log through the logging module only if this is None.
        self._access = AccessLog.configured() if self.access_log else None
        if self._access is not None:
            self.access_log = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # nothing sent yet is as slow as a head sent slowly

    def on_response_complete(self) -> None:
        if self._discarding:
            self.pipeline.clear()  # requests behind a refused one are not answered
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._owes_431:
            if self._discarding:
                return  # the connection is closing already (nothing may follow write_eof)
            if self._answering() or self.pipeline:
                self.flow.pause_reading()  # super() resumed it; a request is still answered
            else:
                self._owes_431 = False
                self._send_431()  # after the answers to every request before the head
            return
        if self._in_head and not self._answering():
            # The next head began while this request was answered: its deadline starts now
            # (the wait for the answer was the server's time, not the client's). A request
            # pipelined before it is answered first; this runs again after it.
            self._arm()
        else:
            # Between requests the keep-alive timeout applies, as in uvicorn.
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def close_gently(self) -> None:
        """Close once the answer already written is out, without a reset destroying it."""
        if self._discarding or self.transport.is_closing():
            return
        self._discarding = True
        self._disarm()
        self._unset_keepalive_if_required()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # sent after the answer
        self.flow.resume_reading()  # keep reading (and dropping) until the client closes
        self._linger_timer = self.loop.call_later(LINGER, self.transport.close)

    # --- the head size -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._discarding or self._owes_431:
            return  # after a refused head (read while paused, e.g. resumed by a receive)
        self._unset_keepalive_if_required()
        head_before = self._in_head
        idle_before = not self._in_head and not self._answering()
        self._completed_in_feed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._head_refused:
                self._refuse_head()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self.transport.is_closing():
            return
        if self._in_head:
            if not self._completed_in_feed and (head_before or idle_before):
                # The whole chunk belongs to this head (idle: at most CRLFs before it).
                self._head_bytes = (self._head_bytes if head_before else 0) + len(data)
            else:
                # The head began after other bytes of the chunk: count what was parsed.
                self._head_bytes = max(self._head_bytes, self._field_bytes)
            if self._head_bytes > HEAD_LIMIT:
                self._refuse_head()
                return
        if not self._answering():
            self._arm()  # bytes of a next head (or noise) are pending: they have a deadline

    def _refuse_head(self) -> None:
        """Answer a head over the limit with 431: at once, or, while requests that came before
        it are still being answered (in the same packet, or pipelined), after their answers,
        from `on_response_complete`. Writing it now would put it ahead of those answers, and
        close the connection before they are written."""
        if self._answering() or self.pipeline:
            self._owes_431 = True
            self._disarm()  # the head is refused already: no deadline for the rest of it
            self.flow.pause_reading()
        else:
            self._send_431()

    def _send_431(self) -> None:
        self.logger.info("refused a request head over %d bytes", HEAD_LIMIT)
        body = b"Request head over %d bytes" % HEAD_LIMIT
        head = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: text/plain; charset=utf-8\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.close_gently()

    def _count(self, size: int) -> None:
        self._field_bytes += size
        if self._field_bytes > HEAD_LIMIT:
            self._head_refused = True
            raise HeadTooLarge  # httptools turns it into HttpParserError in data_received

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._field_bytes = len("GET  HTTP/1.1\r\n")  # the request line's fixed part, about

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + _HEADER_OVERHEAD)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before:
            cycle.send = _sending(  # type: ignore[method-assign,assignment]
                cycle, self.close_gently, self._access)
            extensions = cast(dict[str, Any], self.scope.setdefault("extensions", {}))
            extensions[_BODY_RECEIVED] = lambda: not cycle.more_body

    def on_message_complete(self) -> None:
        self._completed_in_feed = True
        super().on_message_complete()


def body_received(scope: Scope) -> bool:
    """Whether the server has already received the request's whole body, so that reading it
    cannot wait. False when the server cannot tell (another server, a test's transport)."""
    received = scope.get("extensions", {}).get(_BODY_RECEIVED)
    return received is not None and bool(received())


class _GentleClose:
    """The transport as a request cycle sees it, with `close` made gentle."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self._transport = transport
        self.close = close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _sending(cycle: RequestResponseCycle, close: Callable[[], None], access: AccessLog | None
             ) -> Send:
    """The cycle's `send`, writing the access line when the answer starts, and closing the
    connection when the answer starts before the request body is in: the rest of that body
    would otherwise be read, with no deadline, for nothing. uvicorn then writes
    `Connection: close` and closes (gently) once the answer is out."""
    send = cycle.send

    async def sending(message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start":
            scope = cycle.scope
            if cycle.more_body:
                cycle.keep_alive = False
                cycle.transport = _GentleClose(cycle.transport, close)  # type: ignore[assignment]
            if access is not None:
                access.write(get_client_addr(scope), scope["method"],
                             get_path_with_query_string(scope), scope["http_version"],
                             message["status"])
            if scope["method"] != "HEAD" and any(
                    name == b"content-length" for name, _ in message.get("headers", ())):
                cycle.transport = _HeadWithBody(cycle)  # type: ignore[assignment]
        await send(message)

    return sending


class _HeadWithBody:
    """The cycle's transport while a fixed-length answer starts: the head uvicorn writes
    is kept and goes out with the first part of the body, in one write.

    Written apart, head and body cost two system calls and two packets; the second write was
    4% of the event loop's time under the benchmark's callbacks (profiled), and the same
    for every short answer. Any other use of the transport before the body sends the head
    first, so nothing is reordered or kept back.
    """

    __slots__ = ("_cycle", "_transport", "_head")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is None:
            self._head = data  # uvicorn's status line and headers
            return
        self._cycle.transport = self._transport
        self._transport.write(self._head + data)

    def release(self) -> None:
        """Back to the real transport, with the head written if it is still kept."""
        if self._cycle.transport is self:  # type: ignore[comparison-overlap]
            self._cycle.transport = self._transport
            if self._head is not None:
                self._transport.write(self._head)

    def __getattr__(self, name: str) -> Any:
        self.release()
        return getattr(self._transport, name)
