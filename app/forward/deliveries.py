"""The deliveries listing (with each delivery's attempts) and the manual retry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, select, update

from app.core.notifications import msg_key
from app.core.times import utcnow
from app.forward.endpoints import Conflict, NotFound
from app.forward.queue import PENDING
from app.store.models import Delivery, DeliveryAttempt, Endpoint, OutboundEvent

D = cast(Table, Delivery.__table__)
A = cast(Table, DeliveryAttempt.__table__)
E = cast(Table, OutboundEvent.__table__)
EP = cast(Table, Endpoint.__table__)


@dataclass(frozen=True, slots=True)
class Listed:
    delivery: Row[Any]
    msg_id: str | None
    attempts: list[Row[Any]]


def _columns() -> list[Any]:
    return [*D.c, E.c.webhook_id, E.c.type.label("event_type"), E.c.sequence,
            E.c.occurred_at, E.c.payload, EP.c.paused_at.label("endpoint_paused_at")]


def _source() -> Any:
    return D.join(E, E.c.id == D.c.event_id).join(EP, EP.c.id == D.c.endpoint_id)


def _listed(conn: Connection, rows: list[Row[Any]]) -> list[Listed]:
    attempts: dict[int, list[Row[Any]]] = {r.id: [] for r in rows}
    if rows:
        for a in conn.execute(select(A).where(A.c.delivery_id.in_(list(attempts)))
                              .order_by(A.c.id)):
            attempts[a.delivery_id].append(a)
    return [Listed(r, json.loads(r.payload).get("data", {}).get("msg_id"), attempts[r.id])
            for r in rows]


def page(conn: Connection, *, endpoint_id: str | None = None, status: str | None = None,
         msg_id: str | None = None, limit: int = 50, before: int | None = None,
         ) -> tuple[list[Listed], int | None]:
    """Newest first; returns the items and the cursor (a delivery id) of the next page."""
    stmt = select(*_columns()).select_from(_source())
    if endpoint_id is not None:
        stmt = stmt.where(D.c.endpoint_id == endpoint_id)
    if status is not None:
        stmt = stmt.where(D.c.status == status)
    if msg_id is not None:
        stmt = stmt.where(E.c.msg_key == msg_key(msg_id))
    if before is not None:
        stmt = stmt.where(D.c.id < before)
    rows = list(conn.execute(stmt.order_by(D.c.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return _listed(conn, rows), (rows[-1].id if more else None)


def one(conn: Connection, delivery_id: int) -> Listed:
    row = conn.execute(select(*_columns()).select_from(_source())
                       .where(D.c.id == delivery_id)).first()
    if row is None:
        raise NotFound(f"no delivery {delivery_id}")
    return _listed(conn, [row])[0]


def retry(conn: Connection, delivery_id: int) -> Listed:
    """Attempt the delivery again now, whatever its status. A failed one gets one more
    attempt; a pending one skips the rest of its backoff."""
    current = one(conn, delivery_id).delivery
    now = utcnow()
    if current.status == PENDING and current.lease_until is not None \
            and current.lease_until > now:
        raise Conflict(f"delivery {delivery_id} is being attempted right now")
    endpoint = conn.execute(select(EP.c.enabled, EP.c.disabled_reason, EP.c.paused_at)
                            .where(EP.c.id == current.endpoint_id)).one()
    if not endpoint.enabled:
        raise Conflict(f"endpoint {current.endpoint_id} is disabled "
                       f"({endpoint.disabled_reason}); enable it first")
    if endpoint.paused_at is not None:
        raise Conflict(f"endpoint {current.endpoint_id} is paused; resume it first")
    conn.execute(update(D).where(D.c.id == delivery_id).values(
        status=PENDING, next_attempt_at=now, finished_at=None, lease_until=None,
        lease_token=None))
    return one(conn, delivery_id)
