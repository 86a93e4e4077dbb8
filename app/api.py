"""The REST query routes under /api/v1 (reads only; sending lives in app/send_api.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    and_,
    bindparam,
    case,
    func,
    select,
)
from sqlalchemy.orm import Session

from app.db import Database, utcnow
from app.keyed_reads import KeyedRead
from app.models import Event, Message, Rejected
from app.notifications import (
    SHOWN_PREFIX,
    SMS_KIND,
    STORED_PREFIX,
    Status,
    msg_key,
    shown_status_extended,
)
from app.routing import DirectRoute
from app.schemas import (
    API_ERROR_RESPONSES,
    ErrorOut,
    EventOut,
    Funnel,
    MessageOut,
    MessageSummary,
    Page,
    RejectedItem,
    ReplyItem,
    Stats,
    Timeline,
    TimelinePoint,
    UtcDateTime,
    invalid,
)
from app.security import require_api_access

R = TypeVar("R")
router = APIRouter(prefix="/api/v1", tags=["api"], dependencies=[Depends(require_api_access)],
                   responses=API_ERROR_RESPONSES)


async def get_database(request: Request) -> Database:
    return request.app.state.database  # type: ignore[no-any-return]


# Routes open their session inside a read thread and close it there (Database.session), so
# a connection is never held while waiting for a thread to tear a dependency down.
DatabaseDep = Annotated[Database, Depends(get_database)]
Limit = Annotated[int, Query(ge=1, le=1000, description="Items per page")]
# The cursor is the id of the last row seen: pages are keyset ranges below it. Its pattern
# is in the schema, so any cursor the schema allows is a valid one.
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page",
                                     pattern=r"^[0-9]{1,18}$")]
Since = Annotated[UtcDateTime | None, Query(description="ISO 8601; inclusive")]
Until = Annotated[UtcDateTime | None, Query(description="ISO 8601; exclusive")]


def encode_cursor(last_id: int) -> str:
    return str(last_id)


def decode_cursor(cursor: str | None) -> int | None:
    return None if cursor is None else int(cursor)


def _page(rows: list[R], limit: int, id_of: Callable[[R], int]) -> tuple[list[R], str | None]:
    """Keyset pages, newest first: rows were fetched with limit + 1 to see if more follow."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(id_of(rows[-1])) if more and rows else None


_SUMMARY_COLUMNS = [Message.__table__.c[name] for name in MessageSummary.model_fields]
_EVENT_COLUMNS = [Event.__table__.c[name] for name in EventOut.model_fields]


# Built once: constructing a statement costs more than running this indexed lookup. Keyed:
# the lookups of one turn of the loop are read together (app/keyed_reads.py).
_LOOKUP = KeyedRead(
    select(*_SUMMARY_COLUMNS, *(c.label(f"e_{c.name}") for c in _EVENT_COLUMNS))
    .select_from(Message.__table__.outerjoin(Event.__table__, Event.msg_key == Message.msg_key))
    .order_by(Event.id),
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
# (app/routing.py). In a router of its own so that the app can put it at the head of its
# routes (app/main.py).
lookup_router = APIRouter(prefix=router.prefix, tags=router.tags,
                          dependencies=router.dependencies, responses=router.responses)
lookup_router.add_api_route(
    "/messages/{msg_id:path}", get_message, methods=["GET"], response_model=MessageOut,
    responses={404: {"description": "unknown msg_id", "model": ErrorOut}},
    route_class_override=DirectRoute)


_M = Message.__table__.c
# Query parameter -> condition on a bound parameter of the same name.
_LIST_FILTERS: dict[str, ColumnElement[bool]] = {
    "p_transaction_id": _M.p_transaction_id == bindparam("p_transaction_id"),
    "phone": _M.phone == bindparam("phone"),
    "status": _M.status == bindparam("status"),
    "since": _M.created_at >= bindparam("since"),
    "until": _M.created_at < bindparam("until"),
    "after": _M.id < bindparam("after"),
}


_FILTER_SUBSETS: int = 2 ** len(_LIST_FILTERS)


@lru_cache(maxsize=_FILTER_SUBSETS)  # every subset of the filters
def _list_statement(filters: tuple[str, ...]) -> Select[Any]:
    """One statement per combination of filters, so each is built and compiled once."""
    return (select(*_SUMMARY_COLUMNS, _M.id)
            .where(*(_LIST_FILTERS[name] for name in filters))
            .order_by(_M.id.desc()).limit(bindparam("limit")))


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
) -> Response:
    """Messages, newest first. Pages are keyed on the row id, so rows inserted while a client
    pages through appear on no page it has not read yet and shift nothing.

    Each filter has an index that ends in the id, so a page is one index range scan.
    """
    values = {"p_transaction_id": p_transaction_id, "phone": phone,
              "status": status_.value if status_ is not None else None,
              "since": since, "until": until, "after": decode_cursor(cursor)}
    params = {name: value for name, value in values.items() if value is not None}
    rows = await request.app.state.database.read_rows(_list_statement(tuple(params)),
                                                      params | {"limit": limit + 1})
    rows, next_cursor = _page(rows, limit, lambda r: int(r[-1]))
    n = len(_SUMMARY_COLUMNS)
    page = Page[MessageSummary](
        items=[MessageSummary(**dict(zip(MessageSummary.model_fields, r[:n], strict=True)))
               for r in rows],
        next_cursor=next_cursor,
    )
    return Response(page.model_dump_json(), media_type="application/json")


@router.get("/replies", response_model=Page[ReplyItem])
async def list_replies(
    database: DatabaseDep, since: Since = None, limit: Limit = 100, cursor: Cursor = None
) -> Page[ReplyItem]:
    """Subscribers' replies, newest first, with the message they answer."""

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
        after = decode_cursor(cursor)
        if after is not None:
            query = query.where(Event.id < after)
        rows, next_cursor = _page(list(session.execute(query).all()), limit, lambda r: r[0].id)
        items = [
            ReplyItem(msg_id=m.msg_id, p_transaction_id=m.p_transaction_id or e.p_transaction_id,
                      phone=m.phone, text=e.text or "", received_at=e.received_at)
            for e, m in rows
        ]
        return Page[ReplyItem](items=items, next_cursor=next_cursor)

    return await database.session(read)


def _window(col: Any, since: datetime | None, until: datetime | None
            ) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(col >= since)
    if until is not None:
        conds.append(col < until)
    return conds


@router.get("/stats", response_model=Stats)
async def stats(database: DatabaseDep, since: Since = None, until: Until = None,
                p_transaction_id: str | None = None) -> Stats:
    """Messages first known in the window (optionally one p_transaction_id): by status, by
    status_extended, and the funnel sent → delivered → seen → replied; events by type."""
    scope = _window(Message.created_at, since, until)
    if p_transaction_id is not None:
        scope.append(Message.p_transaction_id == p_transaction_id)
    event_scope = _window(Event.received_at, since, until)
    if p_transaction_id is not None:
        event_scope.append(Event.p_transaction_id == p_transaction_id)

    def read(session: Session) -> Stats:
        # Grouping on an expression, not the bare column: otherwise SQLite walks the whole
        # (status, id) index to group instead of the time range (1.2 s vs 10 ms at 1M rows).
        status_ = func.coalesce(Message.status, "")
        by_status = dict(session.execute(
            select(status_, func.count()).where(*scope).group_by(status_)
        ).all())
        # Counted by the code each message shows (see shown_status_extended).
        shown = case(
            (and_(Message.kind.is_not(None), Message.kind != SMS_KIND,
                  func.substr(Message.status_extended, 1, len(STORED_PREFIX)) == STORED_PREFIX),
             SHOWN_PREFIX + func.substr(Message.status_extended, len(STORED_PREFIX) + 1)),
            else_=Message.status_extended)
        by_ext: dict[str, int] = {ext: n for ext, n in session.execute(
            select(shown, func.count())
            .where(Message.status_extended.is_not(None), *scope)
            .group_by(shown)
        ).all() if ext is not None}
        sent, delivered, seen = session.execute(
            select(func.count(), func.count(Message.delivered_at), func.count(Message.seen_at))
            .where(*scope)
        ).one()
        replied = session.scalar(
            select(func.count(func.distinct(Event.msg_key)))
            .join(Message, Message.msg_key == Event.msg_key)
            .where(Event.type == "reply", *scope)
        ) or 0
        type_ = func.coalesce(Event.type, "")
        by_type = dict(session.execute(
            select(type_, func.count()).where(*event_scope).group_by(type_)
        ).all())
        rejected = session.scalar(
            select(func.count()).select_from(Rejected)
            .where(*_window(Rejected.received_at, since, until))
        ) or 0
        return Stats(
            since=since, until=until, p_transaction_id=p_transaction_id,
            total=sum(by_status.values()),
            by_status={s.value: by_status.get(s.value, 0) for s in Status},
            by_status_extended=by_ext,
            funnel=Funnel(sent=sent, delivered=delivered, seen=seen, replied=replied),
            events_by_type={t: by_type.get(t, 0) for t in ("delivery", "seen", "reply")},
            rejected=rejected,
        )

    return await database.session(read)


def _bucket_of(col: Any, dialect: str, bucket_seconds: int) -> ColumnElement[Any]:
    """The bucket number of a time, as a whole number on both backends: a true division
    would make every second its own bucket (SQLAlchemy 2's `/` is true division)."""
    if dialect == "postgresql":
        return func.floor(func.extract("epoch", col) / bucket_seconds)
    return func.cast(func.strftime("%s", col), Integer) // bucket_seconds


TIMELINE_WINDOW = timedelta(days=2)


@router.get("/timeline", response_model=Timeline, responses=API_ERROR_RESPONSES | {
    422: {"description": "a parameter is invalid, or `since` is more than 2 days before "
                         "`until` (or now): the window is limited to 2 days"}})
async def timeline(
    database: DatabaseDep,
    since: Annotated[UtcDateTime, Query(
        description="ISO 8601 (no zone: UTC); inclusive; at most 2 days before `until`")],
    until: Annotated[UtcDateTime | None, Query(
        description="ISO 8601 (no zone: UTC); exclusive; default now")] = None,
    bucket_seconds: Annotated[int, Query(ge=10, le=86400)] = 60,
) -> Timeline:
    """Notifications received per time bucket, by type (the dashboard's activity chart).

    The window from `since` to `until` is at most 2 days; buckets start at whole multiples
    of `bucket_seconds` since the epoch."""
    start, end = since, until or utcnow()
    if end - start > TIMELINE_WINDOW:
        raise invalid(("query", "since"), "the window is limited to 2 days")

    def read(session: Session) -> list[Any]:
        bucket = _bucket_of(Event.received_at, session.get_bind().dialect.name, bucket_seconds)
        return list(session.execute(
            select(bucket.label("b"), Event.type, func.count())
            .where(Event.received_at >= start, Event.received_at < end)
            .group_by("b", Event.type)
        ).all())

    rows = await database.session(read)
    points: dict[int, dict[str, int]] = {}
    for b, type_, n in rows:
        points.setdefault(int(b), {})[type_] = n
    return Timeline(bucket_seconds=bucket_seconds, points=[
        TimelinePoint(t=datetime.fromtimestamp(b * bucket_seconds, UTC),
                      delivery=c.get("delivery", 0), seen=c.get("seen", 0),
                      reply=c.get("reply", 0))
        for b, c in sorted(points.items())
    ])


def _decoded(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@router.get("/rejected", response_model=Page[RejectedItem])
async def list_rejected(database: DatabaseDep, limit: Limit = 100, cursor: Cursor = None
                        ) -> Page[RejectedItem]:
    """Callbacks kept as invalid, newest first, with the reason and the content as received."""

    def read(session: Session) -> Page[RejectedItem]:
        query = select(Rejected).order_by(Rejected.id.desc()).limit(limit + 1)
        after = decode_cursor(cursor)
        if after is not None:
            query = query.where(Rejected.id < after)
        rows, next_cursor = _page(list(session.scalars(query)), limit, lambda r: r.id)
        items = [
            RejectedItem(id=r.id, reason=r.reason, raw=_decoded(r.body or r.query), method=r.method,
                         content_type=r.content_type, query=_decoded(r.query),
                         source_ip=r.source_ip, received_at=r.received_at)
            for r in rows
        ]
        return Page[RejectedItem](items=items, next_cursor=next_cursor)

    return await database.session(read)
