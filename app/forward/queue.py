"""The dispatcher's SQL: claim due deliveries under a lease, record what came of them.

A claim sets `lease_until` and `lease_token` on rows that are due and not leased; other
dispatchers (replicas) skip them until the lease passes, so a crashed process's claims come
back by themselves. On PostgreSQL the claim also takes `FOR UPDATE SKIP LOCKED`, so two
replicas claiming at the same moment never take the same row. An outcome is only recorded
while the claimer's token is still on the row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    text,
    update,
)

from app.store.db import UTCDateTime, stamper
from app.store.models import Delivery, DeliveryAttempt, Endpoint, OutboundEvent

D = cast(Table, Delivery.__table__)
A = cast(Table, DeliveryAttempt.__table__)
E = cast(Table, OutboundEvent.__table__)
EP = cast(Table, Endpoint.__table__)
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True, slots=True)
class Claim:
    delivery_id: int
    endpoint_id: str
    attempts: int       # attempts made before this one
    webhook_id: str
    payload: bytes
    token: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to (or a claim handed back unsent: `attempted_at` None)."""

    delivery_id: int
    endpoint_id: str
    token: str
    status: str                   # the delivery's status after this attempt
    next_attempt_at: datetime | None = None
    attempted_at: datetime | None = None
    status_code: int | None = None
    ok: bool = False
    latency_ms: float = 0.0
    response: str | None = None
    error: str | None = None


def _due(now: datetime) -> Any:
    return and_(D.c.status == PENDING, D.c.next_attempt_at <= now,
                or_(D.c.lease_until.is_(None), D.c.lease_until <= now))


def claim(conn: Connection, endpoint_id: str, limit: int, now: datetime,
          lease: timedelta) -> list[Claim]:
    """Lease up to `limit` due deliveries of one endpoint, oldest due first."""
    token = uuid.uuid4().hex
    due = (select(D.c.id).where(D.c.endpoint_id == endpoint_id, _due(now))
           # next_attempt_at alone: the due index's own order, so no sort of the backlog
           .order_by(D.c.next_attempt_at).limit(limit)
           .with_for_update(skip_locked=True))
    leased = {"lease_until": now + lease, "lease_token": token}
    if conn.dialect.name == "sqlite":
        return _sqlite_claim(conn, endpoint_id, due, now, leased)
    # A CTE, not `id IN (subquery)`: PostgreSQL may rescan an IN subquery as a semi-join
    # and then ignores its LIMIT (one claim took 568 rows of a 32-row limit). A CTE that
    # locks rows is evaluated exactly once.
    chosen = due.cte("due")
    rows = conn.execute(
        update(D).where(D.c.id == chosen.c.id, _due(now)).values(**leased)
        .returning(D.c.id, D.c.attempts, D.c.event_id)).all()
    if not rows:
        return []
    bodies = {r.id: r for r in conn.execute(
        select(E.c.id, E.c.webhook_id, E.c.payload)
        .where(E.c.id.in_([r.event_id for r in rows])))}
    claims = [Claim(r.id, endpoint_id, r.attempts, bodies[r.event_id].webhook_id,
                    bodies[r.event_id].payload.encode(), token) for r in rows]
    claims.sort(key=lambda c: c.delivery_id)
    return claims


def _sqlite_claim(conn: Connection, endpoint_id: str, due: Select[Any], now: datetime,
                  leased: dict[str, Any]) -> list[Claim]:
    """The claim in three statements of one step each, the rows read as one JSON array.

    sqlite3 steps once per row a statement returns and hands the GIL to the event loop and
    back at each step; on SQLite the dispatcher's rounds run on the ingest writer's thread,
    so per-row steps there delayed every callback's batch. The update repeats the due
    condition, so a row another process leased since the first read is not taken.
    """
    ids = json.loads(conn.execute(
        select(func.json_group_array(due.subquery().c.id))).scalar_one())
    if not ids:
        return []
    conn.execute(update(D).where(D.c.id.in_(ids), _due(now)).values(**leased))
    rows = json.loads(conn.execute(
        select(func.json_group_array(func.json_array(
            D.c.id, D.c.attempts, E.c.webhook_id, E.c.payload)))
        .select_from(D.join(E, E.c.id == D.c.event_id))
        .where(D.c.id.in_(ids), D.c.lease_token == leased["lease_token"])).scalar_one())
    return sorted((Claim(delivery_id, endpoint_id, attempts, webhook_id, payload.encode(),
                         leased["lease_token"])
                   for delivery_id, attempts, webhook_id, payload in rows),
                  key=lambda c: c.delivery_id)


def _names(columns: str) -> list[str]:
    """The names of "name type, ..."."""
    return [c.split()[0] for c in columns.split(",")]


def _json_rows(dialect: str, columns: str) -> str:
    """A row source over one JSON array parameter of objects, aliased `v`: `columns` is
    "name type, ..." (PostgreSQL types). One statement writes any number of rows: an
    executemany is a round trip per row on PostgreSQL (50 rows took 20-60 ms) and a step,
    with a GIL hand-off to the event loop, per row on SQLite."""
    if dialect == "postgresql":
        return f"json_to_recordset(%s::json) AS v({columns})"
    fields = ", ".join(f"json_extract(value, '$.{n}') AS {n}" for n in _names(columns))
    return f"(SELECT {fields} FROM json_each(?)) AS v"


def _by_dialect(template: str, columns: str) -> dict[str, str]:
    """`template` with its {rows} source for each database."""
    return {d: template.format(rows=_json_rows(d, columns)) for d in ("postgresql", "sqlite")}


_ATTEMPT_COLUMNS = ("delivery_id bigint, endpoint_id text, attempted_at timestamptz, "
                    "status_code integer, ok boolean, latency_ms double precision, "
                    "response text")
_ATTEMPT_NAMES = ", ".join(_names(_ATTEMPT_COLUMNS))
_ATTEMPTS = _by_dialect(
    f"INSERT INTO delivery_attempts ({_ATTEMPT_NAMES}) SELECT {_ATTEMPT_NAMES} FROM {{rows}}",
    _ATTEMPT_COLUMNS)
_FINISH = _by_dialect("""
UPDATE deliveries AS d SET status = v.status, attempts = d.attempts + 1,
    next_attempt_at = COALESCE(v.next_attempt_at, d.next_attempt_at),
    lease_until = NULL, lease_token = NULL, last_status_code = v.code, last_error = v.error,
    finished_at = v.finished_at
FROM {rows}
WHERE d.id = v.id AND d.lease_token = v.token
""", "id bigint, token text, status text, next_attempt_at timestamptz, code integer, "
     "error text, finished_at timestamptz")
_RELEASE = _by_dialect("""
UPDATE deliveries AS d SET lease_until = NULL, lease_token = NULL
FROM {rows}
WHERE d.id = v.id AND d.lease_token = v.token
""", "id bigint, token text")


def _text(value: str | None) -> str | None:
    """An endpoint's answer (or an error quoting it) as a text column can hold it: a NUL, which
    a UTF-16 or binary body carries, is refused by PostgreSQL (and the whole round with it,
    retried forever) and ends the string for SQLite's JSON functions."""
    return value.replace("\x00", "\ufffd") if value is not None else None


def record(conn: Connection, outcomes: Sequence[Outcome]) -> None:
    """Write attempts and the deliveries' new state (several outcomes, one transaction)."""
    done = [o for o in outcomes if o.attempted_at is not None]
    released = [o for o in outcomes if o.attempted_at is None]
    dialect = conn.dialect.name
    stamp = stamper(conn.dialect)

    def at(value: datetime | None) -> Any:
        return stamp(value) if value is not None else None

    if done:
        conn.exec_driver_sql(_ATTEMPTS[dialect], (
            json.dumps([{"delivery_id": o.delivery_id, "endpoint_id": o.endpoint_id,
                         "attempted_at": at(o.attempted_at), "status_code": o.status_code,
                         "ok": o.ok, "latency_ms": o.latency_ms, "response": _text(o.response)}
                        for o in done]),))
        conn.exec_driver_sql(_FINISH[dialect], (
            json.dumps([{"id": o.delivery_id, "token": o.token, "status": o.status,
                         "next_attempt_at": at(o.next_attempt_at), "code": o.status_code,
                         "error": _text(o.error),
                         "finished_at": at(o.attempted_at) if o.status != PENDING else None}
                        for o in done]),))
    if released:
        conn.exec_driver_sql(_RELEASE[dialect], (json.dumps(
            [{"id": o.delivery_id, "token": o.token} for o in released]),))


def disable(conn: Connection, endpoint_id: str, reason: str, now: datetime) -> None:
    """Disable an endpoint (it answered 410 Gone): its pending deliveries fail with the
    reason; a replay brings them back once it is enabled again."""
    conn.execute(update(EP).where(EP.c.id == endpoint_id)
                 .values(enabled=False, disabled_reason=reason, updated_at=now))
    # Rows in flight keep their lease token: their own outcome, when it comes, overwrites this.
    conn.execute(update(D).where(D.c.endpoint_id == endpoint_id, D.c.status == PENDING)
                 .values(status=FAILED, finished_at=now, last_error=reason))


def pull_forward(conn: Connection, endpoint_ids: Iterable[str], now: datetime) -> None:
    """An endpoint recovered: its retries waiting out their backoff become due now."""
    ids = list(endpoint_ids)
    if ids:
        conn.execute(update(D).where(D.c.endpoint_id.in_(ids), D.c.status == PENDING,
                                     D.c.next_attempt_at > now).values(next_attempt_at=now))


def expire(conn: Connection, endpoint_ids: Iterable[str], older_than: datetime,
           now: datetime) -> None:
    """Deliveries held back by an open circuit (due and unsent) since before `older_than`
    (now minus the whole retry schedule) fail, as they would have after their last retry.
    Counted from when each became due, not from its creation: a manual retry (due now) gets
    its attempt."""
    ids = list(endpoint_ids)
    if ids:
        conn.execute(update(D).where(
            D.c.endpoint_id.in_(ids), D.c.status == PENDING, D.c.next_attempt_at < older_than,
            or_(D.c.lease_until.is_(None), D.c.lease_until <= now))
            .values(status=FAILED, finished_at=now,
                    last_error="not sent: the endpoint kept failing for the whole "
                               "retry schedule (circuit open)"))


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int                  # every pending delivery, due or waiting for a retry
    due: int                      # pending and due, not delivered yet
    oldest_created_at: datetime | None  # the oldest pending delivery, due or not


def backlog(conn: Connection, now: datetime) -> dict[str, Backlog]:
    due = func.sum(case((D.c.next_attempt_at <= now, 1), else_=0))
    rows = conn.execute(select(D.c.endpoint_id, func.count(), due, func.min(D.c.created_at))
                        .where(D.c.status == PENDING).group_by(D.c.endpoint_id))
    return {r[0]: Backlog(int(r[1]), int(r[2] or 0), r[3]) for r in rows}


# The endpoints (enabled, not paused) that have a due, unleased delivery: one statement, its
# cost following the endpoints with pending deliveries, not all endpoints. It walks the due
# index (endpoint_id, next_attempt_at WHERE status = 'pending') from one endpoint id to the
# next (a loose index scan, which neither database does by itself), and looks at each one's
# oldest due rows. The 'pending' literals let both databases use that partial index; the
# LIMIT 1 subquery (not EXISTS, which PostgreSQL may turn into a join over every due row)
# is one index probe per endpoint.
_DUE_ENDPOINTS = text("""
WITH RECURSIVE walk(id) AS (
    SELECT (SELECT endpoint_id FROM deliveries WHERE status = 'pending'
            ORDER BY endpoint_id LIMIT 1)
    UNION ALL
    SELECT (SELECT d.endpoint_id FROM deliveries d
            WHERE d.status = 'pending' AND d.endpoint_id > walk.id
            ORDER BY d.endpoint_id LIMIT 1)
    FROM walk WHERE walk.id IS NOT NULL
)
SELECT walk.id FROM walk JOIN endpoints ep ON ep.id = walk.id
WHERE ep.enabled AND ep.paused_at IS NULL AND (
    SELECT 1 FROM deliveries d WHERE d.endpoint_id = walk.id AND d.status = 'pending'
    AND d.next_attempt_at <= :now AND (d.lease_until IS NULL OR d.lease_until <= :now)
    LIMIT 1) = 1
""").bindparams(bindparam("now", type_=UTCDateTime()))


def due_endpoints(conn: Connection, now: datetime) -> set[str]:
    """Which endpoints have work for a claim now (see _DUE_ENDPOINTS)."""
    return set(conn.execute(_DUE_ENDPOINTS, {"now": now}).scalars())


def endpoints_version(conn: Connection) -> tuple[Any, ...]:
    """Changes whenever an endpoint is added, removed or changed (each change sets
    updated_at): a cheap check before reloading every endpoint."""
    return tuple(conn.execute(select(func.count(), func.max(EP.c.updated_at))
                              .select_from(EP)).one())
