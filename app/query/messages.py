"""Messages and replies: the single lookup (the hot read), pages of messages, and replies."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import ColumnElement, Connection, Select, bindparam, select, tuple_
from sqlalchemy.orm import Session

from app.core.message import MessageSummary
from app.core.notifications import Status, msg_key, shown_status_extended
from app.query.common import DatabaseDep, Since, Until
from app.query.schemas import EventOut, MessageOut, ReplyItem
from app.store.db import Database
from app.store.keyed_reads import KeyedRead
from app.store.models import Event, Message
from app.web.paging import Cursor, Limit, decode_cursor, page_of
from app.web.routing import DirectRoute, api_router
from app.web.schemas import ErrorOut, Page

router = api_router(tags=["api"])


_SUMMARY_COLUMNS = [Message.__table__.c[name] for name in MessageSummary.model_fields]
_EVENT_COLUMNS = [Event.__table__.c[name] for name in EventOut.model_fields]


# Built once: constructing a statement costs more than running this indexed lookup. Keyed:
# the lookups of one turn of the loop are read together (app/store/keyed_reads.py).
_LOOKUP = KeyedRead(
    select(*_SUMMARY_COLUMNS, *(c.label(f"e_{c.name}") for c in _EVENT_COLUMNS))
    .select_from(Message.__table__.outerjoin(Event.__table__, Event.msg_key == Message.msg_key))
    # Arrival order: a batch inserts its events in dedupe_key order (app/store/write.py).
    .order_by(Event.received_at, Event.id),
    Message.__table__.c.msg_key,
)


_SUMMARY_NAMES = tuple(MessageSummary.model_fields)
_EVENT_NAMES = tuple(EventOut.model_fields)


def message_from_rows(rows: Sequence[Sequence[Any]], msg_id: str) -> MessageOut:
    """Build the answer from one key's rows of _LOOKUP; 404 HTTPException when there are none.

    Validated in one call from plain dicts: a model per event built in Python cost twice as
    much (profiled)."""
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no message with msg_id {msg_id!r}")
    n = len(_SUMMARY_NAMES)
    message: dict[str, Any] = dict(zip(_SUMMARY_NAMES, rows[0][:n], strict=True))
    events = [dict(zip(_EVENT_NAMES, r[n:], strict=True)) for r in rows if r[n] is not None]
    for e in events:
        e["status_extended"] = shown_status_extended(e["status_extended"], message["kind"])
    message["replies"] = [{"text": e["text"] or "", "received_at": e["received_at"]}
                          for e in events if e["type"] == "reply"]
    message["events"] = events
    return MessageOut.model_validate(message)


def load_message(conn: Connection, msg_id: str) -> MessageOut:
    """A message with its timeline, in one round trip (`dlr status`)."""
    return message_from_rows(_LOOKUP.rows(conn, msg_key(msg_id)), msg_id)


async def fetch_message(database: Database, msg_id: str) -> MessageOut:
    """A message with its timeline: one indexed read on the loop, shared with the lookups
    asked in the same turn."""
    return message_from_rows(await database.read_keyed(_LOOKUP, msg_key(msg_id)), msg_id)


async def get_message(request: Request, msg_id: str) -> Response:
    """A message's current status and full timeline (msg_id of UUID form in any letter case;
    an id containing `/` is reached percent-encoded, `a%2Fb`)."""
    message = await fetch_message(request.app.state.database, msg_id)
    return Response(message.model_dump_json(), media_type="application/json")


# The hot read: a route like every /api route (access rule included, with the router's
# prefix, dependencies and error answers), without FastAPI's per-request dependency solving
# (app/web/routing.py). In a router of its own so that the app can put it at the head of its
# routes (app/main.py).
lookup_router = APIRouter(prefix=router.prefix, tags=router.tags,
                          dependencies=router.dependencies, responses=router.responses)
lookup_router.add_api_route(
    "/messages/{msg_id:path}", get_message, methods=["GET"], response_model=MessageOut,
    responses={404: {"description": "unknown msg_id", "model": ErrorOut}},
    route_class_override=DirectRoute)


_M = Message.__table__.c
# Query parameter -> condition on a bound parameter of the same name.
_EQUAL = ("p_transaction_id", "phone", "status", "campaign")
_LIST_FILTERS: dict[str, ColumnElement[bool]] = {
    **{name: _M[name] == bindparam(name) for name in _EQUAL},
    "since": _M.created_at >= bindparam("since"),
    "until": _M.created_at < bindparam("until"),
    "after": _M.id < bindparam("after"),
}
# A page by time alone walks the (created_at, id) index in its order, newest first: the
# next page starts below the last row's (created_at, id), looked up by its id (the cursor).
_AFTER_IN_TIME = tuple_(_M.created_at, _M.id) < tuple_(
    select(_M.created_at).where(_M.id == bindparam("after")).scalar_subquery(),
    bindparam("after"))


_FILTER_SUBSETS: int = 2 ** len(_LIST_FILTERS)


@lru_cache(maxsize=_FILTER_SUBSETS)  # every subset of the filters
def _list_statement(filters: tuple[str, ...]) -> Select[Any]:
    """One statement per combination of filters, so each is built and compiled once.

    Each equality filter has an index that ends in the id: a page is one range of it, newest
    (highest id) first. Without one, a time window pages along (created_at, id) instead, the
    newest first by the time each message was first known, so that `since`/`until` pages
    too are one index range whatever the table holds."""
    query = select(*_SUMMARY_COLUMNS, _M.id).limit(bindparam("limit"))
    if any(name in _EQUAL for name in filters) or not {"since", "until"} & set(filters):
        return query.where(*(_LIST_FILTERS[name] for name in filters)).order_by(_M.id.desc())
    return (query.where(*(_AFTER_IN_TIME if name == "after" else _LIST_FILTERS[name]
                          for name in filters))
            .order_by(_M.created_at.desc(), _M.id.desc()))


@router.get("/messages", response_model=Page[MessageSummary])
async def list_messages(
    request: Request,
    p_transaction_id: str | None = None,
    phone: str | None = None,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    cursor: Cursor = None,
    campaign: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Messages, newest first. Pages are keyed on the row id, so rows inserted while a client
    pages through appear on no page it has not read yet and shift nothing.

    Each filter has an index that ends in the id, so a page is one index range scan; a page
    by time alone (`since`, `until`) is one range of (created_at, id), newest first by the
    time each message was first known.
    """
    values = {"p_transaction_id": p_transaction_id, "phone": phone, "campaign": campaign,
              "status": status_.value if status_ is not None else None,
              "since": since, "until": until, "after": decode_cursor(cursor)}
    params = {name: value for name, value in values.items() if value is not None}
    rows = await request.app.state.database.read_rows(_list_statement(tuple(params)),
                                                      params | {"limit": limit + 1})
    rows, next_cursor = page_of(rows, limit, lambda r: int(r[-1]))
    n = len(_SUMMARY_COLUMNS)
    page = Page[MessageSummary](
        items=[MessageSummary(**dict(zip(MessageSummary.model_fields, r[:n], strict=True)))
               for r in rows],
        next_cursor=next_cursor,
    )
    return Response(page.model_dump_json(), media_type="application/json")


@router.get("/replies", response_model=Page[ReplyItem])
async def list_replies(
    database: DatabaseDep, since: Since = None, limit: Limit = 100, cursor: Cursor = None,
    campaign: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[ReplyItem]:
    """Subscribers' replies, newest first, with the message they answer (optionally only
    the replies to one campaign's messages)."""

    def read(session: Session) -> Page[ReplyItem]:
        query = (
            select(Event, Message)
            .join(Message, Message.msg_key == Event.msg_key)
            .where(Event.type == "reply")
            .order_by(Event.id.desc())
            .limit(limit + 1)
        )
        if since is not None:
            query = query.where(Event.received_at >= since)
        if campaign is not None:
            query = query.where(Message.campaign == campaign)
        after = decode_cursor(cursor)
        if after is not None:
            query = query.where(Event.id < after)
        rows, next_cursor = page_of(list(session.execute(query).all()), limit, lambda r: r[0].id)
        items = [
            ReplyItem(msg_id=m.msg_id, p_transaction_id=m.p_transaction_id or e.p_transaction_id,
                      phone=m.phone, text=e.text or "", received_at=e.received_at,
                      campaign=m.campaign)
            for e, m in rows
        ]
        return Page[ReplyItem](items=items, next_cursor=next_cursor)

    return await database.session(read)
