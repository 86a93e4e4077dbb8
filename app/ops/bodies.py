"""Bounded body reads: every request body this server reads has a size limit, checked while it
arrives (with or without `Content-Length`), and, where the body may still be on its way, a
deadline. A client cannot make the server buffer a body of any size, or hold a connection
and its memory by sending one slowly.

Read from the ASGI messages directly: a callback's body is one message, and Starlette's
stream (an async generator) cost more than the read itself.
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive


class BodyTooLarge(Exception):
    """The body is over its limit (declared or counted)."""


class BodyTooSlow(TimeoutError):
    """The body did not arrive before its deadline."""


class BoundedReceive:
    """An ASGI `receive` that raises BodyTooLarge once more than `limit` body bytes came, and
    BodyTooSlow when the body is not in by `deadline` (the loop's time; None: no deadline)."""

    __slots__ = ("_receive", "_limit", "_deadline", "_received", "_done")

    def __init__(self, receive: Receive, *, limit: int, deadline: float | None) -> None:
        self._receive = receive
        self._limit = limit
        self._deadline = deadline
        self._received = 0
        self._done = False

    async def __call__(self) -> Message:
        if self._done or self._deadline is None:
            # After the body only a disconnect can come: no deadline for that.
            message = await self._receive()
        else:
            try:
                async with asyncio.timeout_at(self._deadline):
                    message = await self._receive()
            except TimeoutError:
                raise BodyTooSlow from None
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise BodyTooLarge
            self._done = self._done or not message.get("more_body", False)
        else:
            self._done = True
        return message


def declared_too_large(content_length: str | None, limit: int) -> bool:
    """Whether a `Content-Length` header already says the body is over `limit`."""
    return content_length is not None and content_length.isdigit() \
        and int(content_length) > limit


async def read_body(receive: Receive, *, limit: int, timeout: float | None,
                    content_length: str | None = None) -> bytes:
    """The whole body, refused as soon as it is over `limit` (BodyTooLarge) or takes longer
    than `timeout` seconds (BodyTooSlow; None: the body is known to be in already)."""
    if declared_too_large(content_length, limit):
        raise BodyTooLarge
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    bounded = BoundedReceive(receive, limit=limit, deadline=deadline)
    chunks: list[bytes] = []
    while True:
        message = await bounded()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
