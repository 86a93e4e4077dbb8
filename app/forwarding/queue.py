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

from sqlalchemy import Connection, Table, and_, bindparam, case, func, or_, select, update

from app.models import Delivery, DeliveryAttempt, Endpoint, OutboundEvent

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
    # A CTE, not `id IN (subquery)`: PostgreSQL may rescan an IN subquery as a semi-join
    # and then ignores its LIMIT (one claim took 568 rows of a 32-row limit). A CTE that
    # locks rows is evaluated exactly once.
    chosen = due.cte("due")
    rows = conn.execute(
        update(D).where(D.c.id == chosen.c.id, _due(now))
        .values(lease_until=now + lease, lease_token=token)
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


_NEXT = bindparam("b_next", type_=D.c.next_attempt_at.type)
_FINISH = (update(D).where(D.c.id == bindparam("b_id"), D.c.lease_token == bindparam("b_token"))
           .values(status=bindparam("b_status"), attempts=D.c.attempts + 1,
                   next_attempt_at=func.coalesce(_NEXT, D.c.next_attempt_at),
                   lease_until=None, lease_token=None,
                   last_status_code=bindparam("b_code"), last_error=bindparam("b_error"),
                   finished_at=bindparam("b_finished", type_=D.c.finished_at.type)))
_RELEASE = (update(D).where(D.c.id == bindparam("b_id"), D.c.lease_token == bindparam("b_token"))
            .values(lease_until=None, lease_token=None))


# PostgreSQL: the outcomes as one JSON parameter, one statement for any number of rows (an
# executemany is a round trip per row: 50 rows took 20-60 ms).
_PG_FINISH = """
UPDATE deliveries AS d SET status = v.status, attempts = d.attempts + 1,
    next_attempt_at = COALESCE(v.next_attempt_at, d.next_attempt_at),
    lease_until = NULL, lease_token = NULL, last_status_code = v.code, last_error = v.error,
    finished_at = v.finished_at
FROM json_to_recordset(%s::json) AS v(id bigint, token text, status text,
     next_attempt_at timestamptz, code integer, error text, finished_at timestamptz)
WHERE d.id = v.id AND d.lease_token = v.token
"""
_PG_RELEASE = """
UPDATE deliveries AS d SET lease_until = NULL, lease_token = NULL
FROM json_to_recordset(%s::json) AS v(id bigint, token text)
WHERE d.id = v.id AND d.lease_token = v.token
"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def record(conn: Connection, outcomes: Sequence[Outcome]) -> None:
    """Write attempts and the deliveries' new state (several outcomes, one transaction)."""
    done = [o for o in outcomes if o.attempted_at is not None]
    released = [o for o in outcomes if o.attempted_at is None]
    if done:
        conn.execute(A.insert(), [
            {"delivery_id": o.delivery_id, "endpoint_id": o.endpoint_id,
             "attempted_at": o.attempted_at, "status_code": o.status_code, "ok": o.ok,
             "latency_ms": o.latency_ms, "response": o.response} for o in done])
    if conn.dialect.name == "postgresql":
        if done:
            conn.exec_driver_sql(_PG_FINISH, (json.dumps([
                {"id": o.delivery_id, "token": o.token, "status": o.status,
                 "next_attempt_at": _iso(o.next_attempt_at), "code": o.status_code,
                 "error": o.error, "finished_at": _iso(o.attempted_at)
                 if o.status != PENDING else None} for o in done]),))
        if released:
            conn.exec_driver_sql(_PG_RELEASE, (json.dumps(
                [{"id": o.delivery_id, "token": o.token} for o in released]),))
        return
    if done:
        conn.execute(_FINISH, [
            {"b_id": o.delivery_id, "b_token": o.token, "b_status": o.status,
             "b_next": o.next_attempt_at, "b_code": o.status_code, "b_error": o.error,
             "b_finished": o.attempted_at if o.status != PENDING else None}
            for o in done])
    if released:
        conn.execute(_RELEASE, [{"b_id": o.delivery_id, "b_token": o.token}
                                for o in released])


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
    """Deliveries held back by an open circuit for longer than the whole retry schedule
    fail, as they would have after their last retry."""
    ids = list(endpoint_ids)
    if ids:
        conn.execute(update(D).where(
            D.c.endpoint_id.in_(ids), D.c.status == PENDING, D.c.created_at < older_than,
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
