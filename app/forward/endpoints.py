"""Endpoints: create, read, delete, rotate secrets, replay, and the one from settings.

Plain functions on a Connection, shared by the REST routes and the command line; the caller
owns the transaction.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, bindparam, delete, insert, select, text, update

from app.config import Settings
from app.core.times import utcnow
from app.core.webhook_signing import new_secret, secret_key
from app.forward.queue import PENDING, Backlog, backlog
from app.store.db import UTCDateTime
from app.store.models import Delivery, DeliveryAttempt, Endpoint
from app.store.outbox import EVENT_TYPES, filter_sql

log = logging.getLogger(__name__)

EP = cast(Table, Endpoint.__table__)
A = cast(Table, DeliveryAttempt.__table__)
D = cast(Table, Delivery.__table__)
SETTINGS_ID = "ep_settings"
ROTATION_GRACE = timedelta(hours=24)
# Rotated-out secrets kept signing (the latest ones, each for ROTATION_GRACE): every one adds
# a signature to each request's webhook-signature header, so they must not pile up.
MAX_PREVIOUS_SECRETS = 3
SETTINGS_UNSET = "DLR_FORWARD_URL is no longer set"
CHANGEABLE = ("url", "events", "p_transaction_id_prefix", "description", "enabled")
STATS_WINDOW = 1000  # success rate and last error: over this many latest attempts


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The request cannot apply to the endpoint as it is (e.g. managed by settings)."""


@dataclass(frozen=True, slots=True)
class LastError:
    at: datetime
    status_code: int | None
    response: str | None


@dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    backlog: int
    oldest_pending_at: datetime | None
    success_rate: float | None
    attempts_considered: int
    last_error: LastError | None


def new_id() -> str:
    return "ep_" + secrets.token_hex(12)


def previous_secrets(row: Any, now: datetime) -> list[str]:
    """Rotated-out secrets still inside their 24 h of grace."""
    pairs = json.loads(row.previous_secrets or "[]")
    return [s for s, until in pairs if datetime.fromisoformat(until) > now]


def signing_keys(row: Any, now: datetime) -> list[bytes]:
    return [secret_key(s) for s in [row.secret, *previous_secrets(row, now)]]


def get(conn: Connection, endpoint_id: str) -> Row[Any]:
    row = conn.execute(select(EP).where(EP.c.id == endpoint_id)).first()
    if row is None:
        raise NotFound(f"no endpoint {endpoint_id}")
    return row


def list_all(conn: Connection) -> list[Row[Any]]:
    return list(conn.execute(select(EP).order_by(EP.c.created_at, EP.c.id)))


def create(conn: Connection, *, url: str, events: Sequence[str] | None = None,
           prefix: str | None = None, description: str | None = None,
           endpoint_id: str | None = None, secret: str | None = None,
           from_settings: bool = False) -> Row[Any]:
    """Insert an endpoint (the URL and events already validated) and return its row."""
    now = utcnow()
    endpoint_id = endpoint_id or new_id()
    conn.execute(insert(EP).values(
        id=endpoint_id, url=url, events=",".join(events or EVENT_TYPES),
        p_transaction_id_prefix=prefix or None, description=description,
        secret=secret or new_secret(), previous_secrets=None, enabled=True,
        disabled_reason=None, from_settings=from_settings, created_at=now, updated_at=now))
    return get(conn, endpoint_id)


def remove(conn: Connection, endpoint_id: str) -> None:
    """Delete an endpoint with its deliveries (their events stay for other endpoints)."""
    if get(conn, endpoint_id).from_settings:
        raise Conflict("this endpoint comes from DLR_FORWARD_URL; unset that to remove it")
    conn.execute(delete(EP).where(EP.c.id == endpoint_id))


def retired(row: Any, now: datetime) -> str:
    """`previous_secrets` once the row's current secret is rotated out now: it signs beside
    the new one for ROTATION_GRACE; only the latest MAX_PREVIOUS_SECRETS still in their grace
    are kept (older ones stop signing at once)."""
    kept = [[s, until] for s, until in json.loads(row.previous_secrets or "[]")
            if datetime.fromisoformat(until) > now and s != row.secret]
    kept.append([row.secret, (now + ROTATION_GRACE).isoformat()])
    return json.dumps(kept[-MAX_PREVIOUS_SECRETS:])


def rotate(conn: Connection, endpoint_id: str) -> Row[Any]:
    """A new secret; the old one keeps signing beside it for 24 hours."""
    row = get(conn, endpoint_id)
    if row.from_settings:
        raise Conflict("this endpoint's secret comes from DLR_FORWARD_SECRET; change it there")
    now = utcnow()
    conn.execute(update(EP).where(EP.c.id == endpoint_id).values(
        secret=new_secret(), previous_secrets=retired(row, now), updated_at=now))
    return get(conn, endpoint_id)


def enable(conn: Connection, endpoint_id: str) -> Row[Any]:
    """Enable (after a 410, or DLR_FORWARD_URL unset) and resume (after a pause) at once:
    its deliveries that came due meanwhile are due from now."""
    get(conn, endpoint_id)
    now = utcnow()
    conn.execute(update(EP).where(EP.c.id == endpoint_id).values(
        enabled=True, disabled_reason=None, paused_at=None, updated_at=now))
    # Due from now: an open circuit's expiry counts from when a delivery became due, and
    # time spent paused must not count.
    conn.execute(update(D).where(D.c.endpoint_id == endpoint_id, D.c.status == PENDING,
                                 D.c.next_attempt_at < now).values(next_attempt_at=now))
    return get(conn, endpoint_id)


def pause(conn: Connection, endpoint_id: str) -> Row[Any]:
    """Stop sending to the endpoint: its deliveries (and those of events to come) wait, and
    none fails while it is paused."""
    row = get(conn, endpoint_id)
    if row.paused_at is None:
        now = utcnow()
        conn.execute(update(EP).where(EP.c.id == endpoint_id).values(
            paused_at=now, updated_at=now))
    return get(conn, endpoint_id)


def change(conn: Connection, endpoint_id: str, changes: Mapping[str, Any]) -> Row[Any]:
    """Change an endpoint in place (the fields of CHANGEABLE present in `changes`, already
    validated): its secret, deliveries and their webhook-ids stay; pending deliveries go to
    the new URL. `enabled` false pauses it, true resumes (and enables) it."""
    row = get(conn, endpoint_id)
    values: dict[str, Any] = {}
    if "url" in changes and changes["url"] != row.url:
        if row.from_settings:
            raise Conflict("this endpoint's URL comes from DLR_FORWARD_URL; change it there")
        values["url"] = changes["url"]
    if "events" in changes:
        values["events"] = ",".join(dict.fromkeys(changes["events"]))
    if "p_transaction_id_prefix" in changes:
        values["p_transaction_id_prefix"] = changes["p_transaction_id_prefix"] or None
    if "description" in changes:
        values["description"] = changes["description"]
    if values:
        conn.execute(update(EP).where(EP.c.id == endpoint_id).values(
            updated_at=utcnow(), **values))
    if changes.get("enabled") is True:
        return enable(conn, endpoint_id)
    if changes.get("enabled") is False:
        return pause(conn, endpoint_id)
    return get(conn, endpoint_id)


def replay(conn: Connection, endpoint_id: str, *, since: datetime, until: datetime) -> int:
    """Queue every stored event of [since, until) that the endpoint's filters take, again,
    with its original webhook-id, whatever the endpoint's state was when it happened (events
    are stored while any endpoint exists). Events already pending for the endpoint are not
    queued twice. A paused endpoint's replayed deliveries wait for it to resume."""
    row = get(conn, endpoint_id)
    if not row.enabled:
        raise Conflict(f"endpoint {endpoint_id} is disabled ({row.disabled_reason}); "
                       "enable it first")
    now = utcnow()
    stmt = text(f"""
        INSERT INTO deliveries (event_id, endpoint_id, status, attempts, next_attempt_at,
                                created_at)
        SELECT e.id, ep.id, 'pending', 0, :now, :now
        FROM outbound_events e
        JOIN endpoints ep ON ep.id = :ep AND {filter_sql(conn.dialect.name, "e")}
        WHERE e.occurred_at >= :since AND e.occurred_at < :until
          AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id
                          AND d.endpoint_id = :ep AND d.status = '{PENDING}')
    """).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("since", type_=UTCDateTime()),
                    bindparam("until", type_=UTCDateTime()))
    return int(conn.execute(stmt, {"now": now, "ep": endpoint_id, "since": since,
                                   "until": until}).rowcount)


def sync_settings(conn: Connection, settings: Settings) -> None:
    """Keep the endpoint of DLR_FORWARD_URL / DLR_FORWARD_SECRET in step with the settings:
    created or updated when set. A changed secret is rotated as `rotate` does (the old one
    keeps signing for 24 h). When unset, the endpoint is kept, disabled with the reason
    (its pending deliveries wait; nothing new is queued), and no longer managed by the
    settings: the user may remove it. Safe when replicas start together."""
    now = utcnow()
    current = conn.execute(select(EP).where(EP.c.id == SETTINGS_ID).with_for_update()).first()
    if settings.forward_url is None or settings.forward_secret is None:
        if current is not None and current.from_settings:
            conn.execute(update(EP).where(EP.c.id == SETTINGS_ID).values(
                enabled=False, disabled_reason=SETTINGS_UNSET, from_settings=False,
                updated_at=now))
            log.warning("forwarding: DLR_FORWARD_URL is no longer set; endpoint %s (%s) is "
                        "kept, disabled, with its pending deliveries; remove it with "
                        "`dlr endpoints remove %s` if it is not wanted", SETTINGS_ID,
                        current.url, SETTINGS_ID)
        return
    values: dict[str, Any] = {"url": settings.forward_url,
                              "secret": settings.forward_secret.get_secret_value()}
    if current is None:
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(EP).values(
                id=SETTINGS_ID, events=",".join(EVENT_TYPES), p_transaction_id_prefix=None,
                description="from DLR_FORWARD_URL", enabled=True, from_settings=True,
                created_at=now, updated_at=now, **values).on_conflict_do_nothing())
        else:
            create(conn, endpoint_id=SETTINGS_ID, url=values["url"], secret=values["secret"],
                   description="from DLR_FORWARD_URL", from_settings=True)
        return
    if current.secret != values["secret"]:
        values["previous_secrets"] = retired(current, now)
    if not current.from_settings:
        values["from_settings"] = True
        if current.disabled_reason == SETTINGS_UNSET:
            values.update(enabled=True, disabled_reason=None)
    if any(getattr(current, k) != v for k, v in values.items()):
        conn.execute(update(EP).where(EP.c.id == SETTINGS_ID).values(updated_at=now, **values))


def stats(conn: Connection, rows: Sequence[Any]) -> dict[str, Stats]:
    """Per endpoint: backlog, and the success rate and last error of its latest attempts."""
    now = utcnow()
    queued: dict[str, Backlog] = backlog(conn, now)
    per_endpoint: dict[str, Stats] = {}
    for row in rows:
        recent = conn.execute(
            select(A.c.ok, A.c.attempted_at, A.c.status_code, A.c.response)
            .where(A.c.endpoint_id == row.id)
            .order_by(A.c.attempted_at.desc(), A.c.id.desc()).limit(STATS_WINDOW)).all()
        failed = next((a for a in recent if not a.ok), None)
        q = queued.get(row.id)
        per_endpoint[row.id] = Stats(
            pending=q.pending if q else 0, backlog=q.due if q else 0,
            oldest_pending_at=q.oldest_created_at if q else None,
            success_rate=(sum(1 for a in recent if a.ok) / len(recent)) if recent else None,
            attempts_considered=len(recent),
            last_error=LastError(failed.attempted_at, failed.status_code, failed.response)
            if failed else None)
    return per_endpoint
