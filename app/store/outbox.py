"""The forwarding outbox: the events a batch caused and their deliveries, stored inside the
callback's own transaction (`Outbox.enqueue`, `write_events`): an acknowledged callback
always has its deliveries stored.

It is on the ingest hot path, so it speaks SQL directly and fans out set-based: whether any
endpoint exists is asked inside the events insert of the write path (none: nothing else
happens, nothing is serialised), then the events and one delivery per matching endpoint are
written by one statement on PostgreSQL and two on SQLite. Whether an endpoint matches is
decided in SQL in the same transaction, never from a cache, so an endpoint created a moment
ago is not missed.

Every event is stored while any endpoint exists, whatever its state or filters: a replay
(app/forward/endpoints.py) can then bring back what an endpoint missed while it was disabled
by a 410, or what its filters took only after a change. Deliveries are created for enabled
endpoints (paused ones included: theirs wait), never for disabled ones.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import Connection

from app.core.times import iso, utcnow
from app.store.db import stamper

EventType = Literal["message.status", "message.reply"]
EVENT_TYPES: tuple[EventType, ...] = ("message.status", "message.reply")


@dataclass(frozen=True, slots=True)
class ForwardEvent:
    type: EventType
    msg_key: str                  # the message's matching key (messages.msg_key)
    p_transaction_id: str | None  # for endpoint prefix filtering
    sequence: int                 # per message, increasing (messages.event_seq)
    data: dict[str, Any]          # JSON-ready message summary + previous_status + sequence
    occurred_at: datetime         # aware UTC


def new_webhook_id() -> str:
    """`msg_` + 48-bit milliseconds + 80 random bits: unique, and ordered by creation so the
    unique index grows at its end."""
    return f"msg_{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def body(event: ForwardEvent) -> str:
    """The JSON body every delivery of the event sends (ASCII only: no encoding surprises)."""
    return json.dumps({"type": event.type, "timestamp": iso(event.occurred_at),
                       "data": event.data}, separators=(",", ":"))


def filter_sql(dialect: str, event: str) -> str:
    """SQL: endpoint `ep`'s filters take event row `event` (its type subscribed, its prefix
    matched), whatever the endpoint's state."""
    contains = "strpos" if dialect == "postgresql" else "instr"
    return (f"{contains}(',' || ep.events || ',', ',' || {event}.type || ',') > 0"
            f" AND (ep.p_transaction_id_prefix IS NULL OR substr({event}.p_transaction_id, 1,"
            f" length(ep.p_transaction_id_prefix)) = ep.p_transaction_id_prefix)")


def match_sql(dialect: str, event: str) -> str:
    """SQL: endpoint `ep` gets a delivery of event row `event`: enabled (paused or not; a
    paused endpoint's deliveries wait) and its filters take the event."""
    return f"ep.enabled AND {filter_sql(dialect, event)}"


ANY_ENDPOINT = "SELECT 1 FROM endpoints LIMIT 1"
EVENT_COLUMNS = ("webhook_id", "type", "msg_key", "p_transaction_id", "sequence", "payload",
                 "occurred_at")
DELIVERY_COLUMNS = "event_id, endpoint_id, status, attempts, next_attempt_at, created_at"

# PostgreSQL: the whole batch as one JSON parameter, events and deliveries in one statement.
PG_ENQUEUE = f"""
WITH ev AS (
    INSERT INTO outbound_events ({", ".join(EVENT_COLUMNS)})
    SELECT {", ".join(f"r.{c}" for c in EVENT_COLUMNS)}
    FROM json_to_recordset(%s::json) AS r(webhook_id text, type text, msg_key text,
         p_transaction_id text, sequence bigint, payload text, occurred_at timestamptz)
    WHERE EXISTS ({ANY_ENDPOINT})
    RETURNING id, type, p_transaction_id
)
INSERT INTO deliveries ({DELIVERY_COLUMNS})
SELECT ev.id, ep.id, 'pending', 0, %s, %s
FROM ev JOIN endpoints ep ON {match_sql("postgresql", "ev")}
"""

# SQLite: the events (all, while any endpoint exists), then their deliveries by id range.
# The range is exact: SQLite has one writer, and this transaction holds the write lock.
SQLITE_DELIVERIES = f"""
INSERT INTO deliveries ({DELIVERY_COLUMNS})
SELECT e.id, ep.id, 'pending', 0, ?, ? FROM outbound_events e
JOIN endpoints ep ON {match_sql("sqlite", "e")} WHERE e.id BETWEEN ? AND ?
"""
SQLITE_CHUNK = 500  # 7 parameters a row, far below SQLite's limit


@lru_cache(maxsize=8)
def _sqlite_events(rows: int) -> str:
    # No RETURNING: sqlite3 would step, and hand the GIL to the event loop and back, once per
    # row. The ids are read off the statement's rowid range (see SQLITE_DELIVERIES). The
    # statement starts with INSERT so that sqlite3 reports its rowcount.
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
    names = ", ".join(EVENT_COLUMNS)
    named = ", ".join(f"column{i} AS {c}" for i, c in enumerate(EVENT_COLUMNS, start=1))
    return (f"INSERT INTO outbound_events ({names}) SELECT {names} "
            f"FROM (SELECT {named} FROM (VALUES {values})) AS r "
            f"WHERE EXISTS ({ANY_ENDPOINT})")


def write_events(conn: Connection, events: Sequence[ForwardEvent]) -> int:
    """Store the events (while any endpoint exists) and one pending delivery per matching
    enabled endpoint, inside the caller's transaction (the caller commits); how many
    deliveries were created. Whether an endpoint matches is decided in SQL."""
    now = utcnow()
    if conn.dialect.name == "postgresql":
        batch = json.dumps([
            {"webhook_id": new_webhook_id(), "type": e.type, "msg_key": e.msg_key,
             "p_transaction_id": e.p_transaction_id, "sequence": e.sequence,
             "payload": body(e), "occurred_at": e.occurred_at.isoformat()}
            for e in events])
        return int(conn.exec_driver_sql(PG_ENQUEUE, (batch, now, now)).rowcount)
    t = stamper(conn.dialect)
    created = 0
    for i in range(0, len(events), SQLITE_CHUNK):
        part = events[i:i + SQLITE_CHUNK]
        params = tuple(v for e in part for v in (
            new_webhook_id(), e.type, e.msg_key, e.p_transaction_id, e.sequence, body(e),
            t(e.occurred_at)))
        result = conn.exec_driver_sql(_sqlite_events(len(part)), params)
        inserted, last = result.rowcount, result.lastrowid
        if inserted > 0:
            created += int(conn.exec_driver_sql(
                SQLITE_DELIVERIES, (t(now), t(now), last - inserted + 1, last)).rowcount)
    return created


class Outbox:
    """The write path's view of forwarding (`app.store.write.Forwarding`): whether events
    must be stored (any endpoint exists, enabled, paused or disabled), and the committed
    changes turned into events."""

    # Asked by the write path inside the statement that inserts the events (RETURNING), so
    # knowing whether anyone listens costs no round trip of its own.
    active_sql = f"EXISTS ({ANY_ENDPOINT})"

    def enqueue(self, conn: Connection, changes: Sequence[Any]) -> int:
        # The write path asked `active_sql` in this same transaction just before (it only has
        # changes when it did), so the check is not repeated.
        return write_events(conn, [from_change(c) for c in changes]) if changes else 0


def from_change(change: Any) -> ForwardEvent:
    """An `app.store.write.Change` (message summary, optional reply) as a ForwardEvent."""
    data = dict(change.message)
    if change.reply is not None:
        data["reply"] = change.reply
    return ForwardEvent(type=change.type, msg_key=change.msg_key,
                        p_transaction_id=change.p_transaction_id, sequence=change.sequence,
                        data=data, occurred_at=change.occurred_at)
