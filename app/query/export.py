"""Export: every matching message, one row per recipient, streamed from the database in keyset
chunks (a campaign of millions never sits in memory), as CSV or NDJSON. The REST route and
`dlr export` write the same rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Connection, Select, bindparam, case, select, tuple_

from app.core.notifications import Status
from app.query.common import Since, Until
from app.store.counts import shown_code
from app.store.db import Database
from app.store.models import Event, Message
from app.web.routing import api_router

COLUMNS = ("msg_id", "campaign", "p_transaction_id", "phone", "status", "status_extended",
           "sent_at", "delivered_at", "seen_at", "last_reply_text", "last_reply_at")
CHUNK = 5000
_M = Message.__table__.c
_E = Event.__table__.c


class Format(StrEnum):
    csv = "csv"
    ndjson = "ndjson"


@dataclass(frozen=True)
class Filters:
    campaign: str | None = None
    p_transaction_id: str | None = None
    status: Status | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, Any]:
        values = {"campaign": self.campaign, "p_transaction_id": self.p_transaction_id,
                  "status": self.status.value if self.status else None,
                  "since": self.since, "until": self.until}
        return {k: v for k, v in values.items() if v is not None}


def _last_reply(column: Any) -> Any:
    """The latest reply's text or time, looked up only for messages that have one."""
    latest = (select(column).where(_E.msg_key == _M.msg_key, _E.type == "reply")
              .order_by(_E.id.desc()).limit(1).scalar_subquery())
    return case((_M.reply_events > 0, latest), else_=None)


_EQUAL = ("campaign", "p_transaction_id", "status")


@lru_cache(maxsize=64)
def _statement(filters: tuple[str, ...], first: bool) -> Select[Any]:
    """A chunk: oldest first, along the index of an equality filter (it ends in the id), or
    along (created_at, id) for a time window alone, after the last row of the previous one."""
    conds = [_M[name] == bindparam(name) for name in filters if name in _EQUAL]
    if "since" in filters:
        conds.append(_M.created_at >= bindparam("since"))
    if "until" in filters:
        conds.append(_M.created_at < bindparam("until"))
    by_time = not any(name in _EQUAL for name in filters) and bool(
        {"since", "until"} & set(filters))
    if not first:
        conds.append(tuple_(_M.created_at, _M.id) > tuple_(bindparam("after_at"),
                                                           bindparam("after"))
                     if by_time else _M.id > bindparam("after"))
    order = (_M.created_at, _M.id) if by_time else (_M.id,)
    return (select(_M.msg_id, _M.campaign, _M.p_transaction_id, _M.phone, _M.status,
                   shown_code(_M.kind, _M.status_extended), _M.sent_at, _M.delivered_at,
                   _M.seen_at, _last_reply(_E.text), _last_reply(_E.received_at),
                   _M.id, _M.created_at)
            .where(*conds).order_by(*order).limit(bindparam("chunk")))


def _time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite's stored text, read without the column's type
        value = datetime.fromisoformat(value)
    text: str = value.isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z") if "+" in text else text + "Z"


def _record(row: Sequence[Any]) -> dict[str, Any]:
    values = dict(zip(COLUMNS, row[:len(COLUMNS)], strict=True))
    for name in ("sent_at", "delivered_at", "seen_at", "last_reply_at"):
        values[name] = _time(values[name])
    return values


def _encode(rows: list[dict[str, Any]], fmt: Format, header: bool) -> str:
    if fmt is Format.ndjson:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _next(filters: Filters, rows: list[Any]) -> dict[str, Any]:
    last = rows[-1]
    return {"after": int(last[-2]), "after_at": last[-1]}


def chunks_sync(conn: Connection, filters: Filters, fmt: Format) -> Iterator[tuple[str, int]]:
    """The export as text chunks and the rows each holds, on a synchronous connection."""
    params = filters.params()
    names = tuple(params)
    after: dict[str, Any] = {}
    header = True
    while True:
        rows = list(conn.execute(_statement(names, not after), params | after | {"chunk": CHUNK}))
        if rows or header:
            yield _encode([_record(r) for r in rows], fmt, header), len(rows)
        header = False
        if len(rows) < CHUNK:
            return
        after = _next(filters, rows)


async def chunks(database: Database, filters: Filters, fmt: Format) -> AsyncIterator[bytes]:
    """The same, read on the app's read pool (PostgreSQL) or its read threads (SQLite)."""
    params = filters.params()
    names = tuple(params)
    after: dict[str, Any] = {}
    header = True
    while True:
        rows = await database.read_rows(_statement(names, not after),
                                        params | after | {"chunk": CHUNK})
        if rows or header:
            yield _encode([_record(r) for r in rows], fmt, header).encode()
        header = False
        if len(rows) < CHUNK:
            return
        after = _next(filters, rows)


router = api_router(tags=["api"])
MEDIA = {Format.csv: "text/csv; charset=utf-8", Format.ndjson: "application/x-ndjson"}


@router.get("/messages/export", response_class=StreamingResponse, responses={
    200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
          "description": "every matching message, one row per recipient"}})
async def export_messages(
    request: Request,
    campaign: Annotated[str | None, Query(max_length=64)] = None,
    p_transaction_id: str | None = None,
    status: Status | None = None,
    since: Since = None,
    until: Until = None,
    format: Format = Format.csv,  # noqa: A002 - the contract's parameter name
) -> StreamingResponse:
    """Every matching message (msg_id, campaign, p_transaction_id, phone, status,
    status_extended, sent_at, delivered_at, seen_at, last reply text and time), streamed in
    chunks: CSV with a header line, or one JSON object a line."""
    filters = Filters(campaign, p_transaction_id, status, since, until)
    name = f"messages-{campaign or 'all'}.{format.value}"
    # A header is Latin-1: an ASCII name for every client, the real one (RFC 6266) beside it.
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_"
                    for c in name)
    disposition = f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name)}"
    return StreamingResponse(chunks(request.app.state.database, filters, format),
                             media_type=MEDIA[format],
                             headers={"Content-Disposition": disposition})


