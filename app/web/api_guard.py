"""`ApiGuard`: who may send a body to /api/*, decided before a byte of it is read.

FastAPI reads and parses a route's body before it solves the route's dependencies, so the
access rule as a dependency alone let an unauthenticated client make the server read (and
buffer, or spool to disk) a body of any size, as slowly as it liked. This middleware runs
the same access dependency first, and gives every API body a size limit and a read deadline. Only
requests to /api/* that may carry a body pay for any of it.

The limits follow what each route needs, so that no JSON body can tie up a worker for long
(500,000 junk event names once took 12 s to validate): an image upload may be as large as
`DLR_UPLOAD_MAX_BYTES` and its multipart framing (`max_body`), a send (`POST
/api/v1/messages`, up to the provider's limits for every recipient) 1 MiB, and every other
body (endpoints, replays, retries) 64 KiB.
"""

from __future__ import annotations

import asyncio

from fastapi import Depends, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.ops.bodies import BodyTooLarge, BodyTooSlow, BoundedReceive, declared_too_large
from app.web.routing import call_dependencies
from app.web.security import require_api_access

ACCESS = [Depends(require_api_access)]
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
UPLOAD_PATH = "/api/v1/images"
SEND_PATH = "/api/v1/messages"
SEND_MAX_BODY = 1024 * 1024
OTHER_MAX_BODY = 64 * 1024


def body_limit(method: str, path: str, upload_limit: int) -> int:
    """The largest body `method path` may carry."""
    path = path.rstrip("/") or "/"
    if method == "POST" and path == UPLOAD_PATH:
        return upload_limit
    if method == "POST" and path == SEND_PATH:
        return SEND_MAX_BODY
    return OTHER_MAX_BODY


class ApiGuard:
    def __init__(self, app: ASGIApp, read_timeout: float, max_body: int) -> None:
        self.app = app
        self.read_timeout = read_timeout
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in _NO_BODY
                or not scope["path"].startswith("/api/")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        limit = body_limit(scope["method"], scope["path"], self.max_body)
        try:
            await call_dependencies(request, ACCESS)
            if declared_too_large(request.headers.get("content-length"), limit):
                raise _too_large(limit)
        except HTTPException as exc:
            response = await http_exception_handler(request, exc)
            await response(scope, receive, send)
            return
        bounded = BoundedReceive(
            receive, limit=limit,
            deadline=asyncio.get_running_loop().time() + self.read_timeout)

        async def receive_in_time() -> Message:
            try:
                return await bounded()
            except BodyTooSlow:
                raise HTTPException(
                    status.HTTP_408_REQUEST_TIMEOUT,
                    f"request body not received within {self.read_timeout:g} s") from None
            except BodyTooLarge:
                raise _too_large(limit) from None

        await self.app(scope, receive_in_time, send)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"request body over {limit} bytes, this route's limit")
