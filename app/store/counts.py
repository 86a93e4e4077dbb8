"""Counts for the dashboard's reads: stats, the timeline and the campaign list, read from counts
kept as the data is written rather than by scanning messages and events.

Database triggers (migrations/versions/2026-12-07-1300_campaign_counts.py) insert delta rows
in the same transaction as the rows they count: a message in the minute it was first known,
by status and how far it got; a notification in the minute it was received; a message's
status_extended as it shows it; a campaign over its whole life. Nobody updates a shared
row, so writers (a second worker, a replica) never wait for each other on a counter. Reads
sum the rows of the minutes they cover, and a background squash (`Squasher`) folds the rows
of one key into one, so a read costs the minutes of its window, not the rows counted.

A window that does not start or end on a whole minute is exact all the same: the counts
cover its whole minutes and its two partial minutes are counted from the rows themselves
(`_scan`), a read bounded by the traffic of two minutes. Design and measurements:
docs/decisions/squashable-counts.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    case,
    func,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from app.core.notifications import SHOWN_PREFIX, SMS_KIND, STORED_PREFIX
from app.store.models import CampaignCount, CodeCount, Event, Message, MessageCount, Rejected

log = logging.getLogger(__name__)

ALL = "*"  # the campaign of the counts over every message
STATUS_COLUMNS = ("messages", "accepted", "in_process", "delivered", "undelivered", "seen",
                  "reached", "opened", "replied")
EVENT_COLUMNS = ("ev_delivery", "ev_seen", "ev_reply")
MINUTE = timedelta(minutes=1)
SQUASH_SECONDS = 5.0
# SQLite squashes on the Ingestor's thread, between batches: under a full burst (6,000
# callbacks/s, a few delta rows each) five seconds' rows took about 100 ms to fold, and the
# callbacks waiting behind it made the ingest p99 108-130 ms against 18 without the counts.
# A squash a second folds a fifth as much at a time.
SQLITE_SQUASH_SECONDS = 1.0
# Keeps two replicas from squashing at the same moment (each would only wait for the other).
SQUASH_LOCK = 0x444C5253

MC = cast(Table, MessageCount.__table__)
CC = cast(Table, CodeCount.__table__)
KC = cast(Table, CampaignCount.__table__)
M = cast(Table, Message.__table__)
E = cast(Table, Event.__table__)
R = cast(Table, Rejected.__table__)


@dataclass
class Totals:
    """Counts over a window: messages first known in it (STATUS_COLUMNS), notifications
    received in it (EVENT_COLUMNS), rejected callbacks, and messages by the code they show."""

    values: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, int], codes: dict[str, int]) -> None:
        for name, n in values.items():
            self.values[name] = self.values.get(name, 0) + int(n or 0)
        for code, n in codes.items():
            self.codes[code] = self.codes.get(code, 0) + int(n or 0)

    def get(self, name: str) -> int:
        return self.values.get(name, 0)


def floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def ceil_minute(t: datetime) -> datetime:
    floor = floor_minute(t)
    return floor if floor == t else floor + MINUTE


def within(column: Any, since: datetime | None, until: datetime | None
           ) -> list[ColumnElement[bool]]:
    """Conditions: `column` in [since, until), either end open when None."""
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(column >= since)
    if until is not None:
        conds.append(column < until)
    return conds


def shown_code(kind: Any, code: Any) -> ColumnElement[Any]:
    """SQL: the status_extended a message shows (app/core/notifications.shown_status_extended)."""
    return case((and_(kind.is_not(None), kind != SMS_KIND,
                      func.substr(code, 1, len(STORED_PREFIX)) == STORED_PREFIX),
                 SHOWN_PREFIX + func.substr(code, len(STORED_PREFIX) + 1)), else_=code)


def _status_expressions() -> dict[str, ColumnElement[Any]]:
    def flag(cond: ColumnElement[bool]) -> ColumnElement[Any]:
        return func.sum(case((cond, 1), else_=0))

    return {
        "messages": func.count(),
        **{s: flag(M.c.status == s)
           for s in ("accepted", "in_process", "delivered", "undelivered", "seen")},
        "reached": func.count(M.c.delivered_at), "opened": func.count(M.c.seen_at),
        "replied": flag(M.c.reply_events > 0),
    }


def _scan(conn: Connection, since: datetime, until: datetime, campaign: str) -> Totals:
    """Count [since, until) from the rows themselves (the partial minutes of a window)."""
    totals = Totals()
    mine = [] if campaign == ALL else [M.c.campaign == campaign]
    status = _status_expressions()
    row = conn.execute(select(*status.values())
                       .where(*within(M.c.created_at, since, until), *mine)).one()
    code = shown_code(M.c.kind, M.c.status_extended)
    codes = {c: n for c, n in conn.execute(
        select(code, func.count()).where(*within(M.c.created_at, since, until), *mine,
                                         M.c.status_extended.is_not(None)).group_by(code))}
    totals.add(dict(zip(status, row, strict=True)), codes)
    events = select(E.c.type, func.count()).where(*within(E.c.received_at, since, until))
    if campaign != ALL:
        events = events.join(M, M.c.msg_key == E.c.msg_key).where(M.c.campaign == campaign)
    totals.add({f"ev_{t}": n for t, n in conn.execute(events.group_by(E.c.type))}, {})
    if campaign == ALL:
        totals.add({"rejected": conn.execute(select(func.count()).select_from(R).where(
            *within(R.c.received_at, since, until))).scalar_one()}, {})
    return totals


def _summed(conn: Connection, since: datetime | None, until: datetime | None,
            campaign: str) -> Totals:
    """The counts of the whole minutes in [since, until) (both on a minute, or None)."""
    totals = Totals()
    names = [*STATUS_COLUMNS, *EVENT_COLUMNS, "rejected"]
    where = [MC.c.campaign == campaign, *within(MC.c.bucket, since, until)]
    row = conn.execute(select(*(func.sum(MC.c[n]) for n in names)).where(*where)).one()
    codes = {c: n for c, n in conn.execute(
        select(CC.c.code, func.sum(CC.c.n))
        .where(CC.c.campaign == campaign, *within(CC.c.bucket, since, until))
        .group_by(CC.c.code))}
    totals.add(dict(zip(names, row, strict=True)), codes)
    return totals


def window(conn: Connection, *, since: datetime | None, until: datetime | None,
           campaign: str = ALL) -> Totals:
    """Exact counts of [since, until) (None: open), for every message or one campaign."""
    if since is not None and until is not None and until <= since:
        return Totals()
    if since is not None and until is not None and floor_minute(since) == floor_minute(until):
        return _scan(conn, since, until, campaign)  # within one minute
    start = ceil_minute(since) if since is not None else None
    end = floor_minute(until) if until is not None else None
    totals = _summed(conn, start, end, campaign)
    for edge in ((since, start), (end, until)):
        if edge[0] is not None and edge[1] is not None and edge[0] < edge[1]:
            extra = _scan(conn, edge[0], edge[1], campaign)
            totals.add(extra.values, extra.codes)
    totals.codes = {c: n for c, n in totals.codes.items() if n}
    return totals


def timeline(conn: Connection, *, since: datetime, until: datetime, bucket_seconds: int,
             campaign: str = ALL) -> dict[int, dict[str, int]]:
    """Notifications received per bucket of `bucket_seconds` (a multiple of 60) by type:
    {bucket number since the epoch: {"delivery": n, ...}}, from the minute counts plus the
    window's partial minutes."""
    assert bucket_seconds % 60 == 0
    points: dict[int, dict[str, int]] = {}

    def add(at: datetime, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            if n:
                point = points.setdefault(int(at.timestamp()) // bucket_seconds, {})
                point[name] = point.get(name, 0) + int(n)

    start, end = ceil_minute(since), floor_minute(until)
    if start < end:
        sums = [func.sum(MC.c[c]) for c in EVENT_COLUMNS]
        for bucket, *ns in conn.execute(
                select(MC.c.bucket, *sums)
                .where(MC.c.campaign == campaign, MC.c.bucket >= start, MC.c.bucket < end)
                .group_by(MC.c.bucket)):
            add(_aware(bucket), dict(zip(("delivery", "seen", "reply"), ns, strict=True)))
    edges = [(since, until)] if start >= end else [(since, start), (end, until)]
    for a, b in edges:
        if a < b:
            events = select(E.c.type, func.count()).where(E.c.received_at >= a,
                                                          E.c.received_at < b)
            if campaign != ALL:
                events = events.join(M, M.c.msg_key == E.c.msg_key).where(
                    M.c.campaign == campaign)
            add(a, dict(conn.execute(events.group_by(E.c.type)).all()))
    return {b: point for b, point in points.items() if any(point.values())}


def _aware(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite's text, read without the column's type
        value = datetime.fromisoformat(value)
    return cast(datetime, value).replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass(frozen=True)
class CampaignTotals:
    campaign: str
    values: dict[str, int]
    first_at: datetime | None
    last_at: datetime | None


def campaigns(conn: Connection, *, since: datetime | None, until: datetime | None,
              limit: int, offset: int) -> list[CampaignTotals]:
    """Campaigns active in [since, until), the most recently active first: their lifetime
    counts (read off one row each once squashed)."""
    sums = [func.sum(KC.c[c]).label(c) for c in STATUS_COLUMNS]
    last = func.max(KC.c.last_at)
    first = func.min(KC.c.first_at)
    query = select(KC.c.campaign, *sums, first, last).group_by(KC.c.campaign)
    having = [func.sum(KC.c.messages) != 0]  # a campaign whose messages were all purged
    if since is not None:
        having.append(last >= since)
    if until is not None:
        having.append(first < until)
    query = query.having(*having)
    rows = conn.execute(query.order_by(last.desc(), KC.c.campaign)
                        .limit(limit).offset(offset)).all()
    return [CampaignTotals(r[0], dict(zip(STATUS_COLUMNS, (int(v or 0) for v in r[1:-2]),
                                          strict=True)),
                           _aware(r[-2]) if r[-2] is not None else None,
                           _aware(r[-1]) if r[-1] is not None else None)
            for r in rows]


# --- squashing ---------------------------------------------------------------------------------

def _recent_keys(table: Table, key: list[str], since_id: int, *, sqlite: bool = False) -> str:
    """SQL: the keys of the rows added since `since_id` (the rows of other keys are one each
    already: only these can need folding, so a squash costs what was added since the last).
    SQLite's planner preferred walking the whole (campaign, bucket) index for the GROUP BY
    to the id range (5 ms against 0.5 ms at 26,000 count rows, twice a table a squash, and a
    purge squashes every batch): NOT INDEXED leaves it the range (the rowid stays usable)."""
    keys = ", ".join(key)
    hint = " NOT INDEXED" if sqlite else ""
    return f"SELECT {keys} FROM {table.name}{hint} WHERE id > {int(since_id)} GROUP BY {keys}"


def _squash_pg(conn: Connection, table: Table, key: list[str], sums: list[str],
               extremes: dict[str, str], since_id: int) -> int:
    """Fold every key with more than one row into one, atomically: the sums are of exactly
    the rows the same statement deleted (a writer's row committed meanwhile stays)."""
    keys = ", ".join(key)
    folded = ", ".join([*(f"sum({c})" for c in sums),
                        *(f"{fn}({c})" for c, fn in extremes.items())])
    columns = ", ".join([*key, *sums, *extremes])
    join = " AND ".join(f"t.{k} = d.{k}" for k in key)
    on = " AND ".join(f"t.{k} = r.{k}" for k in key)
    result = conn.exec_driver_sql(f"""
        WITH recent AS ({_recent_keys(table, key, since_id)}),
        dup AS (SELECT {", ".join(f"t.{k}" for k in key)} FROM {table.name} t JOIN recent r
                ON {on} GROUP BY {", ".join(f"t.{k}" for k in key)} HAVING count(*) > 1),
        gone AS (DELETE FROM {table.name} t USING dup d WHERE {join} RETURNING t.*)
        INSERT INTO {table.name} ({columns})
        SELECT {keys}, {folded} FROM gone GROUP BY {keys}""")
    return int(result.rowcount)


def _squash_sqlite(conn: Connection, table: Table, key: list[str], sums: list[str],
                   extremes: dict[str, str], since_id: int) -> int:
    """The same in two statements: one SQLite writer at a time, so none can come between."""
    keys = ", ".join(key)
    top = conn.exec_driver_sql(f"SELECT max(id) FROM {table.name}").scalar()
    if top is None or top <= since_id:
        return 0
    dup = (f"SELECT {keys} FROM {table.name} WHERE id <= {int(top)} AND ({keys}) IN "
           f"({_recent_keys(table, key, since_id, sqlite=True)}) GROUP BY {keys} "
           "HAVING count(*) > 1")
    folded = ", ".join([*(f"sum({c})" for c in sums),
                        *(f"{fn}({c})" for c, fn in extremes.items())])
    columns = ", ".join([*key, *sums, *extremes])
    inserted = conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({columns}) SELECT {keys}, {folded} FROM {table.name} "
        f"WHERE id <= {int(top)} AND ({keys}) IN ({dup}) GROUP BY {keys}").rowcount
    conn.exec_driver_sql(f"DELETE FROM {table.name} WHERE id <= {int(top)} AND ({keys}) IN "
                         f"({dup})")
    return int(inserted)


SQUASHED: tuple[tuple[Table, list[str], list[str], dict[str, str]], ...] = (
    (MC, ["bucket", "campaign"], [*STATUS_COLUMNS, *EVENT_COLUMNS, "rejected"], {}),
    (CC, ["bucket", "campaign", "code"], ["n"], {}),
    (KC, ["campaign"], list(STATUS_COLUMNS), {"first_at": "min", "last_at": "max"}),
)


def high_marks(conn: Connection) -> tuple[int, ...]:
    """The highest row id of each counts table: what a squash has seen."""
    return tuple(int(conn.exec_driver_sql(f"SELECT coalesce(max(id), 0) FROM {t.name}").scalar()
                     or 0) for t, *_ in SQUASHED)


def squash(conn: Connection, since: tuple[int, ...] | None = None) -> int:
    """Fold the delta rows of each key into one, in the caller's transaction; how many keys
    were folded. `since`: the `high_marks` of the last squash (only keys with rows added
    after them are looked at; None: every key). On PostgreSQL only one process squashes at a
    time (the others skip)."""
    if conn.dialect.name == "postgresql":
        if not conn.exec_driver_sql(
                f"SELECT pg_try_advisory_xact_lock({SQUASH_LOCK})").scalar():
            return 0
        fold = _squash_pg
    else:
        fold = _squash_sqlite
    marks = since or (0,) * len(SQUASHED)
    return sum(fold(conn, *spec, mark) for spec, mark in zip(SQUASHED, marks, strict=True))


def recount(conn: Connection) -> None:
    """Count every stored row afresh, in the caller's transaction: for rows written behind
    the write path's back (a set-based seed, a manual repair), which SQLite's write path does
    not see (app/store/batch_counts.py). A campaign's notifications are counted under the
    label their message has now."""
    pg = conn.dialect.name == "postgresql"

    def minute(column: str) -> str:
        return f"date_trunc('minute', {column})" if pg else \
            f"substr({column}, 1, 16) || ':00.000000'"

    def flag(cond: str) -> str:
        return f"sum(({cond})::int)" if pg else f"sum({cond})"

    status = ", ".join(["count(*)", *(flag(f"m.status = '{s}'") for s in STATUS_COLUMNS[1:6]),
                        "count(m.delivered_at)", "count(m.seen_at)", flag("m.reply_events > 0")])
    by_type = ", ".join(flag(f"e.type = '{t}'") for t in ("delivery", "seen", "reply"))
    shown = str(shown_code(M.c.kind, M.c.status_extended).compile(
        dialect=conn.dialect, compile_kwargs={"literal_binds": True})).replace("messages.", "m.")
    for table in ("message_counts", "code_counts", "campaign_counts"):
        conn.exec_driver_sql(f"DELETE FROM {table}")
    columns = ", ".join(STATUS_COLUMNS)
    for per in ("'*'", "m.campaign"):
        conn.exec_driver_sql(
            f"INSERT INTO message_counts (bucket, campaign, {columns}) "
            f"SELECT {minute('m.created_at')}, {per}, {status} FROM messages m "
            f"WHERE {per} IS NOT NULL GROUP BY 1, 2")
        conn.exec_driver_sql(
            f"INSERT INTO code_counts (bucket, campaign, code, n) "
            f"SELECT {minute('m.created_at')}, {per}, {shown}, count(*) FROM messages m "
            f"WHERE {per} IS NOT NULL AND m.status_extended IS NOT NULL GROUP BY 1, 2, 3")
        conn.exec_driver_sql(
            f"INSERT INTO message_counts (bucket, campaign, {', '.join(EVENT_COLUMNS)}) "
            f"SELECT {minute('e.received_at')}, {per}, {by_type} FROM events e "
            f"LEFT JOIN messages m ON m.msg_key = e.msg_key WHERE {per} IS NOT NULL "
            "GROUP BY 1, 2")
    conn.exec_driver_sql(
        f"INSERT INTO campaign_counts (campaign, {columns}, first_at, last_at) "
        f"SELECT m.campaign, {status}, min(m.created_at), max(m.updated_at) FROM messages m "
        "WHERE m.campaign IS NOT NULL GROUP BY 1")
    conn.exec_driver_sql(
        f"INSERT INTO message_counts (bucket, campaign, rejected) "
        f"SELECT {minute('r.received_at')}, '*', count(*) FROM rejected r GROUP BY 1")
    squash(conn)


DbRunner = Callable[..., Awaitable[Any]]


class Squasher:
    """Squashes the counts every SQUASH_SECONDS while the app runs, on the database thread
    the app gives it (on SQLite the Ingestor's, taking turns with the write path's batches,
    every SQLITE_SQUASH_SECONDS)."""

    def __init__(self, engine: Engine, run_db: DbRunner) -> None:
        self.engine = engine
        self._run_db = run_db
        self._task: asyncio.Task[None] | None = None
        self._marks: tuple[int, ...] | None = None  # None: the first squash looks at all

    def _once(self) -> int:
        # The marks are read before the squash: rows a writer adds meanwhile are looked at
        # next time. Another replica's squash may have folded keys of ours: that is fine.
        with self.engine.begin() as conn:
            marks = high_marks(conn)
            folded = squash(conn, self._marks)
        self._marks = marks
        return folded

    async def run_once(self) -> int:
        return int(await self._run_db(self._once))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SQLITE_SQUASH_SECONDS if self.engine.dialect.name == "sqlite"
                                else SQUASH_SECONDS)
            try:
                await self.run_once()
            except SQLAlchemyError as exc:  # the database is away: the next round tries again
                log.info("counts: squash skipped (%s)", str(exc).splitlines()[0])

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dlr-squash")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
