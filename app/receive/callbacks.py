"""The DLR receiver routes: GET and POST on /dlr and /dlr/{token}.

The body is read once, with the size limit enforced while reading. Query and body fields
are merged (body wins) and handed to `notifications.interpret`; whatever comes out, a
notification or a rejection, goes through the one write path and is answered 200 only
after it is committed.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import PlainTextResponse, Response
from python_multipart.multipart import MultipartParser, parse_options_header

from app.config import Settings
from app.core.notifications import Invalid, Rejection, interpret
from app.core.times import utcnow
from app.ops import metrics
from app.ops.bodies import BodyTooLarge, BodyTooSlow, read_body
from app.ops.http_protocol import body_received
from app.ops.logs import redact_query
from app.store.ingestor import Ingestor
from app.store.write import Item, StoreUnavailable
from app.web.routing import DirectRoute
from app.web.security import check_callback, client_ip

log = logging.getLogger(__name__)
router = APIRouter(tags=["callbacks"])

class Unreadable(ValueError):
    """The body cannot be decoded as its content type says; archived as rejected."""


def parse_urlencoded(data: bytes) -> dict[str, str]:
    if not data:
        return {}
    # surrogateescape keeps bytes that are not UTF-8 so that they can be archived exactly.
    text = data.decode("utf-8", "surrogateescape")
    return dict(parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="surrogateescape"))


def parse_multipart(data: bytes, boundary: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    state: dict[str, bytes | bytearray | None] = {"header": b"", "name": None}
    value = bytearray()

    def on_header_field(d: bytes, start: int, end: int) -> None:
        state["header"] = bytes(state["header"] or b"") + d[start:end]

    def on_header_value(d: bytes, start: int, end: int) -> None:
        if (state["header"] or b"").lower() == b"content-disposition":
            _, params = parse_options_header(d[start:end])
            state["name"] = params.get(b"name")

    def on_header_end() -> None:
        state["header"] = b""

    def on_part_begin() -> None:
        state["name"] = None
        value.clear()

    def on_part_data(d: bytes, start: int, end: int) -> None:
        value.extend(d[start:end])

    def on_part_end() -> None:
        name = state["name"]
        if name:
            key = bytes(name).decode("utf-8", "surrogateescape")
            fields[key] = bytes(value).decode("utf-8", "surrogateescape")

    parser = MultipartParser(
        boundary,
        callbacks={
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(data)
        parser.finalize()
    except Exception as exc:  # python-multipart raises several types for broken input
        raise Unreadable(f"malformed multipart body: {exc}") from exc
    return fields


def parse_json(data: bytes) -> dict[str, str]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"malformed JSON body: {exc}") from exc
    if not isinstance(doc, dict):
        raise Unreadable("JSON body is not an object")
    fields: dict[str, str] = {}
    for key, val in doc.items():
        if val is None:
            continue
        if isinstance(val, bool):
            val = "1" if val else "0"
        if isinstance(val, dict | list):
            raise Unreadable(f"JSON field {key!r} is not a plain value")
        fields[key] = str(val)
    return fields


FORM = "application/x-www-form-urlencoded"


def parse_body(content_type: str | None, body: bytes) -> dict[str, str]:
    if not body:
        return {}
    if content_type is None or content_type.startswith(FORM):
        return parse_urlencoded(body)  # what the provider sends: no header parsing needed
    ctype, params = parse_options_header(content_type)
    if ctype == b"application/json" or ctype.endswith(b"+json"):
        return parse_json(body)
    if ctype == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise Unreadable("multipart body without boundary")
        return parse_multipart(body, boundary)
    return parse_urlencoded(body)  # form data, and what a missing or odd type most likely is


def _is_form(content_type: str | None) -> bool:
    ctype, _ = parse_options_header(content_type or "")
    return not (ctype == b"application/json" or ctype.endswith(b"+json")
                or ctype == b"multipart/form-data")


def _masked(data: bytes, settings: Settings, *, form: bool) -> bytes:
    """`data` without the callback token: every `token=` value of a form or query, and the
    configured token itself wherever else it appears (JSON, multipart)."""
    if form:
        data = redact_query(data)
    if settings.callback_token is not None:
        data = data.replace(settings.callback_token.get_secret_value().encode(), b"***")
    return data


async def receive(request: Request, token: str | None = None) -> Response:
    """Receive a delivery, seen or reply notification (or an SMS delivery report).

    Answered `OK` once committed (new, duplicate, or invalid and archived).
    """
    settings: Settings = request.app.state.settings
    ingestor: Ingestor = request.app.state.ingestor
    check_callback(request, settings, token)
    received_at = utcnow()
    try:
        body = b""
        if request.method == "POST":
            # A body that trickles in must not hold a connection (and its memory) forever;
            # one that is all in has nothing to wait for, so no deadline is armed.
            body = await read_body(
                request.receive, limit=settings.max_callback_bytes,
                timeout=None if body_received(request.scope) else settings.callback_read_timeout,
                content_length=request.headers.get("content-length"))
    except BodyTooLarge:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"callback body over {settings.max_callback_bytes} bytes",
        ) from None
    except BodyTooSlow:
        raise HTTPException(
            status.HTTP_408_REQUEST_TIMEOUT,
            f"callback body not received within {settings.callback_read_timeout} s",
        ) from None

    query = request.scope.get("query_string", b"")
    content_type = request.headers.get("content-type")
    item: Item
    try:
        fields = parse_urlencoded(query)
        fields.update(parse_body(content_type, body))
        fields.pop("token", None)
        item = interpret(fields, received_at=received_at,
                         campaign_pattern=request.app.state.campaign_regex)
        kind = item.type
    except (Invalid, Unreadable) as exc:
        addr = client_ip(request, settings.trusted_proxies)
        item = Rejection(
            reason=str(exc),
            method=request.method,
            content_type=content_type,
            # The archive is read by every API user: the callback token must not be in it.
            query=_masked(query, settings, form=True),
            body=_masked(body, settings, form=_is_form(content_type)),
            source_ip=str(addr) if addr else None,
            received_at=received_at,
        )
        kind = "invalid"
        log.info("callback rejected: %s", item.reason,
                 extra={"reason": item.reason, "source_ip": item.source_ip})
    try:
        outcome = await ingestor.submit(item)
    except StoreUnavailable as exc:
        log.warning("not stored, answered 503: %s", exc,
                    extra={"msg_id": getattr(item, "msg_id", None)})
        metrics.callback_counter(kind, "unavailable").inc()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "database unavailable; not stored, send again",
                            headers={"Retry-After": "5"}) from None
    metrics.callback_counter(kind, outcome).inc()
    return PlainTextResponse("OK")


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "committed: new, duplicate, or invalid and archived",
          "content": {"text/plain": {"example": "OK"}}},
    403: {"description": "wrong or missing token, or a source outside the allow-list"},
    408: {"description": "the body did not arrive within DLR_CALLBACK_READ_TIMEOUT"},
    413: {"description": "body over DLR_MAX_CALLBACK_BYTES"},
    503: {"description": "the database cannot commit; not stored, send again"},
}
# Hot routes: registered like any other (middleware, exception handlers, OpenAPI), without
# FastAPI's per-request dependency solving (see app/web/routing.py).
for _path, _suffix in (("/dlr", ""), ("/dlr/{token}", "_with_token")):
    for _method in ("GET", "POST"):
        router.add_api_route(_path, receive, methods=[_method],
                             operation_id=f"dlr_{_method.lower()}{_suffix}",
                             response_class=PlainTextResponse, responses=_ANSWERS,
                             route_class_override=DirectRoute)
