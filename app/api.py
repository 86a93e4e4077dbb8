"""The REST query routes under /api/v1 (reads only; sending lives in app/send_api.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Executable,
    Integer,
    Select,
    bindparam,
    func,
    select,
)
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from app.db import utcnow
from app.models import Event, Message, Rejected
from app.notifications import Status, msg_key
from app.schemas import (
    EventOut,
    Funnel,
    MessageOut,
    MessageSummary,
    Page,
    RejectedItem,
    ReplyItem,
    ReplyOut,
    Stats,
    Timeline,
    TimelinePoint,
    invalid,
)
from app.security import check_api_access, require_api_access

router = APIRouter(prefix="/api/v1", tags=["api"], dependencies=[Depends(require_api_access)])


async def get_engine(request: Request) -> Engine:
    return request.app.state.reader  # type: ignore[no-any-return]


# Routes open their session inside their own worker thread and close it there, so a
# connection is never held while waiting for a thread to tear a dependency down.
EngineDep = Annotated[Engine, Depends(get_engine)]
Limit = Annotated[int, Query(ge=1, le=1000, description="Items per page")]
# The cursor is the id of the last row seen: pages are keyset ranges below it. Its pattern
# is in the schema, so any cursor the schema allows is a valid one.
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page",
                                     pattern=r"^[0-9]{1,18}$")]
Since = Annotated[datetime | None, Query(description="ISO 8601; inclusive")]
Until = Annotated[datetime | None, Query(description="ISO 8601; exclusive")]


def encode_cursor(last_id: int) -> str:
    return str(last_id)


def decode_cursor(cursor: str | None) -> int | None:
    return None if cursor is None else int(cursor)


def _page(rows: list[object], limit: int, id_of: object) -> tuple[list[object], str | None]:
    """Keyset pages, newest first: rows were fetched with limit + 1 to see if more follow."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(id_of(rows[-1])) if more and rows else None  # type: ignore[operator]


_SUMMARY_COLUMNS = [Message.__table__.c[name] for name in MessageSummary.model_fields]
_EVENT_COLUMNS = [Event.__table__.c[name] for name in EventOut.model_fields]


# Built once: constructing a statement costs more than running this indexed lookup.
_LOOKUP = (
    select(*_SUMMARY_COLUMNS, *(c.label(f"e_{c.name}") for c in _EVENT_COLUMNS))
    .select_from(Message.__table__.outerjoin(Event.__table__, Event.msg_key == Message.msg_key))
    .where(Message.msg_key == bindparam("key"))
    .order_by(Event.id)
)


def message_from_rows(rows: Sequence[Sequence[Any]], msg_id: str) -> MessageOut:
    """Build the answer from the rows of _LOOKUP; 404 HTTPException when there are none."""
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no message with msg_id {msg_id!r}")
    n = len(_SUMMARY_COLUMNS)
    events = [EventOut(**dict(zip(EventOut.model_fields, r[n:], strict=True)))
              for r in rows if r[n] is not None]
    return MessageOut(
        **dict(zip(MessageSummary.model_fields, rows[0][:n], strict=True)),
        replies=[ReplyOut(text=e.text or "", received_at=e.received_at)
                 for e in events if e.type == "reply"],
        events=events,
    )


def load_message(conn: Connection, msg_id: str) -> MessageOut:
    """A message with its timeline, in one round trip (also used by `dlr status`)."""
    return message_from_rows(conn.execute(_LOOKUP, {"key": msg_key(msg_id)}).all(), msg_id)


_POSTGRESQL = psycopg_dialect()


@lru_cache(maxsize=256)
def _postgresql_sql(statement: Executable) -> str:
    """SQL text of one of this module's prebuilt statements, compiled once: compiling costs
    more than running an indexed read (a third of a page's time when done per request)."""
    return str(statement.compile(dialect=_POSTGRESQL))


def _all_rows(engine: Engine, statement: Executable, params: dict[str, Any]) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(statement, params).all())


async def read_rows(state: Any, statement: Executable, params: dict[str, Any], *,
                    thread: bool = True) -> list[Any]:
    """Run a prebuilt read without holding up the event loop that answers the callbacks.

    PostgreSQL: on an async psycopg pool in autocommit (a worker thread's hand-off and its
    fight for the GIL cost more than the query). SQLite: in a worker thread, since rows not
    in cache can take milliseconds; `thread=False` reads on the loop, for the one-row lookup
    where a local read is cheaper than any hand-off.
    """
    pool: AsyncConnectionPool | None = state.read_pool
    if pool is None:
        if thread:
            return await run_in_threadpool(_all_rows, state.reader, statement, params)
        return _all_rows(state.reader, statement, params)
    async with pool.connection() as conn:
        cursor = await conn.execute(_postgresql_sql(statement), params)
        return await cursor.fetchall()


async def fetch_message(state: Any, msg_id: str) -> MessageOut:
    """A message with its timeline, in one round trip."""
    rows = await read_rows(state, _LOOKUP, {"key": msg_key(msg_id)}, thread=False)
    return message_from_rows(rows, msg_id)


@router.get("/messages/{msg_id}", response_model=MessageOut,
            responses={404: {"description": "unknown msg_id"}})
async def get_message(msg_id: str, request: Request) -> Response:
    """A message's current status and full timeline (msg_id of UUID form in any letter case).

    The documented route; requests normally arrive through `message_asgi` below instead.
    """
    message = await fetch_message(request.app.state, msg_id)
    return Response(message.model_dump_json(), media_type="application/json")


MESSAGE_PREFIX = "/api/v1/messages/"


def is_message_path(scope: Scope) -> bool:
    path: str = scope["path"]
    return (scope["method"] == "GET" and path.startswith(MESSAGE_PREFIX)
            and "/" not in path[len(MESSAGE_PREFIX):] and len(path) > len(MESSAGE_PREFIX))


async def message_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """The single-message lookup ahead of FastAPI's routing and dependency solving, which
    cost more than the lookup itself (measured: 0.30 of /healthz through FastAPI). Same
    access rule, same answers, same JSON errors."""
    request = Request(scope, receive)
    response: Response
    try:
        check_api_access(request)
        message = await fetch_message(request.app.state, scope["path"][len(MESSAGE_PREFIX):])
        response = Response(message.model_dump_json(), media_type="application/json")
    except HTTPException as exc:
        response = await http_exception_handler(request, exc)
    except (SQLAlchemyError, psycopg.Error, PoolTimeout):
        response = JSONResponse({"detail": "database unavailable"}, status_code=503)
    await response(scope, receive, send)


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


@lru_cache(maxsize=2 ** len(_LIST_FILTERS))  # every subset of the filters
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
    rows = await read_rows(request.app.state, _list_statement(tuple(params)),
                           params | {"limit": limit + 1})
    rows, next_cursor = _page(rows, limit, lambda r: r[-1])  # type: ignore[arg-type]
    n = len(_SUMMARY_COLUMNS)
    page = Page[MessageSummary](
        items=[MessageSummary(**dict(zip(MessageSummary.model_fields, r[:n], strict=True)))
               for r in rows],  # type: ignore[index]
        next_cursor=next_cursor,
    )
    return Response(page.model_dump_json(), media_type="application/json")


@router.get("/replies", response_model=Page[ReplyItem])
def list_replies(
    engine: EngineDep, since: Since = None, limit: Limit = 100, cursor: Cursor = None
) -> Page[ReplyItem]:
    """Subscribers' replies, newest first, with the message they answer."""
    with Session(engine) as session:
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
            for e, m in rows  # type: ignore[misc]
        ]
        return Page[ReplyItem](items=items, next_cursor=next_cursor)


def _window(col: Any, since: datetime | None, until: datetime | None
            ) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(col >= since)
    if until is not None:
        conds.append(col < until)
    return conds


@router.get("/stats", response_model=Stats)
def stats(engine: EngineDep, since: Since = None, until: Until = None,
          p_transaction_id: str | None = None) -> Stats:
    """Messages first known in the window (optionally one p_transaction_id): by status, by
    status_extended, and the funnel sent → delivered → seen → replied; events by type."""
    scope = _window(Message.created_at, since, until)
    if p_transaction_id is not None:
        scope.append(Message.p_transaction_id == p_transaction_id)
    event_scope = _window(Event.received_at, since, until)
    if p_transaction_id is not None:
        event_scope.append(Event.p_transaction_id == p_transaction_id)
    with Session(engine) as session:
        # Grouping on an expression, not the bare column: otherwise SQLite walks the whole
        # (status, id) index to group instead of the time range (1.2 s vs 10 ms at 1M rows).
        status_ = func.coalesce(Message.status, "")
        by_status = dict(session.execute(
            select(status_, func.count()).where(*scope).group_by(status_)
        ).all())
        by_ext = dict(session.execute(
            select(Message.status_extended, func.count())
            .where(Message.status_extended.is_not(None), *scope)
            .group_by(Message.status_extended)
        ).all())
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


@router.get("/timeline", response_model=Timeline)
def timeline(
    engine: EngineDep,
    since: Annotated[datetime, Query(description="ISO 8601; at most 2 days before until")],
    until: Until = None,
    bucket_seconds: Annotated[int, Query(ge=10, le=86400)] = 60,
) -> Timeline:
    """Notifications received per time bucket, by type (the dashboard's activity chart)."""
    end = until or utcnow()
    if end - since > timedelta(days=2):
        raise invalid(("query", "since"), "the window is limited to 2 days")
    with Session(engine) as session:
        if session.get_bind().dialect.name == "postgresql":
            epoch: Any = func.floor(func.extract("epoch", Event.received_at) / bucket_seconds)
        else:
            epoch = func.cast(func.strftime("%s", Event.received_at), Integer) / bucket_seconds
        rows = session.execute(
            select(epoch.label("b"), Event.type, func.count())
            .where(Event.received_at >= since, Event.received_at < end)
            .group_by("b", Event.type)
        ).all()
    points: dict[int, dict[str, int]] = {}
    for bucket, type_, n in rows:
        points.setdefault(int(bucket), {})[type_] = n
    return Timeline(bucket_seconds=bucket_seconds, points=[
        TimelinePoint(t=datetime.fromtimestamp(b * bucket_seconds, UTC),
                      delivery=c.get("delivery", 0), seen=c.get("seen", 0),
                      reply=c.get("reply", 0))
        for b, c in sorted(points.items())
    ])


def _decoded(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@router.get("/rejected", response_model=Page[RejectedItem])
def list_rejected(engine: EngineDep, limit: Limit = 100, cursor: Cursor = None
                  ) -> Page[RejectedItem]:
    """Callbacks kept as invalid, newest first, with the reason and the content as received."""
    with Session(engine) as session:
        query = select(Rejected).order_by(Rejected.id.desc()).limit(limit + 1)
        after = decode_cursor(cursor)
        if after is not None:
            query = query.where(Rejected.id < after)
        rows, next_cursor = _page(list(session.scalars(query)), limit, lambda r: r.id)
        items = [
            RejectedItem(id=r.id, reason=r.reason, raw=_decoded(r.body or r.query), method=r.method,
                         content_type=r.content_type, query=_decoded(r.query),
                         source_ip=r.source_ip, received_at=r.received_at)
            for r in rows  # type: ignore[attr-defined]
        ]
        return Page[RejectedItem](items=items, next_cursor=next_cursor)
